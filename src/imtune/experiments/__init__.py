"""Experiments over runs: compare (arms x seeds), sweep (prompt weights), study (the paper's factors), jobs."""
