"""Command-line entry points: train, evaluate (LightningCLI over the library modules)."""
