"""fastmid's benchmark suite: fastmid against standard LoRA (PEFT) on throughput, memory, FLOPs.

Run it as ``fastmid bench`` (interleaved providers, reports in ``bench/results/``) or as a
pytest-benchmark suite with ``pytest bench/ --benchmark-only``.
"""
