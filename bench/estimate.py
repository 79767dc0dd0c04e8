"""Estimated CUDA training memory for real model shapes, without the weights or a GPU.

The tracing itself is ``fastmid.recipe.estimate`` (FakeTensor model, live-storage tracker, fastmid's
packed step as ``fastmid train`` runs it); this module adds the published configs, the PEFT
providers and ``fastmid`` with activation checkpointing, for the benchmark's memory report.
These are estimates of ``torch.cuda.max_memory_allocated``: no allocator rounding, no CUDA
context, no workspace of cuBLAS/attention kernels.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from bench.providers import SPECS, ProviderSpec, peft_model
from fastmid.engine.midblock import PAPER_BAND
from fastmid.recipe.estimate import (
    Estimate,
    FastmidStepTracer,
    LiveStorageTracker,
    fake_mode,
    trace_step,
)

__all__ = ["Estimate", "LiveStorageTracker", "estimate_peak", "real_configs", "spec"]


def real_configs() -> dict[str, Any]:
    """Published architectures of the models the paper tunes, the embedded default's
    (SmolLM2-135M) and two Llamas, as HF configs."""
    from transformers import LlamaConfig, Olmo2Config

    olmo = dict(vocab_size=100352, max_position_embeddings=4096, rope_theta=500000.0)
    return {
        "SmolLM2-135M": LlamaConfig(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=8192,
            rope_theta=100000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
        ),
        # Without the llama3 RoPE scaling of the release: it changes no shape and no cost.
        "Llama-3.2-1B": LlamaConfig(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            max_position_embeddings=131072,
            rope_theta=500000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
        ),
        "OLMo2-1B": Olmo2Config(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=16,
            num_key_value_heads=16,
            **olmo,
        ),
        "OLMo2-7B": Olmo2Config(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            **olmo,
        ),
        "OLMo2-13B": Olmo2Config(
            hidden_size=5120,
            intermediate_size=13824,
            num_hidden_layers=40,
            num_attention_heads=40,
            num_key_value_heads=40,
            **olmo,
        ),
        "Llama-3-8B": LlamaConfig(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=8192,
            rope_theta=500000.0,
        ),
    }


def _peft_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"], use_cache=False).loss


# fastmid with its own activation checkpointing of the band and the blocks above it: what the
# band gives when memory is the goal (estimated only).
FASTMID_GC = ProviderSpec(
    "fastmid_gc", "fastmid + gradient checkpointing of the band and above", packed=True
)


def spec(provider: str) -> ProviderSpec:
    """The benchmark provider named ``provider``, or :data:`FASTMID_GC`."""
    return FASTMID_GC if provider == FASTMID_GC.name else SPECS[provider]


def estimate_peak(
    config: Any,
    provider: str,
    batch_size: int = 8,
    seq_len: int = 1024,
    loss_fraction: float = 0.5,
    band: Any = PAPER_BAND,
    quantize: str = "none",
) -> Estimate:
    """Estimated CUDA peak bytes of one bf16-mixed training step of ``provider`` on ``config``.

    ``provider`` is one of the benchmark's providers, or ``fastmid_gc``: fastmid with its own
    activation checkpointing of the band and the blocks above it.

    The batch holds ``batch_size`` full sequences of ``seq_len`` tokens: padded (B, T) for the
    PEFT providers (no pad at all, their best case), one packed row of B·T tokens for fastmid
    with ``loss_fraction`` of the positions carrying a label. ``quantize`` ("nf4", "int8")
    stores fastmid's frozen decoder linears quantized (fastmid.engine.quantize).
    """
    from transformers import AutoModelForCausalLM

    from fastmid.engine.midblock import (
        PAPER_RANK_BUDGET,
        MidBlockConfig,
        resolve_band,
        resolve_rank,
    )

    if spec(provider).packed:
        adapter = MidBlockConfig(
            band=band, gradient_checkpointing=provider == FASTMID_GC.name, quantize=quantize
        )
        return FastmidStepTracer(config, adapter)(batch_size * seq_len, seq_len, loss_fraction)
    t0 = time.perf_counter()
    num_layers = config.num_hidden_layers
    if provider == "peft_mid":
        layers = resolve_band(band, num_layers)
        rank = resolve_rank(None, PAPER_RANK_BUDGET, num_layers, len(layers))
    else:
        layers, rank = None, PAPER_RANK_BUDGET
    with fake_mode():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).train()
        model = peft_model(model, rank, layers, gc=provider == "peft_all_gc").train()
        batch = {"input_ids": torch.zeros(batch_size, seq_len, dtype=torch.long)}
        return trace_step(model, _peft_loss, batch, t0)
