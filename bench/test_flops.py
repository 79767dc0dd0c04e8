"""FLOPs per step (useful vs executed) and achieved useful-FLOP utilisation (MFU)."""

from __future__ import annotations

import pytest

from bench.measure import count_flops, useful_flops
from bench.providers import PROVIDERS, SPECS, build_provider


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", PROVIDERS)
def test_mfu(benchmark, base, workload, matmul_peaks, stamp, name: str, dtype: str) -> None:
    # Counted in fp32 on CPU, where every op is visible to FlopCounterMode; recomputation
    # (gradient checkpointing) is not useful work, so its twin's count is the useful one.
    counter = build_provider(name, base[0], "fp32", on="cpu")
    executed = count_flops(counter, counter.batch(workload.step_examples(0), workload.pad_id))
    twin = SPECS[name].useful_twin
    if twin is not None:
        counter = build_provider(twin, base[0], "fp32", on="cpu")
    useful = useful_flops(counter, workload, 0)
    del counter
    assert useful <= executed

    provider = build_provider(name, base[0], dtype)
    batch = provider.batch(workload.step_examples(0), workload.pad_id)
    provider.train_step(batch)
    benchmark.pedantic(provider.train_step, args=(batch,), rounds=3, iterations=1)
    mfu = useful / benchmark.stats.stats.min / matmul_peaks[dtype]
    stamp(
        provider=name,
        dtype=dtype,
        useful_flops=useful,
        executed_flops=executed,
        matmul_peak_flop_s=matmul_peaks[dtype],
        mfu=mfu,
    )
