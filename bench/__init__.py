"""Benchmarks of guidg-fast against the eager reference (``python -m bench``)."""
