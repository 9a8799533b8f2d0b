"""Benchmark scripts (`python benchmarks/NAME.py`); a package so that the
tests import their functions as `from benchmarks import NAME`."""
