"""Relation datasets: the synthetic scenes (and GQA), episodes and DataModules."""
