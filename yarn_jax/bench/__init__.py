"""Benchmarks: `python -m yarn_jax.bench <name> ...`; each prints a table and writes it under bench/results/."""
