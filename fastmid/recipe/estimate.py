"""Estimated CUDA training memory of one step, without the weights or a GPU, and the
micro-batch size ``--batch-tokens auto`` picks from it.

The model is built from its config and one training step traced under ``FakeTensorMode``:
every tensor has a shape, dtype and storage size but no data, so a 13B model costs nothing to
"load". :class:`LiveStorageTracker` watches every op's outputs and keeps the set of live
storages (weak references, swept after each op), which gives the peak of live bytes during
forward + backward. AdamW's two fp32 moments per trainable parameter are added analytically
(they live from the first step on). These are estimates of ``torch.cuda.max_memory_allocated``:
no allocator rounding, no CUDA context, no workspace of cuBLAS/attention kernels, which is why
:func:`fit_batch_tokens` keeps headroom.

fastmid's own step is traced through the trainer's pieces (``prepare_model``, the packed
collator, ``forward_loss``), so the estimate follows what ``fastmid train`` runs; the benchmark
(``bench/estimate.py``) adds the PEFT providers and reports.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fastmid.errors import UserError

#: Share of the free device memory ``--batch-tokens auto`` leaves unused: the estimate has no
#: allocator rounding or fragmentation, no cuBLAS/attention workspaces and no CUDA context.
HEADROOM = 0.15
# The two micro-batch sizes whose traces give the per-token slope of the peak (tracing costs
# the same at any size: no data is computed).
_PROBE_TOKENS = (4096, 8192)


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


def fake_mode() -> FakeTensorMode:
    """A FakeTensorMode that real tensors may enter and that models can be built in."""
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    # The mode remembers every tensor it creates through a weak reference (a cache for
    # converting real tensors, which never happens here). Module.to() must swap fake parameters
    # and torch refuses to swap a tensor that has weak references, so PEFT's own .to() calls on
    # its new adapters would fail: this mode instance keeps no such memo.
    fake.fake_tensor_converter.set_tensor_memo = lambda t, v: None
    return fake


def trace_step(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, dict[str, Any]], torch.Tensor],
    batch: dict[str, Any],
    t0: float,
) -> Estimate:
    """Trace one bf16-autocast forward + backward of ``loss_fn(model, batch)`` (inside the
    fake mode the model was built in) and return its estimate."""
    from fastmid.engine.quantize import stored_tensors

    params = list(model.parameters())
    for p in params:
        p.grad = None
    trainable = [p for p in params if p.requires_grad]
    stored = [t for p in params for t in stored_tensors(p)]
    weights = list({StorageWeakRef(t.untyped_storage()).cdata: t for t in stored}.values())
    tensors = [v for v in batch.values() if isinstance(v, torch.Tensor)]
    tracker = LiveStorageTracker([*stored, *model.buffers(), *tensors])
    with tracker, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(model, batch)
    with tracker:
        loss.backward()
    del loss
    for p in params:
        p.grad = None
    return Estimate(
        weights=sum(w.untyped_storage().nbytes() for w in weights),
        trainable_params=sum(p.numel() for p in trainable),
        # AdamW: exp_avg and exp_avg_sq in the parameters' dtype (fp32 adapters).
        optimizer=2 * sum(p.numel() * p.element_size() for p in trainable),
        peak_step=tracker.peak,
        seconds=time.perf_counter() - t0,
    )


def packed_step_batch(tokens: int, seq_len: int, loss_fraction: float = 0.5) -> dict[str, Any]:
    """The trainer's packed batch of ``tokens`` tokens in examples of ``seq_len`` (the last
    one shorter), ``loss_fraction`` of each example's positions labelled. Call it inside the
    fake mode: only ``cu_seqlens``, which stays on the host, is built as a real tensor."""
    from fastmid.engine.loss import IGNORE_INDEX
    from fastmid.recipe.data import Example, collate_packed

    lengths = [seq_len] * (tokens // seq_len) + ([tokens % seq_len] if tokens % seq_len else [])
    examples = []
    for n in lengths:
        labelled = max(1, int(n * loss_fraction)) if n > 1 else 0
        examples.append(Example([0] * n, [IGNORE_INDEX] * (n - labelled) + [0] * labelled))
    with unset_fake_temporarily():
        batch = collate_packed(examples)
    # Everything but the host-side boundaries becomes a fake (device) tensor.
    return {k: v if k == "cu_seqlens" else torch.empty_like(v).copy_(v) for k, v in batch.items()}


class FastmidStepTracer:
    """Builds a fake copy of a model from ``config``, patched as ``fastmid train`` patches it
    (``adapter``: a MidBlockConfig), and traces one packed step at any micro-batch size."""

    def __init__(self, config: Any, adapter: Any) -> None:
        import dataclasses

        from transformers import AutoModelForCausalLM

        from fastmid.engine.models import prepare_model

        self.t0 = time.perf_counter()
        self.fake = fake_mode()
        config = copy.deepcopy(config)
        with self.fake:
            torch.manual_seed(0)
            self.model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).train()
            # Dropout off: fastmid's kernels redraw the mask from a seed and never store it
            # (the trace cannot draw the seed, a data-dependent .item()); only the transient
            # masked copy of x inside one adapter call is left out.
            patched = dataclasses.replace(adapter, dropout=0.0)
            prepare_model(self.model, patched, torch.device("cpu"))

    def __call__(self, tokens: int, seq_len: int, loss_fraction: float = 0.5) -> Estimate:
        """The estimate of one step over a packed micro-batch of ``tokens`` tokens."""
        from fastmid.engine.loss import forward_loss

        def loss_fn(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
            loss_sum, count = forward_loss(model, batch)
            return loss_sum / max(count, 1)

        with self.fake:
            batch = packed_step_batch(tokens, seq_len, loss_fraction)
            return trace_step(self.model, loss_fn, batch, self.t0)


@contextmanager
def _quiet() -> Iterator[None]:
    # transformers warns about fake weights it cannot initialise the usual way.
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


@dataclass(frozen=True)
class BatchChoice:
    """What ``--batch-tokens auto`` chose and why."""

    batch_tokens: int
    grad_accum: int
    fits_tokens: int
    free_bytes: int
    bytes_per_token: float
    fixed_bytes: int

    def resolved(self) -> dict[str, Any]:
        """The resolved-section entries of config.yaml and summary.json."""
        return {
            "batch_tokens": self.batch_tokens,
            "grad_accum": self.grad_accum,
            "batch_fits_tokens": self.fits_tokens,
            "batch_free_gib": round(self.free_bytes / 2**30, 2),
        }


def fit_batch_tokens(
    free_bytes: int,
    fixed_bytes: int,
    bytes_per_token: float,
    step_tokens: int,
    max_length: int,
    headroom: float = HEADROOM,
) -> BatchChoice:
    """The largest packed micro-batch that fits, and the accumulation that keeps the step's
    tokens: ``step_tokens`` per optimizer step in ``grad_accum`` micro-batches of at most
    ``batch_tokens`` (``batch_tokens * grad_accum >= step_tokens``, within one micro-batch
    count of it).

    A micro-batch of T tokens is taken to need ``fixed_bytes + bytes_per_token * T`` on top of
    what is already allocated, and must fit in ``(1 - headroom) * free_bytes``. It holds at
    least one example of ``max_length`` tokens; a device with no room for that is a UserError.
    The choice grows with ``free_bytes`` and never exceeds the step.
    """
    usable = (1.0 - headroom) * free_bytes - fixed_bytes
    fits = int(usable // bytes_per_token) if usable > 0 else 0
    if fits < max_length:
        need = (fixed_bytes + bytes_per_token * max_length) / (1.0 - headroom)
        raise UserError(
            f"--batch-tokens auto: one example of max_length {max_length} tokens needs about "
            f"{need / 2**30:.1f} GiB but the device has {free_bytes / 2**30:.1f} GiB free; "
            "lower --max-length, use --quantize nf4 or --gradient-checkpointing"
        )
    step = max(step_tokens, max_length)
    grad_accum = math.ceil(step / min(fits, step))
    batch_tokens = max(math.ceil(step / grad_accum), max_length)
    return BatchChoice(batch_tokens, grad_accum, fits, free_bytes, bytes_per_token, fixed_bytes)


def choose_batch_tokens(
    config: Any,
    adapter: Any,
    free_bytes: int,
    step_tokens: int,
    max_length: int,
    tracer: Callable[[int, int], Estimate] | None = None,
) -> BatchChoice:
    """``--batch-tokens auto`` for a model of ``config`` with adapters ``adapter`` on a device
    with ``free_bytes`` free (the model already on it): two FakeTensor traces of a packed step
    give the memory per token and the fixed part (optimizer state, adapter gradients, loss
    buffers), then :func:`fit_batch_tokens` picks the size. A third trace at the chosen size
    checks the straight line; if it overshoots, the choice is refitted through that point."""
    with _quiet():
        trace = tracer or FastmidStepTracer(config, adapter)
        small, large = (trace(t, max_length) for t in _PROBE_TOKENS)

        def cost(est: Estimate) -> int:
            return est.optimizer + est.peak_step

        per_token = max((cost(large) - cost(small)) / (_PROBE_TOKENS[1] - _PROBE_TOKENS[0]), 1.0)
        fixed = max(cost(small) - round(per_token * _PROBE_TOKENS[0]), 0)
        choice = fit_batch_tokens(free_bytes, fixed, per_token, step_tokens, max_length)
        if choice.batch_tokens > _PROBE_TOKENS[1]:
            at_choice = cost(trace(choice.batch_tokens, max_length))
            per_token = max(per_token, (at_choice - fixed) / choice.batch_tokens)
            choice = fit_batch_tokens(free_bytes, fixed, per_token, step_tokens, max_length)
    return choice
