"""Measurements: interleaved step timing, matmul peak, FLOPs, exact training-state bytes, RSS.

Everything here takes :class:`bench.providers.Provider` objects and plain batches, so the
pytest-benchmark files and ``fastmid bench`` share one implementation.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.providers import Provider, Workload
from fastmid.memory import peak_rss_bytes, reset_peak_rss, rss_bytes


def sync() -> None:
    """Wait for queued device work so wall-clock times cover it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """This machine's achievable dense matmul rate in FLOP/s: best of ``reps`` n×n×n ``mm``.

    Measured in the same run as the providers, so MFU is relative to what the machine gives
    right now (shared CPUs slow down both the peak and the workload alike).
    """
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b)
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def time_interleaved(
    providers: list[Provider], workload: Workload, warmup: int, steps: int
) -> dict[str, list[float]]:
    """Seconds per optimizer step for each provider, the providers interleaved step by step.

    Round r trains every provider on step r's examples; the order rotates each round so no
    provider always runs right after the same neighbour. Batches are collated up front (the
    trainer collates on the side; it is not what is compared). Warm-up rounds are discarded.
    """
    n = warmup + steps
    batches = {
        p.name: [p.batch(workload.step_examples(i), workload.pad_id) for i in range(n)]
        for p in providers
    }
    times: dict[str, list[float]] = {p.name: [] for p in providers}
    for r in range(n):
        order = providers[r % len(providers) :] + providers[: r % len(providers)]
        for p in order:
            sync()
            t0 = time.perf_counter()
            p.train_step(batches[p.name][r])
            sync()
            if r >= warmup:
                times[p.name].append(time.perf_counter() - t0)
    return times


def count_flops(provider: Provider, batch: dict[str, torch.Tensor]) -> int:
    """FLOPs of one forward + backward (matmuls and attention, as FlopCounterMode counts them).

    Only ops torch can see are counted: run this on the torch path (CPU), where fastmid's
    kernels execute as ``addmm``/``mm`` calls, not on opaque Triton launches.
    """
    with FlopCounterMode(display=False) as counter:
        provider.forward_backward(batch)
    provider.optimizer.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def useful_flops(provider: Provider, workload: Workload, step: int) -> int:
    """FLOPs of step ``step`` counted one example at a time: no pads, no cross-example attention.

    This is the provider's own algorithm applied to the real tokens only, the work it cannot
    avoid; what a padded or packed batch executes on top of it is waste.
    """
    return sum(
        count_flops(provider, provider.batch([e], workload.pad_id))
        for e in workload.step_examples(step)
    )


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def state_bytes(provider: Provider, batch: dict[str, torch.Tensor]) -> dict[str, int]:
    """Exact bytes of one step's training state, the parts that do not depend on the allocator.

    ``saved``: unique storages autograd keeps for backward (saved-tensor hooks), weights and
    buffers excluded; a checkpointed region's stored inputs are held outside these hooks and are
    not counted. ``grads``: every gradient after backward. ``optimizer``: AdamW state after the
    step. Runs one real optimizer step.
    """
    model = provider.model
    frozen = {_storage_key(t) for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in frozen and key not in saved:
            saved[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), provider.autocast():
        loss = provider.loss_fn(model, batch)
    loss.backward()
    grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    provider.optimizer.step()
    opt = sum(
        v.nbytes
        for state in provider.optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )
    provider.optimizer.zero_grad(set_to_none=True)
    return {"saved": sum(saved.values()), "grads": grads, "optimizer": opt}


# --------------------------------------------------------------------------------------------
# Process memory (CPU): the kernel's peak-RSS counter, resettable per process


def peak_training_memory(provider: Provider, batches: list[dict[str, Any]]) -> dict[str, Any]:
    """Peak memory of ``len(batches)`` optimizer steps, measured from the set-up state.

    CUDA: ``max_memory_allocated``. CPU: peak RSS (VmHWM after a reset); meaningful in a fresh
    process that holds nothing but this provider (see ``bench.memworker``).
    """
    if torch.cuda.is_available():
        sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for b in batches:
            provider.train_step(b)
        sync()
        peak = torch.cuda.max_memory_allocated()
        return {"kind": "cuda_max_allocated", "setup": base, "peak": peak, "train": peak - base}
    base = rss_bytes()
    exact = reset_peak_rss()
    for b in batches:
        provider.train_step(b)
    peak = peak_rss_bytes()
    kind = "cpu_peak_rss" if exact else "cpu_peak_rss_since_start"
    return {"kind": kind, "setup": base, "peak": peak, "train": max(peak - base, 0)}
