"""Variable-length attention for packed batches.

fastmid packs whole examples into one row (batch 1) with ``position_ids`` restarting at 0 for
each example. Plain SDPA then attends over the full ``T×T`` square under a block-diagonal
causal mask, and almost all of that work lands on blocks the mask throws away. The attention
function here recognises such a packed call and runs causal SDPA once per example (equal-length
examples batched into one call), so the cost is ``Σ Lᵢ²`` instead of ``T²``. Unpadded and
right-padded rows (HF's collator) run plain causal attention: the pads follow every real token,
so the mask adds nothing for real positions. Every other call (left padding, a KV cache,
generation) goes to transformers' own SDPA path unchanged.

On CPU, half-precision rows are attended by the fp32 flash kernel (``_causal_attention``): it
is the faster of the two there, and the inputs and output are saved in their own dtype, so
saved memory does not change.

Use ``enable_varlen_attention(model)``. Supported: families whose attention goes through
transformers' ``AttentionInterface`` with plain softmax attention (Llama, Qwen2/3, Mistral,
OLMo2, ...). Models with attention logit soft-capping (Gemma2) are left on their current
implementation: SDPA has no soft-capping, so neither does this path.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

#: Name under which the attention and mask functions are registered with transformers.
VARLEN_ATTENTION = "fastmid_varlen"


class _LastTensorCache:
    """``compute(t)`` remembered for the tensor last seen. The decoder passes the same
    ``position_ids`` and mask tensors to every layer, and reading them costs a host sync (and,
    for a mask, a T×T comparison): computed once per forward, reused while the tensor is
    unchanged. A strong reference keeps the tensor alive, so identity cannot be confused with a
    new tensor; inference-mode tensors have no version counter and are never cached."""

    def __init__(self, compute: Callable[[torch.Tensor], Any]) -> None:
        self.compute = compute
        self.entry: tuple[torch.Tensor, int, Any] | None = None

    def __call__(self, t: torch.Tensor) -> Any:
        if t.is_inference():
            return self.compute(t)
        entry = self.entry
        if entry is not None and entry[0] is t and entry[1] == t._version:
            return entry[2]
        result = self.compute(t)
        self.entry = (t, t._version, result)
        return result


def _find_segments(position_ids: torch.Tensor) -> list[tuple[int, int]] | None:
    """``[(start, end), ...]`` of the examples packed in a (1, T) row, or None if not packed.

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
    return list(itertools.pairwise([*starts.tolist(), pos.numel()]))


_segments = _LastTensorCache(_find_segments)


def _is_block_causal(mask: torch.Tensor, segments: list[tuple[int, int]]) -> bool:
    """Whether a boolean (1, 1, T, T) mask is exactly the block-diagonal causal mask."""
    t = mask.shape[-1]
    seg_id = torch.zeros(t, dtype=torch.long, device=mask.device)
    for i, (start, _) in enumerate(segments[1:], start=1):
        seg_id[start:] = i
    idx = torch.arange(t, device=mask.device)
    expected = (seg_id[:, None] == seg_id[None, :]) & (idx[:, None] >= idx[None, :])
    return bool(torch.equal(mask[0, 0], expected))


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


def _packed_segments(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    kwargs: dict[str, Any],
) -> list[tuple[int, int]] | None:
    """The example segments when this call is a packed training/prefill call we can split."""
    position_ids = kwargs.get("position_ids")
    if position_ids is None or not _plain_full_call(query, key, kwargs):
        return None
    t = query.shape[2]
    if query.shape[0] != 1 or position_ids.shape != (1, t):
        return None
    segments = _segments(position_ids)
    if segments is None:
        return None
    window = kwargs.get("sliding_window")
    if window is not None and max(end - start for start, end in segments) > window:
        return None
    if attention_mask is not None:
        # Only the mask transformers builds for packing may be dropped; any other mask (e.g. a
        # padding mask the caller passed) changes the result and must be honoured.
        if attention_mask.dtype != torch.bool or attention_mask.shape != (1, 1, t, t):
            return None
        if not _is_block_causal(attention_mask, segments):
            return None
    return segments


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
    """Attention with transformers' signature: per-example causal SDPA on packed rows, plain
    causal attention on unpadded or right-padded rows (`_causal_rows`).

    ``query`` is (B, H, T, D), ``key``/``value`` (B, H_kv, T, D); returns (B, T, H, D) like
    ``sdpa_attention_forward``, to which every other call is delegated.
    """
    segments = _packed_segments(query, key, attention_mask, kwargs)
    if segments is None:
        if _causal_rows(module, query, key, attention_mask, kwargs):
            out = _causal_attention(query, key, value, dropout, scaling)
            return out.transpose(1, 2).contiguous(), None
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    by_length: dict[int, list[int]] = {}
    for start, end in segments:
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
        o = _causal_attention(q, k, v, dropout, scaling)
        for i, s in enumerate(starts):
            out[:, :, s : s + length] = o[i : i + 1]
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    # Same masks as SDPA, so a delegated call sees exactly what plain SDPA would.
    AttentionMaskInterface.register(VARLEN_ATTENTION, sdpa_mask)


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
