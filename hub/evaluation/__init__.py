"""Evaluation: decoding a test split and scoring it with the metric modules in `metrics/`."""
