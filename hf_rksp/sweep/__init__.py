"""The divergence sweep: small transformers trained from scratch to test RKSP and KSS (benchmarks/divergence_sweep.py)."""
