"""Benchmarks of guidg-fast against the eager reference (``guidg-fast bench``, ``python -m guidg_fast.bench``)."""
