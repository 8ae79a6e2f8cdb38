"""Benchmarks outside the model library: the official-design baseline and the side-by-side comparison driver."""
