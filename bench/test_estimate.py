"""ESTIMATED CUDA peak training memory for real model shapes (FakeTensor trace, no weights)."""

from __future__ import annotations

import pytest

from bench.conftest import quick
from bench.estimate import estimate_peak, real_configs

MODELS = ("OLMo2-1B",) if quick() else ("OLMo2-1B", "OLMo2-7B", "OLMo2-13B", "Llama-3-8B")


@pytest.mark.parametrize("name", ["peft_all", "peft_all_gc", "peft_mid", "fastmid"])
@pytest.mark.parametrize("model", MODELS)
def test_estimated_cuda_peak(benchmark, stamp, model: str, name: str) -> None:
    config = real_configs()[model]
    batch, seq = (2, 256) if quick() else (8, 1024)
    est = benchmark.pedantic(
        estimate_peak,
        args=(config, name),
        kwargs={"batch_size": batch, "seq_len": seq},
        rounds=1,
        iterations=1,
    )
    # bf16 weights: 2 bytes per parameter of the architecture, whatever the provider.
    assert est.weights > 2 * config.num_hidden_layers * config.hidden_size**2
    stamp(
        estimate=True,
        estimated_model=model,
        provider=name,
        shape=f"{batch}x{seq}",
        weights_bytes=est.weights,
        optimizer_bytes=est.optimizer,
        step_peak_bytes=est.peak_step,
        peak_bytes=est.peak,
    )
