"""Benchmarks that write the numbers of the docs; run each from the repository
root as `python -m bench.<name>` (bench/harness.py starts or reaches a server)."""
