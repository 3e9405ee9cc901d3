"""Benchmarks and experiments, each runnable as ``python -m benchmarks.<name>`` from the repository root.

Slow by design (minutes to CPU-hours); each test file in tests/ runs a small smoke version.  Results land in
``benchmarks/results/``.
"""
