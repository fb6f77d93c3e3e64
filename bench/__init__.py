"""Benchmark scripts: each prints timings of ours against a baseline measured in the same run,
naming the hardware. Run from the repository root: python -m bench.ops | bench.model | bench.gpu."""
