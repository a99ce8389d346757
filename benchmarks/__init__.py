"""Benchmarks and result tables for mtl_dist (run with `python -m`)."""
