"""fastmid training throughput with the band at the bottom, middle, top, or on every layer."""

from __future__ import annotations

import pytest

from bench.providers import BANDS, build_provider


@pytest.mark.parametrize("label", list(BANDS))
def test_band_placement(benchmark, base, workload, stamp, label: str) -> None:
    provider = build_provider("fastmid", base[0], "bf16", band=BANDS[label])
    batch = provider.batch(workload.step_examples(0), workload.pad_id)
    provider.train_step(batch)
    benchmark.pedantic(provider.train_step, args=(batch,), rounds=3, iterations=1)
    stamp(
        provider="fastmid",
        band=label,
        layers=f"{provider.layers[0]}-{provider.layers[-1]}",
        rank=provider.rank,
        dtype="bf16",
        tokens_per_s=workload.real_tokens(0) / benchmark.stats.stats.mean,
    )
