"""The model organism: a small OpenFlamingo trained to infer relations in context."""
