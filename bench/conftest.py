"""Fixtures of the pytest-benchmark suite (``pytest bench/ --benchmark-only``).

The base model is the embedded SmolLM2-135M; ``FASTMID_BENCH_QUICK=1`` swaps in the tiny
random-init twin. Providers are built per test from one session-wide base model and workload.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    # Benchmarks time the shipped execution paths; the Triton interpreter is a correctness tool.
    os.environ.pop("TRITON_INTERPRET", None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def quick() -> bool:
    return os.environ.get("FASTMID_BENCH_QUICK", "") not in ("", "0")


@pytest.fixture(scope="session")
def base() -> tuple[Any, Any, str]:
    """(fp32 base model, tokenizer, model name), loaded once."""
    from bench.providers import load_base

    return load_base(quick())


@pytest.fixture(scope="session")
def workload(base: tuple[Any, Any, str]) -> Any:
    """Identical steps for every provider: the trainer's packing bins of the bundled data."""
    from bench.providers import make_workload

    wl = make_workload(base[1], num_steps=4, batch_tokens=512 if quick() else 1024)
    wl.extra["model"] = base[2]
    return wl


@pytest.fixture(scope="session")
def matmul_peaks() -> dict[str, float]:
    """This machine's measured matmul FLOP/s per precision (for MFU)."""
    from bench.measure import matmul_peak
    from fastmid.engine.models import DTYPES

    return {name: matmul_peak(dtype, n=1024 if quick() else 2048) for name, dtype in DTYPES.items()}


@pytest.fixture
def stamp(benchmark: Any, base: tuple[Any, Any, str]) -> Any:
    """Record machine, commit and model on a benchmark's extra_info, plus any given fields."""
    from bench.machine import machine_info, machine_label

    def put(**fields: Any) -> None:
        info = machine_info()
        benchmark.extra_info.update(
            machine=machine_label(info), commit=info["commit"], model=base[2], **fields
        )

    return put
