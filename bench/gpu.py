"""The GPU benchmark in one command: fastmid against PEFT LoRA on real model shapes.

``python -m bench.gpu`` (also ``fastmid bench --workloads gpu``) trains random-initialised
Llama-shaped models, built from their configs (nothing is downloaded), with every provider on
the same tokens, and writes ``bench/results/gpu/<device>.json`` and ``.md``:

- ``smollm2-135m`` and ``llama3.2-1b`` at 16,384 tokens per step, ``llama3-8b`` at 4,096;
  each step is whole synthetic examples (the first half of each a prompt without labels) of
  exactly that many real tokens.
- Providers (:data:`PROVIDERS`): ``fastmid`` (the patched model called as
  ``model(input_ids=..., attention_mask=..., labels=...)`` on the padded batch, as a user's own
  loop, HF Trainer or TRL calls it), ``fastmid_trainer`` (the trainer's packed row and loss),
  ``fastmid_trainer_gc`` (the same with fastmid's gradient checkpointing: the like-for-like
  memory twin of ``peft_all_gc``), ``peft_all``, ``peft_mid`` (fastmid's band through
  ``layers_to_transform``, budget-matched rank), ``peft_all_gc`` (non-reentrant gradient
  checkpointing), and ``peft_all_strong``/``peft_mid_strong``: PEFT as a strong user runs it,
  padding-free (transformers' ``DataCollatorWithFlattening``: one packed row, position ids
  restarting per example) with an attention that honours the packing (flash-attn where
  installed, else PyTorch's built-in varlen attention, else transformers' packed-sequence mask
  over SDPA) and Liger-Kernel's RoPE, RMSNorm, SwiGLU and fused linear cross-entropy where
  ``liger_kernel`` imports. Each strong row records which of these pieces ran, and why a
  missing one did not.
- Precision: bf16 weights, fp32 adapters and AdamW state, ``torch.autocast(bf16)``; LoRA
  dropout 0.05, alpha 128, targets q/k/v/o (the paper's setting,
  ``fastmid.engine.midblock.PAPER_*``).
- Steady state: warm-up steps (autotuning, JIT) are discarded, the timed steps run between two
  CUDA events with ``torch.cuda.synchronize`` only around the timed region, peak memory is
  ``max_memory_allocated`` reset before each provider is built (the shared frozen weights
  included, so rows compare like for like), and one extra step under ``torch.profiler`` gives
  the GPU-busy fraction (union of CUDA kernel intervals over the step's wall time; the
  profiler's own host overhead makes it a lower bound).
- One base model per shape: each provider gets a copy of the module tree that shares the
  frozen weight tensors (no second copy, nothing re-initialised), and is freed before the next.
- MFU: useful FLOPs (:func:`step_flops`, from the config: real tokens only, no recomputation)
  over the step time, against the card's nominal dense bf16 peak (``mfu``; null for an unknown
  card) and against an 8192³ bf16 matmul measured in the same run (``mfu_measured``).
- A time budget (``--budget-s``, 400 s on CUDA: with imports, 7 minutes at most): each
  shape gets a share of what is left in proportion to its estimated cost; a provider whose
  warm-up shows it cannot fit its share is skipped with the reason recorded, and a provider
  that runs out of memory records ``"oom": true``; the run goes on either way.
- The per-op table of ``bench.cuda_ops`` (fused vs unfused, host ms per call) is appended when
  the budget leaves room for it (its own process, killed at the deadline).

``--smoke`` runs tiny twins of the shapes on the CPU in fp32 (perf_counter instead of CUDA
events, no profiler) to prove the machinery; its files say SMOKE in their names and titles.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import itertools
import json
import math
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.machine import REPO_ROOT, machine_info
from fastmid.engine.loss import IGNORE_INDEX
from fastmid.engine.midblock import (
    PAPER_BAND,
    PAPER_DROPOUT,
    PAPER_RANK_BUDGET,
    PAPER_TARGETS,
    resolve_band,
    resolve_rank,
)
from fastmid.errors import UserError, report_user_error
from fastmid.fileio import write_text_atomic
from fastmid.recipe.config import PAPER_LR
from fastmid.recipe.data import Example, batch_to, collate_packed, collate_padded

PROG = "python -m bench.gpu"


@dataclass(frozen=True)
class ModelSpec:
    """A benchmarked shape: the architecture (a key of ``bench.estimate.real_configs``), the
    real tokens of one step, and the range of example lengths a step is drawn from."""

    config: str
    tokens: int
    lengths: tuple[int, int]


MODELS = {
    "smollm2-135m": ModelSpec("SmolLM2-135M", 16384, (256, 2048)),
    "llama3.2-1b": ModelSpec("Llama-3.2-1B", 16384, (256, 2048)),
    "llama3-8b": ModelSpec("Llama-3-8B", 4096, (256, 1024)),
}
# --smoke: every shape becomes the tiny twin of bench.providers.tiny_config on this step size.
SMOKE_STEP = (256, (16, 64))
SMOKE_VOCAB = 1024
SMOKE_LAYERS = 5

PROVIDERS = (
    "fastmid",
    "fastmid_trainer",
    "fastmid_trainer_gc",
    "peft_all",
    "peft_mid",
    "peft_all_gc",
    # Last: Liger patches the modeling module while they run (restored afterwards).
    "peft_all_strong",
    "peft_mid_strong",
)
# The providers every speed ratio is taken against.
SPEED_REFS = ("peft_all", "peft_mid", "peft_all_strong", "peft_mid_strong")
# Memory like for like: checkpointed providers against PEFT with checkpointing.
GC_PROVIDERS = ("fastmid_trainer_gc", "peft_all_gc")


def memory_ref(provider: str) -> str:
    """The provider whose peak memory ``provider``'s is compared with."""
    return "peft_all_gc" if provider in GC_PROVIDERS else "peft_all"


def device_slug(name: str) -> str:
    """File-name form of a device name: 'NVIDIA H100 80GB HBM3' → 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# --------------------------------------------------------------------------------------------
# FLOPs


def _linear_dims(config: Any) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear of one decoder block."""
    d = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    i = config.intermediate_size
    return {
        "q_proj": (d, q),
        "k_proj": (d, kv),
        "v_proj": (d, kv),
        "o_proj": (q, d),
        "gate_proj": (d, i),
        "up_proj": (d, i),
        "down_proj": (i, d),
    }


def step_flops(
    config: Any,
    lengths: list[int],
    head_tokens: int,
    layers: list[int],
    rank: int,
    targets: tuple[str, ...] = PAPER_TARGETS,
) -> int:
    """Useful FLOPs of one LoRA training step on examples of ``lengths`` tokens: the matmuls and
    attention products the algorithm cannot avoid, counted as ``FlopCounterMode`` counts them.

    Every block runs forward. Backward runs from the lowest adapted layer up and computes input
    gradients only (the frozen weights need none); in that lowest layer the frozen q/k/v
    products and the adapters of q/k/v need no input gradient either (their input does not
    require one). Adapters: forward, both weight gradients, the gradients through B and A. The
    LM head runs forward and input-gradient backward on ``head_tokens`` positions. Attention
    counts the full n×n square per example (as FlopCounterMode and the PaLM MFU convention
    do), forward 4·n²·q and backward twice that; pads and recomputation are not useful work.
    """
    dims = _linear_dims(config)
    frozen = sum(i * o for i, o in dims.values())
    qkv = sum(i * o for n, (i, o) in dims.items() if n in ("q_proj", "k_proj", "v_proj"))
    q_width = dims["q_proj"][1]
    tokens = sum(lengths)
    attention = sum(4 * n * n * q_width for n in lengths)
    first = min(layers)
    total = 0
    for layer in range(config.num_hidden_layers):
        total += 2 * tokens * frozen + attention
        if layer < first:
            continue
        total += 2 * tokens * (frozen - (qkv if layer == first else 0)) + 2 * attention
    for layer in layers:
        for t in targets:
            k, n = dims[t]
            skip_dx = layer == first and t in ("q_proj", "k_proj", "v_proj")
            # Forward h = x·Aᵀ and h·Bᵀ; backward dB = dyᵀ·h, dh = dy·B, dA = dhᵀ·x and,
            # unless skipped, dx = dh·A.
            total += 2 * tokens * rank * (k + n) + 2 * tokens * rank * (2 * n + k)
            total += 0 if skip_dx else 2 * tokens * rank * k
    vocab_matmul = 2 * config.hidden_size * config.vocab_size
    return total + 2 * head_tokens * vocab_matmul


# --------------------------------------------------------------------------------------------
# Data: one step of synthetic examples, collated three ways


def make_examples(vocab: int, tokens: int, lengths: tuple[int, int], seed: int) -> list[Example]:
    """Examples of exactly ``tokens`` real tokens in all, lengths drawn from ``lengths``; the
    first half of each is a prompt (no labels). ``targets`` are shifted as fastmid's data
    module shifts them (targets[t] is the token at t+1 where it carries a label)."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    sizes: list[int] = []
    while sum(sizes) < tokens:
        sizes.append(min(rng.randint(*lengths), tokens - sum(sizes)))
    if len(sizes) > 1 and sizes[-1] < lengths[0] // 2:
        sizes[-2] += sizes.pop()  # no stub example at the end
    examples = []
    for n in sizes:
        ids = torch.randint(1, vocab, (n,), generator=g).tolist()
        prompt = n // 2
        targets = [ids[t + 1] if t + 1 >= prompt else IGNORE_INDEX for t in range(n - 1)]
        examples.append(Example(ids, [*targets, IGNORE_INDEX]))
    return examples


def hf_labels(example: Example) -> list[int]:
    """The example's labels as transformers takes them (it shifts them itself)."""
    return [IGNORE_INDEX, *example.targets[:-1]]


def padded_batch(examples: list[Example]) -> dict[str, torch.Tensor]:
    """HF's collator: right-padded (B, T) ids, attention mask, labels with pads ignored."""
    b = collate_padded(examples, pad_id=0)
    labels = F.pad(b["targets"], (1, 0), value=IGNORE_INDEX)[:, :-1]
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": labels}


def flattened_batch(examples: list[Example], flash_kwargs: bool) -> dict[str, Any]:
    """transformers' padding-free collation: one row, position ids restarting per example,
    and (``flash_kwargs``) the cumulative sequence lengths varlen kernels take."""
    from transformers import DataCollatorWithFlattening

    collate = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)
    return collate([{"input_ids": e.input_ids, "labels": hf_labels(e)} for e in examples])


# --------------------------------------------------------------------------------------------
# Providers


def shared_copy(base: nn.Module) -> nn.Module:
    """A copy of ``base``'s module tree that shares every parameter and buffer tensor."""
    memo = {id(t): t for t in itertools.chain(base.parameters(), base.buffers())}
    return copy.deepcopy(base, memo)


@dataclass
class Built:
    """One provider ready to train: its model, optimizer, batch and loss."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[], torch.Tensor]
    autocast: Callable[[], contextlib.AbstractContextManager]
    layers: list[int]
    rank: int
    # Positions the step computes (real tokens plus pads) and where the LM head runs.
    executed_tokens: int
    head_tokens: int
    pieces: dict[str, Any] = field(default_factory=dict)
    restore: Callable[[], None] | None = None

    def step(self) -> torch.Tensor:
        """One optimizer step: forward, backward, AdamW, gradients released."""
        with self.autocast():
            loss = self.loss()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def _on(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _band(num_layers: int) -> tuple[list[int], int]:
    layers = resolve_band(PAPER_BAND, num_layers)
    return layers, resolve_rank(None, PAPER_RANK_BUDGET, num_layers, len(layers))


def _build_fastmid(base, examples, device, autocast, packed: bool, gc_on: bool) -> Built:
    from fastmid.engine.loss import forward_loss
    from fastmid.engine.midblock import MidBlockConfig, adapter_parameters
    from fastmid.engine.models import prepare_model

    model = shared_copy(base)
    # As fastmid train sets a model up (adapters, attention for packed rows, Liger where
    # installed); the engine case then calls it like any HF model.
    state = prepare_model(model, MidBlockConfig(gradient_checkpointing=gc_on), device)
    optimizer = torch.optim.AdamW(adapter_parameters(model), lr=PAPER_LR)
    labels = sum(e.num_loss_tokens for e in examples)
    if packed:
        # The trainer's move: cu_seqlens stays on the host, so no forward reads the device.
        batch = batch_to(collate_packed(examples), device)

        def loss() -> torch.Tensor:
            loss_sum, _ = forward_loss(model, batch)
            return loss_sum / labels

        executed = sum(len(e) for e in examples)
    else:
        batch = _on(padded_batch(examples), device)
        loss = lambda: model(**batch, use_cache=False).loss
        executed = batch["input_ids"].numel()
    pieces = {
        "attention": model.config._attn_implementation,
        "kernel_path": os.environ.get("FASTMID_KERNEL_PATH", "default"),
        "liger_frozen_blocks": device.type == "cuda" and find_spec("liger_kernel") is not None,
    }
    return Built(
        model, optimizer, loss, autocast, list(state.layers), state.rank, executed, labels, pieces
    )


def _build_peft(base, examples, device, autocast, band: bool, gc_on: bool) -> Built:
    from bench.providers import peft_model

    num_layers = base.config.num_hidden_layers
    layers, rank = _band(num_layers) if band else (list(range(num_layers)), PAPER_RANK_BUDGET)
    model = peft_model(shared_copy(base), rank, layers if band else None, gc=gc_on).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=PAPER_LR)
    batch = _on(padded_batch(examples), device)
    loss = lambda: model(**batch, use_cache=False).loss
    executed = batch["input_ids"].numel()
    # HF's loss computes the logits of every position, pads included.
    return Built(model, optimizer, loss, autocast, layers, rank, executed, executed)


# Name under which the bench registers PyTorch's varlen attention with transformers.
TORCH_VARLEN = "bench_torch_varlen"


def _varlen_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu: torch.Tensor,
    n: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal ``torch.nn.attention.varlen.varlen_attn`` on (T, H, D) tensors, across the
    releases' signatures (``window_size=(-1, 0)`` or ``is_causal``; GQA in the kernel or by
    repeating the key/value heads; a softmax scale taken or folded into q)."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    kwargs: dict[str, Any] = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            reps = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(reps, dim=1), v.repeat_interleave(reps, dim=1)
    if scale is not None:
        if "scale" in params:
            kwargs["scale"] = scale
        else:
            q = q * (scale * q.shape[-1] ** 0.5)
    return varlen_attn(q, k, v, cu, cu, n, n, **kwargs)


def _torch_varlen_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature over PyTorch's varlen kernel: (1, H, T, D) packed
    rows with the collator's ``cu_seq_lens_q``/``max_length_q`` (no mask, no host sync)."""
    del module, attention_mask, dropout  # Llama trains without attention dropout
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    cu, n = kwargs["cu_seq_lens_q"].to(torch.int32), int(kwargs["max_length_q"])
    return _varlen_call(q, k, v, cu, n, scaling).unsqueeze(0), None


def _torch_varlen_works(device: torch.device) -> str | None:
    """None when PyTorch's varlen attention runs forward and backward here, else why not."""
    if device.type != "cuda":
        return "torch varlen_attn: needs CUDA"
    if find_spec("torch.nn.attention.varlen") is None:
        return f"torch varlen_attn: not in torch {torch.__version__}"
    try:
        q, k, v = (
            torch.randn(64, h, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
            for h in (4, 2, 2)
        )
        cu = torch.tensor([0, 24, 64], device=device, dtype=torch.int32)
        _varlen_call(q, k, v, cu, 40).float().sum().backward()
        torch.cuda.synchronize()
    except Exception as err:  # any failure means: not usable on this machine
        return f"torch varlen_attn: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
    return None


def _strong_attention(model: nn.Module, device: torch.device) -> tuple[str, list[str]]:
    """Set the best attention for packed rows a PEFT user has here; (its name, why others
    were not used)."""
    missing = []
    if device.type == "cuda" and find_spec("flash_attn") is not None:
        model.set_attn_implementation("flash_attention_2")
        return "flash_attention_2", missing
    missing.append("flash_attn: " + ("not installed" if device.type == "cuda" else "needs CUDA"))
    why = _torch_varlen_works(device)
    if why is None:
        from transformers import AttentionInterface

        AttentionInterface.register(TORCH_VARLEN, _torch_varlen_attention)
        model.set_attn_implementation(TORCH_VARLEN)
        return "torch_varlen_attn", missing
    missing.append(why)
    # transformers' own padding-free fallback: a block-diagonal mask from the position ids.
    return "sdpa+packed_mask", missing


@contextlib.contextmanager
def _restorable(module: Any) -> Iterator[Callable[[], None]]:
    """Yields a function that puts ``module``'s globals and its classes' attributes back as
    they were on entry (Liger patches the modeling module, not just the model instance)."""
    saved = dict(vars(module))
    classes = {c: dict(vars(c)) for c in saved.values() if isinstance(c, type)}

    def restore() -> None:
        for name in set(vars(module)) - set(saved):
            delattr(module, name)
        for name, value in saved.items():
            if vars(module).get(name) is not value:
                setattr(module, name, value)
        for cls, attrs in classes.items():
            for name in set(vars(cls)) - set(attrs):
                with contextlib.suppress(AttributeError, TypeError):
                    delattr(cls, name)
            for name, value in attrs.items():
                if vars(cls).get(name) is not value:
                    with contextlib.suppress(AttributeError, TypeError):
                        setattr(cls, name, value)

    yield restore


def _strong_liger(model: nn.Module, device: torch.device) -> tuple[str | None, Any, str | None]:
    """Liger-Kernel on ``model`` the way HF Trainer's ``use_liger_kernel`` applies it:
    (the kernels applied, a function undoing the module-level patches, why not applied)."""
    if device.type != "cuda":
        return None, None, "liger_kernel: needs CUDA"
    try:
        import liger_kernel.transformers as liger
    except ImportError:
        return None, None, "liger_kernel: not installed"
    apply = getattr(liger, "_apply_liger_kernel_to_instance", None)
    if apply is None:
        return None, None, "liger_kernel: no _apply_liger_kernel_to_instance in this version"
    with _restorable(sys.modules[type(model).__module__]) as restore:
        apply(model=model)
    return "rope,rms_norm,swiglu,fused_linear_cross_entropy", restore, None


def _build_strong(base, examples, device, autocast, band: bool) -> Built:
    from bench.providers import peft_model

    num_layers = base.config.num_hidden_layers
    layers, rank = _band(num_layers) if band else (list(range(num_layers)), PAPER_RANK_BUDGET)
    model = shared_copy(base)
    attention, missing = _strong_attention(model, device)
    liger, restore, why = _strong_liger(model, device)
    if why:
        missing.append(why)
    try:
        model = peft_model(model, rank, layers if band else None, gc=False).train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=PAPER_LR)
        flash_kwargs = attention != "sdpa+packed_mask"
        batch = _on(flattened_batch(examples, flash_kwargs), device)
    except BaseException:
        if restore is not None:
            restore()  # the module-level patches must not outlive a failed build
        raise
    loss = lambda: model(**batch, use_cache=False).loss
    tokens = sum(len(e) for e in examples)
    pieces = {
        "packing": "DataCollatorWithFlattening",
        "attention": attention,
        "liger": liger,
        "missing": missing,
    }
    # Liger's fused loss, like HF's, runs the head on every position (in chunks).
    return Built(model, optimizer, loss, autocast, layers, rank, tokens, tokens, pieces, restore)


def build(name: str, base: nn.Module, examples: list[Example], precision: str) -> Built:
    """Provider ``name`` on a weight-sharing copy of ``base``, its batch on base's device."""
    device = next(base.parameters()).device
    if precision == "bf16":
        autocast = lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext
    torch.manual_seed(0)
    if name.startswith("fastmid"):
        packed = name != "fastmid"
        return _build_fastmid(base, examples, device, autocast, packed, name.endswith("_gc"))
    if name.endswith("_strong"):
        return _build_strong(base, examples, device, autocast, band=name == "peft_mid_strong")
    return _build_peft(base, examples, device, autocast, name == "peft_mid", name.endswith("_gc"))


# --------------------------------------------------------------------------------------------
# Measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], Any], n: int, device: torch.device) -> list[float]:
    """Seconds of each of ``n`` consecutive steps: CUDA events on a GPU (one synchronize
    after the last), perf_counter elsewhere."""
    if device.type != "cuda":
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            step()
            out.append(time.perf_counter() - t0)
        return out
    events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
    sync(device)
    events[0].record()
    for i in range(n):
        step()
        events[i + 1].record()
    sync(device)
    return [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(n)]


def gpu_busy_fraction(step: Callable[[], Any], device: torch.device) -> float:
    """Fraction of one step's wall time during which a CUDA kernel ran (profiler trace)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        step()
        sync(device)
        wall = time.perf_counter() - t0
    spans = [
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == DeviceType.CUDA
    ]
    return min(covered(spans) / 1e6 / wall, 1.0)


def covered(spans: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals (kernels on several streams overlap:
    each instant counts once)."""
    busy, end = 0.0, -math.inf
    for s, e in sorted(spans):
        if e > end:
            busy += e - max(s, end)
            end = e
    return busy


def matmul_tflops(device: torch.device, smoke: bool) -> float:
    """Measured dense matmul rate: 8192³ bf16 on a GPU, 512³ fp32 for the smoke run."""
    from bench.measure import matmul_peak

    if device.type == "cuda":
        return matmul_peak(torch.bfloat16, n=8192, reps=10) / 1e12
    return matmul_peak(torch.float32, n=512 if smoke else 2048, reps=5) / 1e12


def _peak_reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        from fastmid.memory import reset_peak_rss

        reset_peak_rss()


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    from fastmid.memory import peak_rss_bytes

    return peak_rss_bytes() / 2**30


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


@dataclass
class Budget:
    """The wall-clock deadline and how much of it a part of the run may use."""

    deadline: float

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def measure(
    name: str,
    make: Callable[[], Built],
    device: torch.device,
    warmup: int,
    steps: int,
    slot_end: float,
    budget: Budget,
    profile: bool,
) -> dict[str, Any]:
    """Build provider ``name`` with ``make``, run ``warmup`` discarded steps and up to
    ``steps`` timed ones: as many as fit before ``slot_end`` (this provider's share), at least
    one while the whole run's budget has room for it, none (the reason recorded) otherwise."""
    _peak_reset(device)
    row: dict[str, Any] = {"provider": name, "oom": False}
    built = None
    failure: BaseException | None = None
    try:
        t0 = time.perf_counter()
        built = make()
        row["build_s"] = time.perf_counter() - t0
        row.update(layers=f"{built.layers[0]}-{built.layers[-1]}", rank=built.rank)
        row.update(executed_tokens=built.executed_tokens, pieces=built.pieces)
        warm = []
        for i in range(warmup):
            t = time.perf_counter()
            loss = built.step()
            if i == 0:
                row["loss0"] = float(loss)  # before any update: every provider's start
            sync(device)
            warm.append(time.perf_counter() - t)
        row["warmup_s"] = warm
        # The last warm-up step is past autotuning and compilation: what a timed step costs.
        per_step = warm[-1]
        after = per_step * int(profile)
        n = min(steps, int((slot_end - time.perf_counter() - after) / per_step))
        if n < 1 and budget.left() > 3 * (per_step + after):
            n = 1
        if n < 1:
            row["skipped"] = (
                f"time budget: a warm step takes {per_step:.2f} s, "
                f"{max(budget.left(), 0):.1f} s of the run's budget are left"
            )
        else:
            times = time_steps(built.step, n, device)
            row.update(steps=n, step_s=times, step_s_median=statistics.median(times))
            row["step_s_mean"] = sum(times) / n
            row["peak_gib"] = _peak_gib(device)
            if profile:
                try:
                    row["gpu_busy"] = gpu_busy_fraction(built.step, device)
                except Exception as err:  # the profiler is a diagnostic: record it, go on
                    row["gpu_busy_error"] = f"{type(err).__name__}: {err}"[:200]
    except Exception as err:
        failure = err
    if failure is not None:
        if _is_oom(failure):
            row["oom"] = True
            row["peak_gib"] = _peak_gib(device)
        else:
            row["error"] = f"{type(failure).__name__}: {str(failure).splitlines()[0][:300]}"
        failure = None  # its traceback holds the step's tensors
    if built is not None and built.restore is not None:
        built.restore()
    built = None
    _peak_reset(device)
    return row


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class Options:
    smoke: bool = False
    # None: every model (one, the first, with --smoke).
    models: tuple[str, ...] | None = None
    providers: tuple[str, ...] = PROVIDERS
    out: Path | None = None
    budget_s: float | None = None
    warmup: int | None = None
    steps: int | None = None
    ops: bool = True


def _config(key: str, smoke: bool) -> Any:
    from bench.estimate import real_configs
    from bench.providers import tiny_config

    if smoke:
        cfg = tiny_config(SMOKE_VOCAB)
        # The band (0.2, 0.8) of 5 layers is 1-3: rank 106, narrower than every linear.
        cfg.num_hidden_layers = SMOKE_LAYERS
        # Wider than HF's 0.02 so that the random model's loss depends on its inputs: the
        # step-0 agreement check then sees a token attending across an example boundary.
        cfg.initializer_range = 0.2
        return cfg
    return real_configs()[MODELS[key].config]


def build_base(config: Any, device: torch.device, precision: str) -> nn.Module:
    """The random-initialised model, built on ``device`` directly, every weight frozen."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.requires_grad_(False)
    return model.train()


def _estimate_s(config: Any, tokens: int, n_providers: int, steps: int, tflops: float) -> float:
    """A pessimistic guess of one shape's wall time before anything ran: every provider's
    steps at a quarter of the measured matmul rate, plus building the model."""
    layers = list(range(config.num_hidden_layers))
    flops = step_flops(config, [tokens], tokens, layers, PAPER_RANK_BUDGET)
    step = flops / (0.25 * tflops * 1e12)
    params = config.num_hidden_layers * sum(i * o for i, o in _linear_dims(config).values())
    return n_providers * steps * step * 1.5 + params / 1e9 * 2.0


def run(opts: Options, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every selected model × provider, within the budget; the results as JSON-ready data."""
    t_start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not opts.smoke else "cpu")
    if device.type != "cuda" and not opts.smoke:
        raise UserError("no CUDA device: run the GPU benchmark on a GPU, or --smoke to test it")
    precision = "fp32" if opts.smoke else "bf16"
    warmup = opts.warmup if opts.warmup is not None else (1 if opts.smoke else 2)
    steps = opts.steps if opts.steps is not None else (2 if opts.smoke else 5)
    budget_s = opts.budget_s if opts.budget_s is not None else (300.0 if opts.smoke else 400.0)
    models = opts.models or (tuple(MODELS)[:1] if opts.smoke else tuple(MODELS))
    info = machine_info()
    from bench.machine import bf16_peak_tflops

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else info["cpu"]
    nominal = bf16_peak_tflops(name) if device.type == "cuda" else None
    measured = matmul_tflops(device, opts.smoke)
    log(f"[gpu] {name}: measured matmul {measured:.3g} TFLOP/s, nominal bf16 {nominal}")
    # The per-op table runs last, in what the models leave of the budget (at most this much).
    ops_reserve = 100.0 if opts.ops and device.type == "cuda" else 0.0
    budget = Budget(t_start + budget_s - ops_reserve - 5.0)
    results: dict[str, Any] = {
        "smoke": opts.smoke,
        "commit": info["commit"],
        "dirty": info["dirty"],
        "device": {
            "name": name,
            "slug": "smoke-cpu" if opts.smoke else device_slug(name),
            "type": device.type,
            "nominal_bf16_tflops": nominal,
            "matmul_tflops_measured": measured,
            "matmul": "8192^3 bf16" if device.type == "cuda" else "512^3 fp32",
        },
        "versions": _versions(info),
        "settings": {
            "precision": "bf16 weights, fp32 adapters, autocast bf16"
            if precision == "bf16"
            else "fp32",
            "lora": {"alpha": 128.0, "dropout": PAPER_DROPOUT, "targets": list(PAPER_TARGETS)},
            "band": list(PAPER_BAND),
            "warmup": warmup,
            "steps": steps,
            "budget_s": budget_s,
            "kernel_path": os.environ.get("FASTMID_KERNEL_PATH", "default"),
        },
        "models": [],
        "rows": [],
    }
    specs = {k: (_config(k, opts.smoke), _step_size(k, opts.smoke)) for k in models}
    per_step = warmup + steps + 1
    estimates = {
        k: _estimate_s(cfg, size[0], len(opts.providers), per_step, measured)
        for k, (cfg, size) in specs.items()
    }
    for i, key in enumerate(models):
        config, (tokens, lengths) = specs[key]
        share = estimates[key] / sum(estimates[k] for k in models[i:])
        model_end = time.perf_counter() + budget.left() * share
        examples = make_examples(config.vocab_size, tokens, lengths, seed=i)
        info_row: dict[str, Any] = {
            "model": key,
            "config": _describe(config),
            "tokens_per_step": tokens,
            "examples": len(examples),
            "lengths": [len(e) for e in examples],
            "labelled_tokens": sum(e.num_loss_tokens for e in examples),
            "padded_shape": [len(examples), max(len(e) for e in examples)],
            "estimate_s": estimates[key],
            "share_s": model_end - time.perf_counter(),
        }
        results["models"].append(info_row)
        if budget.left() < 0.2 * estimates[key]:
            reason = f"time budget: {budget.left():.0f} s left, about {estimates[key]:.0f} s needed"
            info_row["skipped"] = reason
            log(f"[gpu] {key}: skipped ({reason})")
            for p in opts.providers:
                row = {"model": key, "provider": p, "oom": False, "skipped": reason}
                _add_flops(row, config, examples, tokens, nominal, measured)
                results["rows"].append(row)
            continue
        t0 = time.perf_counter()
        base = build_base(config, device, precision)
        info_row["build_s"] = time.perf_counter() - t0
        log(f"[gpu] {key}: built in {info_row['build_s']:.1f} s; {len(examples)} examples")
        # Seconds a warm step of this shape took so far (the first provider's guess: a share).
        step_s = estimates[key] / len(opts.providers) / per_step
        for j, provider in enumerate(opts.providers):
            slot_end = time.perf_counter() + (model_end - time.perf_counter()) / (
                len(opts.providers) - j
            )
            if budget.left() < step_s * (warmup + 2):
                reason = f"time budget: {max(budget.left(), 0):.0f} s left"
                row = {"model": key, "provider": provider, "oom": False, "skipped": reason}
            else:
                row = measure(
                    provider,
                    lambda p=provider, b=base, ex=examples: build(p, b, ex, precision),
                    device,
                    warmup,
                    steps,
                    slot_end,
                    budget,
                    profile=device.type == "cuda",
                )
                row = {"model": key, **row}
                if row.get("warmup_s"):
                    step_s = row["warmup_s"][-1]
            _add_flops(row, config, examples, tokens, nominal, measured)
            results["rows"].append(row)
            log(f"[gpu] {key} {provider}: {_brief(row)}")
        del base
        _peak_reset(device)
    add_ratios(results["rows"])
    if opts.ops:
        results["cuda_ops"] = per_op_table(device, budget.deadline + ops_reserve - 5.0)
    results["wall_s"] = time.perf_counter() - t_start
    return results


def _step_size(key: str, smoke: bool) -> tuple[int, tuple[int, int]]:
    return SMOKE_STEP if smoke else (MODELS[key].tokens, MODELS[key].lengths)


def _describe(config: Any) -> dict[str, Any]:
    dims = _linear_dims(config)
    return {
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "intermediate": config.intermediate_size,
        "heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "q_width": dims["q_proj"][1],
        "vocab": config.vocab_size,
        "tied_embeddings": bool(config.tie_word_embeddings),
    }


def _add_flops(
    row: dict[str, Any],
    config: Any,
    examples: list[Example],
    tokens: int,
    nominal: float | None,
    measured: float,
) -> None:
    """tokens/s, FLOPs per token and both MFUs of a measured row (None where not measured)."""
    row["real_tokens"] = tokens
    row.setdefault("tokens_per_s", None)
    row.setdefault("mfu", None)
    row.setdefault("mfu_measured", None)
    row.setdefault("peak_gib", None)
    if "rank" not in row:
        return
    lo, hi = (int(x) for x in row["layers"].split("-"))
    labelled = sum(e.num_loss_tokens for e in examples)
    head = tokens if row["provider"].startswith("peft") else labelled
    lengths = [len(e) for e in examples]
    flops = step_flops(config, lengths, head, list(range(lo, hi + 1)), row["rank"])
    row["flops_per_token"] = flops / tokens
    if "step_s_mean" in row:
        row["tokens_per_s"] = tokens / row["step_s_mean"]
        achieved = flops / row["step_s_mean"] / 1e12
        row["tflops"] = achieved
        row["mfu"] = achieved / nominal if nominal else None
        row["mfu_measured"] = achieved / measured


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """``vs_<ref>``: tokens/s over the reference's on the same model; ``peak_vs_<ref>``: peak
    memory over the like-for-like reference's (:func:`memory_ref`)."""
    by = {(r["model"], r["provider"]): r for r in rows}
    for r in rows:
        for ref in SPEED_REFS:
            other = by.get((r["model"], ref))
            ok = other is not None and r.get("tokens_per_s") and other.get("tokens_per_s")
            r[f"vs_{ref}"] = r["tokens_per_s"] / other["tokens_per_s"] if ok else None
        ref = memory_ref(r["provider"])
        other = by.get((r["model"], ref))
        ok = other is not None and r.get("peak_gib") and other.get("peak_gib")
        r["peak_ref"] = ref
        r["peak_vs_ref"] = r["peak_gib"] / other["peak_gib"] if ok and not r["oom"] else None


def _brief(row: dict[str, Any]) -> str:
    if row.get("oom"):
        return "out of memory"
    if row.get("error"):
        return f"ERROR {row['error']}"
    if row.get("skipped"):
        return f"skipped ({row['skipped']})"
    return f"{row['tokens_per_s']:,.0f} tok/s, peak {row['peak_gib']:.2f} GiB"


def _versions(info: dict[str, Any]) -> dict[str, Any]:
    import importlib.metadata as md

    out = {k: info[k] for k in ("torch", "transformers", "peft", "python")}
    for pkg in ("triton", "liger_kernel", "flash_attn"):
        try:
            out[pkg] = md.version(pkg.replace("_", "-"))
        except md.PackageNotFoundError:
            out[pkg] = None
    out["cuda"] = torch.version.cuda
    return out


def per_op_table(device: torch.device, deadline: float) -> dict[str, Any]:
    """``python -m bench.cuda_ops`` in its own process group, killed at ``deadline``: the
    markdown table it printed (what it printed so far when stopped)."""
    if device.type != "cuda":
        return {"skipped": "no CUDA device"}
    left = deadline - time.perf_counter()
    if left < 20:
        return {"skipped": f"time budget: {max(left, 0):.0f} s left"}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "bench.cuda_ops"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=left)
        status: dict[str, Any] = {"returncode": proc.returncode}
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own children too (one per kernel path)
        out, err = proc.communicate()
        status = {"timed_out_after_s": left}
    lines = [ln for ln in out.splitlines() if ln.startswith("|")]
    status.update(seconds=time.perf_counter() - t0, table="\n".join(lines))
    if proc.returncode:
        status["stderr_tail"] = err.strip().splitlines()[-3:]
    return status


# --------------------------------------------------------------------------------------------
# Reports


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    return "–" if value is None else format(value * scale, spec)


def report_md(results: dict[str, Any]) -> str:
    """The report: what ran where, one table per model, the per-op table."""
    dev, v = results["device"], results["versions"]
    title = "GPU benchmark"
    if results["smoke"]:
        title = "SMOKE run of the GPU benchmark (tiny shapes on CPU, fp32): not a measurement"
    lines = [
        f"# {title}",
        "",
        f"- device: {dev['name']}; nominal dense bf16 {_fmt(dev['nominal_bf16_tflops'], '.0f')} "
        f"TFLOP/s; measured {dev['matmul']} matmul {dev['matmul_tflops_measured']:.3g} TFLOP/s",
        f"- commit {results['commit']}{' (dirty)' if results['dirty'] else ''}; "
        + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- {results['settings']['precision']}; LoRA alpha 128, dropout {PAPER_DROPOUT}, q/k/v/o; "
        f"{results['settings']['warmup']} warm-up + up to {results['settings']['steps']} timed "
        f"steps per provider; wall {results.get('wall_s', 0):.0f} s of a "
        f"{results['settings']['budget_s']:.0f} s budget",
        "- MFU: useful FLOPs (real tokens, no recomputation) per second over the nominal peak; "
        "MFU meas.: over the measured matmul. Peak ×: peak memory over PEFT's like for like "
        "(checkpointed rows against peft_all_gc, the others against peft_all).",
    ]
    if dev["type"] != "cuda":
        lines.append(
            "- On a CPU, peak GiB is the process's peak resident memory since the provider was "
            "built (fastmid.memory), Python and the libraries included: no memory comparison."
        )
    lines.append("")
    for m in results["models"]:
        rows = [r for r in results["rows"] if r["model"] == m["model"]]
        lines += [
            f"## {m['model']}: {m['tokens_per_step']:,} tokens per step "
            f"({m['examples']} examples, padded {m['padded_shape'][0]}x{m['padded_shape'][1]})",
            "",
        ]
        if m.get("skipped"):
            lines += [f"skipped: {m['skipped']}", ""]
            continue
        lines += [
            "| provider | tok/s | vs peft_all | vs peft_mid | vs peft_all_strong | "
            "vs peft_mid_strong | MFU | MFU meas. | peak GiB | peak × | GPU busy | loss0 | "
            "notes |",
            "|---" * 13 + "|",
        ]
        for r in rows:
            ratios = [_fmt(r.get(f"vs_{ref}"), ".2f") for ref in SPEED_REFS]
            lines.append(
                "| "
                + " | ".join(
                    [
                        r["provider"],
                        _fmt(r["tokens_per_s"], ",.0f"),
                        *ratios,
                        _fmt(r["mfu"], ".1%"),
                        _fmt(r["mfu_measured"], ".1%"),
                        _fmt(r["peak_gib"], ".2f"),
                        _fmt(r.get("peak_vs_ref"), ".2f"),
                        _fmt(r.get("gpu_busy"), ".0%"),
                        _fmt(r.get("loss0"), ".4f"),
                        _notes(r),
                    ]
                )
                + " |"
            )
        lines.append("")
    ops = results.get("cuda_ops")
    if ops is not None:
        lines += ["## Per-op table (`python -m bench.cuda_ops`)", ""]
        if ops.get("skipped"):
            lines.append(f"skipped: {ops['skipped']}")
        else:
            if ops.get("timed_out_after_s"):
                lines.append(f"stopped by the time budget after {ops['timed_out_after_s']:.0f} s")
            lines.append(ops.get("table") or "(no table printed)")
        lines.append("")
    return "\n".join(lines)


def _notes(r: dict[str, Any]) -> str:
    notes = []
    if r.get("oom"):
        notes.append("OUT OF MEMORY")
    for key in ("skipped", "error"):
        if r.get(key):
            notes.append(f"{key}: {r[key]}")
    p = r.get("pieces") or {}
    if "packing" in p:
        notes.append(f"attention {p['attention']}, liger {p['liger'] or 'off'}")
        if p["missing"]:
            notes.append("missing: " + "; ".join(p["missing"]))
    elif p:
        notes.append(f"attention {p['attention']}, kernels {p['kernel_path']}")
    if r.get("steps"):
        notes.append(f"{r['steps']} steps, layers {r['layers']} r={r['rank']}")
    return "; ".join(notes).replace("|", "/")


def write_reports(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """``<slug>.json`` and ``<slug>.md`` in ``out_dir`` (atomic writes)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = results["device"]["slug"]
    paths = [out_dir / f"{slug}.json", out_dir / f"{slug}.md"]
    write_text_atomic(paths[0], json.dumps(results, indent=1) + "\n")
    write_text_atomic(paths[1], report_md(results) + "\n")
    return paths


# --------------------------------------------------------------------------------------------
# Command line


def _names(values: list[str] | None, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    if not values:
        return known
    names = tuple(n for v in values for n in v.split(",") if n)
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise UserError(
            f"--{what}: unknown {bad[0] if bad else 'empty list'}; expected {','.join(known)}"
        )
    return names


def parse_options(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes on the CPU: proves the machinery"
    )
    parser.add_argument("--out", default=None, help="report directory (default bench/results/gpu)")
    parser.add_argument(
        "--models", nargs="+", help=f"of {','.join(MODELS)} (default: all; smoke: the first)"
    )
    parser.add_argument("--providers", nargs="+", help=f"of {','.join(PROVIDERS)} (default: all)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="wall-clock budget in seconds, model construction included (default 400; smoke 300)",
    )
    parser.add_argument("--warmup", type=int, default=None, help="discarded steps (default 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps, at most (default 5)")
    parser.add_argument("--no-ops", action="store_true", help="leave out the per-op table")
    args = parser.parse_args(argv)
    for name in ("warmup", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")
    if args.budget_s is not None and args.budget_s <= 0:
        raise UserError(f"--budget-s must be positive, got {args.budget_s}")
    return Options(
        smoke=args.smoke,
        models=_names(args.models, tuple(MODELS), "models") if args.models else None,
        providers=_names(args.providers, PROVIDERS, "providers"),
        out=Path(args.out) if args.out else None,
        budget_s=args.budget_s,
        warmup=args.warmup,
        steps=args.steps,
        ops=not args.no_ops,
    )


def command(opts: Options) -> int:
    """Run, write the reports, print the markdown; 1 when a provider failed (not OOM/skip)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and not opts.smoke:
        raise UserError("TRITON_INTERPRET is set: unset it, the benchmark times the real kernels")
    results = run(opts, log=lambda s: print(s, file=sys.stderr, flush=True))
    out = opts.out or REPO_ROOT / "bench" / "results" / "gpu"
    paths = write_reports(results, out)
    print(report_md(results))
    print(f"wrote {', '.join(str(p) for p in paths)} in {results['wall_s']:.0f} s")
    failed = [f"{r['model']} {r['provider']}" for r in results["rows"] if r.get("error")]
    if failed:
        print(f"{PROG}: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return command(parse_options(argv))
    except UserError as err:
        return report_user_error(PROG, err)


if __name__ == "__main__":
    sys.exit(main())
