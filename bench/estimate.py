"""Estimated CUDA training memory for real model shapes, without the weights or a GPU.

The model is built and one training step traced under ``FakeTensorMode``: every tensor has a
shape, dtype and storage size but no data, so a 13B model costs nothing to "load". A small
``TorchDispatchMode`` watches every op's outputs and keeps the set of live storages (weak
references, swept after each op), which gives the peak of live bytes during forward + backward.
AdamW's two fp32 moments per trainable parameter are added analytically (they live from the
first step on). These are estimates of ``torch.cuda.max_memory_allocated``: no allocator
rounding, no CUDA context, no workspace of cuBLAS/attention kernels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from bench.providers import SPECS, ProviderSpec, peft_model
from fastmid.engine.midblock import PAPER_BAND


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


class LiveStorageTracker(TorchDispatchMode):
    """Peak bytes of live tensor storages across every op run under it.

    Storages known before tracing (weights, buffers) are a constant base. Each op's output
    storages are added once (views and in-place results share a storage and are not counted
    twice); storages whose last reference died are swept out before each new allocation is
    counted, so the peak is the live set right after the largest allocation.
    """

    def __init__(self, base_tensors: list[torch.Tensor]) -> None:
        super().__init__()
        self.base_keys = {StorageWeakRef(t.untyped_storage()).cdata for t in base_tensors}
        self.base_bytes = sum(
            {
                StorageWeakRef(t.untyped_storage()).cdata: t.untyped_storage().nbytes()
                for t in base_tensors
            }.values()
        )
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def _sweep(self) -> None:
        dead = [k for k, (ref, _) in self.live.items() if ref.expired()]
        for k in dead:
            self.current -= self.live.pop(k)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        fresh = []
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref.cdata not in self.live and ref.cdata not in self.base_keys:
                    fresh.append((ref, t.untyped_storage().nbytes()))
        if fresh:
            self._sweep()
            for ref, nbytes in fresh:
                if ref.cdata not in self.live:
                    self.live[ref.cdata] = (ref, nbytes)
                    self.current += nbytes
            self.peak = max(self.peak, self.current)
        return out


@dataclass
class Estimate:
    """Estimated peak bytes of one training step, split into what is always there and the rest."""

    weights: int
    trainable_params: int
    optimizer: int
    peak_step: int
    seconds: float

    @property
    def peak(self) -> int:
        return self.weights + self.optimizer + self.peak_step


def _label_only_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """fastmid's label-only LM head with the label positions known in advance.

    ``fastmid.engine.loss.forward_loss`` finds them with ``nonzero``, whose output size depends on
    data and so cannot be traced without data; here they come as ``batch["label_index"]``.
    """
    body = model.get_decoder()
    hidden = body(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
    )[0]
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["label_index"])
    logits = model.get_output_embeddings()(picked).float()
    return F.cross_entropy(logits, batch["labels"], reduction="sum") / batch["labels"].numel()


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
        apply_midblock,
        resolve_band,
        resolve_rank,
    )
    from fastmid.engine.quantize import stored_tensors

    t0 = time.perf_counter()
    tokens = batch_size * seq_len
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    # The mode remembers every tensor it creates through a weak reference (a cache for
    # converting real tensors, which never happens here). Module.to() must swap fake parameters
    # and torch refuses to swap a tensor that has weak references, so PEFT's own .to() calls on
    # its new adapters would fail: this mode instance keeps no such memo.
    fake.fake_tensor_converter.set_tensor_memo = lambda t, v: None
    with fake:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).train()
        num_layers = config.num_hidden_layers
        if spec(provider).packed:
            # Dropout off: fastmid's kernels redraw the mask from a seed and never store it
            # (the trace cannot draw the seed, a data-dependent .item()); only the transient
            # masked copy of x inside one adapter call is left out.
            cfg = MidBlockConfig(
                band=band,
                dropout=0.0,
                gradient_checkpointing=provider == FASTMID_GC.name,
                quantize=quantize,
            )
            apply_midblock(model, cfg)
            loss_fn = _label_only_loss
            n_labels = int(tokens * loss_fraction)
            batch = {
                "input_ids": torch.zeros(1, tokens, dtype=torch.long),
                "position_ids": torch.arange(seq_len).repeat(batch_size)[None],
                "label_index": torch.arange(n_labels) * (tokens // n_labels),
                "labels": torch.zeros(n_labels, dtype=torch.long),
            }
        else:
            if provider == "peft_mid":
                layers = resolve_band(band, num_layers)
                rank = resolve_rank(None, PAPER_RANK_BUDGET, num_layers, len(layers))
            else:
                layers, rank = None, PAPER_RANK_BUDGET
            model = peft_model(model, rank, layers, gc=provider == "peft_all_gc").train()
            loss_fn = _peft_loss
            batch = {"input_ids": torch.zeros(batch_size, seq_len, dtype=torch.long)}
        params = list(model.parameters())
        trainable = [p for p in params if p.requires_grad]
        stored = [t for p in params for t in stored_tensors(p)]
        weights = list({StorageWeakRef(t.untyped_storage()).cdata: t for t in stored}.values())
        tracker = LiveStorageTracker([*stored, *model.buffers(), *batch.values()])
        with tracker, torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model, batch)
        with tracker:
            loss.backward()
        del loss
    n_train = sum(p.numel() for p in trainable)
    return Estimate(
        weights=sum(w.untyped_storage().nbytes() for w in weights),
        trainable_params=n_train,
        # AdamW: exp_avg and exp_avg_sq in the parameters' dtype (fp32 adapters).
        optimizer=2 * sum(p.numel() * p.element_size() for p in trainable),
        peak_step=tracker.peak,
        seconds=time.perf_counter() - t0,
    )
