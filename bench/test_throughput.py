"""End-to-end training step time per provider and precision, on identical batches."""

from __future__ import annotations

import pytest

from bench.providers import PROVIDERS, build_provider


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", PROVIDERS)
def test_train_step(benchmark, base, workload, stamp, name: str, dtype: str) -> None:
    provider = build_provider(name, base[0], dtype)
    batches = [provider.batch(workload.step_examples(i), workload.pad_id) for i in range(4)]
    it = iter(batches)
    provider.train_step(next(it))  # warm-up: optimizer state, allocator, autotuning

    loss = benchmark.pedantic(lambda: provider.train_step(next(it)), rounds=3, iterations=1)
    assert loss.isfinite()
    real = sum(workload.real_tokens(i) for i in range(1, 4))
    stamp(
        provider=name,
        dtype=dtype,
        shape=" ".join("x".join(map(str, workload.padded_shape(i))) for i in range(1, 4)),
        real_tokens_per_step=real / 3,
        tokens_per_s=real / 3 / benchmark.stats.stats.mean,
    )
