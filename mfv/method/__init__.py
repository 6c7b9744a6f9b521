"""The method: causal mediation analysis (AIE), head selection and function vectors."""
