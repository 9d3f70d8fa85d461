"""Evaluation: benchmarks read from their native layouts, the official metrics, and scoring
prediction records against references. No torch."""
