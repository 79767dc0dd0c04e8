"""Variable-length attention for packed batches.

fastmid packs whole examples into one row (batch 1) with ``position_ids`` restarting at 0 for
each example. Plain SDPA then attends over the full ``T×T`` square under a block-diagonal
causal mask, and almost all of that work lands on blocks the mask throws away. The attention
function here recognises such a packed call and attends within each example only, so the cost
is ``Σ Lᵢ²`` instead of ``T²``:

- on CUDA (half precision): one varlen call per layer over the whole row: PyTorch's own
  ``torch.nn.attention.varlen.varlen_attn`` where the installed torch has it (no dropout),
  else flash-attn's ``flash_attn_varlen_func`` where installed (:func:`varlen_backend`);
- otherwise, and on CPU where neither runs (and where it is the fast path anyway), causal SDPA
  once per example, equal-length examples batched into one call.

The example boundaries come from the host: the trainer's collator puts ``cu_seqlens`` in the
batch, the loss (``fastmid.engine.loss``) passes it down as a keyword argument, and
:func:`packed_forward` switches the model, for that forward, to an implementation with no mask
function, so transformers builds no ``T×T`` mask and never reads ``position_ids`` back. Nothing
in a packed forward then waits for the device. A caller with position ids only (HF Trainer,
a user's loop) still works: the boundaries are read off ``position_ids`` and the mask checked,
once per forward, not per layer.

Unpadded and right-padded rows (HF's collator) run plain causal attention: the pads follow
every real token, so the mask adds nothing for real positions. Every other call (left
padding, a KV cache, generation) goes to transformers' own SDPA path unchanged.

On CPU, half-precision rows are attended by the fp32 flash kernel (``_causal_attention``): it
is the faster of the two there, and the inputs and output are saved in their own dtype, so
saved memory does not change.

Use ``enable_varlen_attention(model)``. Supported: families whose attention goes through
transformers' ``AttentionInterface`` with plain softmax attention (Llama, Qwen2/3, Mistral,
OLMo2, ...). Models with attention logit soft-capping (Gemma2) are left on their current
implementation: SDPA has no soft-capping, so neither does this path.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

#: Name under which the attention and mask functions are registered with transformers.
VARLEN_ATTENTION = "fastmid_varlen"
#: The same attention registered without a mask function, used during :func:`packed_forward`:
#: transformers then builds no mask at all (no T×T tensor, no look at ``position_ids``).
VARLEN_PACKED = "fastmid_varlen_packed"
#: Keyword argument carrying a packed row's example boundaries ``[0, L0, L0+L1, ..., T]``
#: (int32, on the host) down to every attention call.
CU_SEQLENS = "cu_seqlens"
#: Kernels that can attend a packed row, in the order they are preferred (see varlen_backend).
VARLEN_BACKENDS = ("torch", "flash_attn", "sdpa")


class _LastTensorCache:
    """``compute(t, *key)`` remembered for the tensor (and extra key) last seen. The decoder
    passes the same ``position_ids``, ``cu_seqlens`` and mask tensors to every layer, and reading
    a device tensor costs a host sync (and, for a mask, a T×T comparison): computed once per
    forward, reused while the tensor is unchanged. A strong reference keeps the tensor alive,
    so identity cannot be confused with a new tensor; inference-mode tensors have no version
    counter and are never cached."""

    def __init__(self, compute: Callable[..., Any]) -> None:
        self.compute = compute
        self.entry: tuple[torch.Tensor, int, tuple, Any] | None = None

    def __call__(self, t: torch.Tensor, *key: Any) -> Any:
        if t.is_inference():
            return self.compute(t, *key)
        entry = self.entry
        if entry is not None and entry[0] is t and entry[1] == t._version and entry[2] == key:
            return entry[3]
        result = self.compute(t, *key)
        self.entry = (t, t._version, key, result)
        return result


@dataclass
class PackedRows:
    """The examples of one packed row, known on the host: ``segments`` ``[(start, end), ...]``,
    the longest length and the row's length. ``cu_seqlens_on(device)`` is the int32 boundary
    tensor the varlen kernels take, copied to a device once per forward (asynchronously)."""

    segments: list[tuple[int, int]]
    max_len: int
    total: int
    host: torch.Tensor
    _on_device: dict[torch.device, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def from_bounds(cls, bounds: list[int]) -> PackedRows:
        segments = list(itertools.pairwise(bounds))
        host = torch.tensor(bounds, dtype=torch.int32)
        return cls(segments, max(e - s for s, e in segments), bounds[-1], host)

    def cu_seqlens_on(self, device: torch.device) -> torch.Tensor:
        cu = self._on_device.get(device)
        if cu is None:
            cu = self._on_device[device] = self.host.to(device, non_blocking=True)
        return cu


def _rows_from_cu(cu_seqlens: torch.Tensor) -> PackedRows:
    # A host tensor (the collator's) is read without a sync; a device one costs one per forward.
    bounds = cu_seqlens.tolist()
    if len(bounds) < 2 or bounds[0] != 0 or any(b <= a for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"cu_seqlens must rise strictly from 0, got {bounds}")
    rows = PackedRows.from_bounds(bounds)
    if cu_seqlens.device.type != "cpu" and cu_seqlens.dtype == torch.int32:
        rows._on_device[cu_seqlens.device] = cu_seqlens
    return rows


#: The rows of a ``cu_seqlens`` tensor, worked out once per forward.
packed_rows = _LastTensorCache(_rows_from_cu)


def _find_segments(position_ids: torch.Tensor) -> PackedRows | None:
    """The examples packed in a (1, T) row of position ids, or None if it is not packed.

    Packed means: positions count 0, 1, 2, ... within each example and restart at 0 at every
    example boundary, with at least one restart. Anything else (e.g. the position ids of a
    left-padded generation row) is not treated as packed.
    """
    pos = position_ids[0]
    starts = (pos == 0).nonzero().squeeze(1)
    if starts.numel() < 2 or int(starts[0]) != 0:
        return None
    # Within an example each position is the previous one plus one.
    if not bool(((pos[1:] == pos[:-1] + 1) | (pos[1:] == 0)).all()):
        return None
    return PackedRows.from_bounds([*starts.tolist(), pos.numel()])


_segments = _LastTensorCache(_find_segments)


def _block_causal(mask: torch.Tensor, segments: tuple[tuple[int, int], ...]) -> bool:
    """Whether a boolean (1, 1, T, T) mask is exactly the block-diagonal causal mask."""
    t = mask.shape[-1]
    seg_id = torch.zeros(t, dtype=torch.long, device=mask.device)
    for i, (start, _) in enumerate(segments[1:], start=1):
        seg_id[start:] = i
    idx = torch.arange(t, device=mask.device)
    expected = (seg_id[:, None] == seg_id[None, :]) & (idx[:, None] >= idx[None, :])
    return bool(torch.equal(mask[0, 0], expected))


# Every layer gets the same mask: compared (a host sync) once per forward, not once per layer.
_is_block_causal = _LastTensorCache(_block_causal)


def _right_padded_causal(mask: torch.Tensor) -> bool:
    """Whether a boolean (B, 1, T, T) mask is the causal mask restricted to each row's first n_b
    keys (right padding), n_b read off the last query row."""
    t = mask.shape[-1]
    idx = torch.arange(t, device=mask.device)
    real = mask[:, 0, -1].sum(-1)  # the last query row sees every real key
    expected = (idx[:, None] >= idx[None, :]) & (idx[None, None, :] < real[:, None, None])
    return bool(torch.equal(mask[:, 0], expected))


_is_right_padded_causal = _LastTensorCache(_right_padded_causal)


def _plain_full_call(query: torch.Tensor, key: torch.Tensor, kwargs: dict[str, Any]) -> bool:
    """A training or prefill call with no cached keys (key length = query length ≥ 2) that asks
    for nothing plain SDPA lacks (soft-capping, returned weights, a position bias): what both
    fast paths, packed and causal rows, require."""
    t = query.shape[2]
    if t < 2 or key.shape[2] != t:
        return False
    if kwargs.get("softcap") is not None or kwargs.get("output_attentions", False):
        return False
    return kwargs.get("position_bias") is None


def _causal_rows(
    module: nn.Module | None,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    kwargs: dict[str, Any],
) -> bool:
    """Whether plain causal attention gives this call's real rows exactly: a decoder's
    training or prefill call (no cache, key length = query length) on rows without padding
    or with right padding only. A real query never sees a later position, so the pads after
    it change nothing; the pad rows' own outputs are never read by a real position or a
    label. Causal attention skips the masked upper triangle, which a masked SDPA call does
    not."""
    if not _plain_full_call(query, key, kwargs) or not getattr(module, "is_causal", True):
        return False
    if kwargs.get("is_causal") is False or kwargs.get("cache") is not None:
        return False
    t = query.shape[2]
    window = kwargs.get("sliding_window")
    if window is not None and t > window:
        return False
    if attention_mask is None:
        return True
    if attention_mask.dtype != torch.bool or attention_mask.shape != (query.shape[0], 1, t, t):
        return False
    return _is_right_padded_causal(attention_mask)


def _packed_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    kwargs: dict[str, Any],
) -> PackedRows | None:
    """The examples of this call's row when it is a packed training/prefill call we can split:
    from the caller's ``cu_seqlens`` (host, no sync), else read off ``position_ids``."""
    if query.shape[0] != 1 or not _plain_full_call(query, key, kwargs):
        return None
    t = query.shape[2]
    cu_seqlens = kwargs.get(CU_SEQLENS)
    if cu_seqlens is not None:
        rows = packed_rows(cu_seqlens)
        if rows.total != t:
            raise ValueError(f"cu_seqlens covers {rows.total} positions, the row has {t}")
    else:
        position_ids = kwargs.get("position_ids")
        if position_ids is None or position_ids.shape != (1, t):
            return None
        rows = _segments(position_ids)
        if rows is None:
            return None
    window = kwargs.get("sliding_window")
    if window is not None and rows.max_len > window:
        if attention_mask is None and cu_seqlens is not None:
            # packed_forward keeps the mask whenever the window can cut into an example.
            raise ValueError("a packed row longer than the sliding window needs its mask")
        return None
    if attention_mask is not None:
        # Only the mask transformers builds for packing may be dropped; any other mask (e.g. a
        # padding mask the caller passed) changes the result and must be honoured.
        if attention_mask.dtype != torch.bool or attention_mask.shape != (1, 1, t, t):
            return None
        if not _is_block_causal(attention_mask, tuple(rows.segments)):
            return None
    return rows


_HALF = (torch.bfloat16, torch.float16)


class _Fp32CausalAttention(torch.autograd.Function):
    """Causal attention of half-precision CPU tensors through the fp32 flash kernel, forward
    and backward. On 2 threads the fp32 kernel ran a packed bf16 row's forward + backward in
    17.3 ms against 23.9 ms for the bf16 kernel, the casts included (`python -m
    bench.attention` with the upcast as a variant). Only the half-precision q, k, v, output
    and the (fp32) log-sum-exp are saved, what the half-precision kernel itself saves."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.float(), k.float(), v.float(), 0.0, True, scale=scale
        )
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out.float(), q.float(), k.float(), v.float(), out.float(), lse, 0.0, True,
            scale=ctx.scale,
        )  # fmt: skip
        return *(g.to(t.dtype) for g, t in zip(grads, (q, k, v), strict=True)), None


def _causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float, scale: float | None
) -> torch.Tensor:
    """Causal SDPA of (B, H, L, D) q and (B, H_kv, L, D) k/v (grouped-query heads inside the
    kernel); half-precision CPU calls without dropout take the fp32 kernel."""
    if q.device.type == "cpu" and q.dtype in _HALF and dropout == 0.0:
        return _Fp32CausalAttention.apply(q, k, v, scale)
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(
        q, k, v, dropout_p=dropout, scale=scale, is_causal=True, enable_gqa=gqa
    )


@functools.cache
def _torch_varlen() -> Callable[..., torch.Tensor] | None:
    """PyTorch's varlen attention (``torch.nn.attention.varlen.varlen_attn``), if this torch
    has it. It runs aten's CUDA flash kernel: CUDA only, half precision, no dropout."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def _flash_varlen() -> Callable[..., torch.Tensor] | None:
    """flash-attn's ``flash_attn_varlen_func``, if installed (CUDA, half precision)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@functools.cache
def _flash_capable(device: torch.device) -> bool:
    """Whether ``device`` runs the flash kernels (sm80 and newer)."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def varlen_backend(device: torch.device, dtype: torch.dtype, head_dim: int, dropout: float) -> str:
    """Which kernel attends a packed row (one of :data:`VARLEN_BACKENDS`).

    ``torch`` (one ``varlen_attn`` call per layer) on CUDA where this torch has it and the
    attention has no dropout; else ``flash_attn`` (one ``flash_attn_varlen_func`` call, dropout
    included) where installed; else ``sdpa``, causal SDPA once per example. Both varlen kernels
    need half precision, an sm80+ GPU and a head dim that is a multiple of 8 up to 256. CPU
    always takes ``sdpa``: neither varlen kernel runs there, and the per-example calls take the
    fp32 flash kernel that is the faster one on CPU.
    """
    if device.type != "cuda" or dtype not in _HALF or head_dim % 8 or head_dim > 256:
        return "sdpa"
    if not _flash_capable(device):
        return "sdpa"
    if dropout == 0.0 and _torch_varlen() is not None:
        return "torch"
    if _flash_varlen() is not None:
        return "flash_attn"
    return "sdpa"


def _tokens_major(x: torch.Tensor) -> torch.Tensor:
    """(1, H, T, D) → (T, H, D), the varlen kernels' layout (a view: D stays contiguous)."""
    return x[0].transpose(0, 1)


# A layer's query, key and value, each (1, H, T, D).
QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _varlen_call(
    backend: str, qkv: QKV, rows: PackedRows, dropout: float, scale: float | None
) -> torch.Tensor:
    """One varlen kernel call over the whole packed row; returns (1, T, H, D)."""
    q, k, v = (_tokens_major(x) for x in qkv)
    cu = rows.cu_seqlens_on(q.device)
    n = rows.max_len
    if backend == "torch":
        gqa = q.shape[1] != k.shape[1]
        # window (-1, 0) is how varlen_attn is asked for causal attention.
        out = _torch_varlen()(q, k, v, cu, cu, n, n, scale=scale, window_size=(-1, 0),
                              enable_gqa=gqa)  # fmt: skip
    else:
        out = _flash_varlen()(q, k, v, cu, cu, n, n, dropout_p=dropout, softmax_scale=scale,
                              causal=True)  # fmt: skip
    return out.unsqueeze(0)


def _per_example_call(
    qkv: QKV, rows: PackedRows, dropout: float, scale: float | None
) -> torch.Tensor:
    """Causal SDPA once per example, equal-length examples batched; returns (1, T, H, D)."""
    query, key, value = qkv
    by_length: dict[int, list[int]] = {}
    for start, end in rows.segments:
        by_length.setdefault(end - start, []).append(start)
    out = query.new_empty(query.shape)
    for length, starts in by_length.items():
        if len(starts) == 1:
            s = starts[0]
            q, k, v = (x[:, :, s : s + length] for x in (query, key, value))
        else:
            # Equal-length examples become one batched call; gathering them copies only q/k/v.
            q, k, v = (
                torch.cat([x[:, :, s : s + length] for s in starts]) for x in (query, key, value)
            )
        # GQA inside the kernel (as transformers' unmasked path does), not via repeat_kv.
        o = _causal_attention(q, k, v, dropout, scale)
        for i, s in enumerate(starts):
            out[:, :, s : s + length] = o[i : i + 1]
    return out.transpose(1, 2)


# Example boundaries are read on the host and the per-example calls follow them: compiled
# blocks (fastmid.engine.compile) run this eagerly instead of specialising a graph on each packing.
@torch.compiler.disable
def varlen_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention with transformers' signature: packed rows attend within each example
    (:func:`varlen_backend` picks the kernel), unpadded or right-padded rows run plain causal
    attention (`_causal_rows`).

    ``query`` is (B, H, T, D), ``key``/``value`` (B, H_kv, T, D); returns (B, T, H, D) like
    ``sdpa_attention_forward``, to which every other call is delegated. A packed row's
    boundaries come as ``kwargs[CU_SEQLENS]`` (host int32) or are read off ``position_ids``.
    """
    rows = _packed_rows(query, key, attention_mask, kwargs)
    if rows is None:
        if _causal_rows(module, query, key, attention_mask, kwargs):
            out = _causal_attention(query, key, value, dropout, scaling)
            return out.transpose(1, 2).contiguous(), None
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    backend = varlen_backend(query.device, query.dtype, query.shape[-1], dropout)
    if backend == "sdpa":
        out = _per_example_call((query, key, value), rows, dropout, scaling)
    else:
        out = _varlen_call(backend, (query, key, value), rows, dropout, scaling)
    return out.contiguous(), None


def _register() -> None:
    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    # Same masks as SDPA, so a delegated call sees exactly what plain SDPA would.
    AttentionMaskInterface.register(VARLEN_ATTENTION, sdpa_mask)
    # No mask function: transformers skips building a mask for this name (packed_forward).
    AttentionInterface.register(VARLEN_PACKED, varlen_attention_forward)


_register()


def supports_varlen_attention(model: nn.Module) -> bool:
    """Whether ``model``'s attention can run on the varlen path (no logit soft-capping)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        return False
    return getattr(config, "attn_logit_softcapping", None) is None


def enable_varlen_attention(model: nn.Module) -> None:
    """Switch ``model`` to varlen attention for packed batches; a no-op where unsupported.

    Gemma2 (attention soft-capping) and models outside transformers' attention interface keep
    their current implementation.
    """
    if supports_varlen_attention(model):
        model.set_attn_implementation(VARLEN_ATTENTION)


@contextlib.contextmanager
def packed_forward(model: nn.Module, cu_seqlens: torch.Tensor) -> Iterator[dict[str, Any]]:
    """Run one forward of ``model`` over a packed row whose boundaries ``cu_seqlens`` (host
    int32, ``[0, L0, ..., T]``) the caller knows; yields the keyword arguments to pass it.

    On a model with varlen attention, the forward runs under :data:`VARLEN_PACKED`, which has
    no mask function, so transformers builds no ``T×T`` mask and does not inspect
    ``position_ids`` on the device (a host sync); the attention reads the boundaries from the
    keyword argument instead. A sliding window shorter than the longest example keeps the
    mask (the window must apply). Other models get no extra arguments and run as before.
    """
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != VARLEN_ATTENTION:
        yield {}
        return
    window = getattr(config, "sliding_window", None)
    if window is not None and packed_rows(cu_seqlens).max_len > window:
        yield {CU_SEQLENS: cu_seqlens}
        return
    config._attn_implementation = VARLEN_PACKED
    try:
        yield {CU_SEQLENS: cu_seqlens}
    finally:
        config._attn_implementation = VARLEN_ATTENTION
