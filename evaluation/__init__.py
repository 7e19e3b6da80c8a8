"""Evaluation: metrics, judges applied to runs, benchmark and comparison harnesses."""
