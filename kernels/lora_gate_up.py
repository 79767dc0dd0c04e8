"""Grouped LoRA gate/up projection with the SwiGLU product fused: h = silu(g) ⊙ u.

Shapes (leading dims of x flattened into M):
    x (M,K); frozen w = cat(Wgate, Wup) (2I,K); a_g (r_g,K), a_u (r_u,K), b_g (I,r_g),
    b_u (I,r_u); scales s_g, s_u; R = r_g+r_u. LoRA dropout: one 0/1 keep-mask m shared by
    gate and up (they read the same x), 1/(1-p) folded into s' = s/(1-p).

    xa = (m ⊙ x)·[s_g' A_g; s_u' A_u]ᵀ                   (M,R)   one thin GEMM
    g  = x·Wgᵀ + xa_g·B_gᵀ      u = x·Wuᵀ + xa_u·B_uᵀ     (M,I)   never stored
    h  = silu(g) ⊙ u                                       (M,I)   the only output
    dg = dh ⊙ u ⊙ σ(g)(1 + g(1-σ(g)))      du = dh ⊙ silu(g)
    gs = [s_g' dg·B_g | s_u' du·B_u]                       (M,R)
    dx = [dg | du]·w + m ⊙ (gs·[A_g; A_u])   (skipped when x needs no grad)
    dA = gsᵀ·(m ⊙ x)          dB_g = dgᵀ·xa_g      dB_u = duᵀ·xa_u

Memory/compute trade: forward saves only x and xa (R columns). An unfused MLP keeps g, u and
silu(g) alive for backward, 3·M·I values; at SmolLM2 shapes (I = 1536 = 2.7·K) that is about
8× the size of x. Backward instead recomputes g and u with one more base GEMM (2·M·K·2I
FLOPs: the layer's forward cost again, about +50% on its fwd+bwd) and turns them into dg and du
in the same kernel's epilogue, so the recomputed pre-activations never reach memory on the
Triton path. The torch path recomputes into one (M,2I) buffer and builds dg and du in place.
From dg and du on, gate and up are two grouped LoRA linears: the backward is `_gemm`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.library import triton_op

from . import _gemm
from ._common import (
    check_dropout,
    compute_dtype,
    dropout_seed,
    effective_scale,
    registered_op,
    torch_keep_mask,
    use_triton,
)
from ._gemm import inspect_target

__all__ = ["lora_gate_up", "lora_gate_up_reference"]


# --------------------------------------------------------------------------------------------
# The SwiGLU epilogue on the torch path (the Triton one is `_gemm.launch_swiglu`'s)
# --------------------------------------------------------------------------------------------
def _gate_up_torch(x, w, xa, b_list):
    """(M,2I) = [g | u]: one base GEMM, the two low-rank terms accumulated into its halves."""
    gu = torch.mm(x, w.t())
    half, rg = w.shape[0] // 2, b_list[0].shape[1]
    gu[:, :half].addmm_(xa[:, :rg], b_list[0].t())
    gu[:, half:].addmm_(xa[:, rg:], b_list[1].t())
    return gu


def _forward_torch(x, w, a_list, b_list, scales, p, seed):
    a_s = torch.cat([a * s for a, s in zip(a_list, scales, strict=True)])
    xd = x if p == 0.0 else torch.where(torch_keep_mask(x.shape, p, seed), x, 0.0)
    xa = torch.mm(xd, a_s.t())
    gu = _gate_up_torch(x, w, xa, b_list)
    half = w.shape[0] // 2
    h = torch.nn.functional.silu(gu[:, :half])
    return h.mul_(gu[:, half:]), xa


def _dgate_dup_torch(x, dh, w, xa, b_list):
    """(dg, du), column views of one (M,2I) buffer: [g | u] recomputed into it, then
    overwritten in place, u → dh⊙u → dg and g → silu(g) → du. Peak extra memory is this
    one buffer."""
    half = w.shape[0] // 2
    gu = _gate_up_torch(x, w, xa, b_list)
    g, u = gu[:, :half], gu[:, half:]
    u.mul_(dh)
    dg = torch.ops.aten.silu_backward.grad_input(u, g, grad_input=u)
    du = torch.nn.functional.silu(g, inplace=True).mul_(dh)
    return dg, du


@registered_op(torch.library.custom_op, "fastmid::lora_gate_up_forward_torch")
def _forward_torch_op(
    x: torch.Tensor,
    w: torch.Tensor,
    a_list: list[torch.Tensor],
    b_list: list[torch.Tensor],
    scales: list[float],
    p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_torch(x, w, a_list, b_list, scales, p, seed)


@_forward_torch_op.register_fake
def _(x, w, a_list, b_list, scales, p, seed):
    rank = sum(a.shape[0] for a in a_list)
    return x.new_empty(x.shape[0], w.shape[0] // 2), x.new_empty(x.shape[0], rank)


@registered_op(torch.library.custom_op, "fastmid::lora_gate_up_backward_torch")
def _backward_torch_op(
    x: torch.Tensor,
    dh: torch.Tensor,
    w: torch.Tensor,
    a_list: list[torch.Tensor],
    b_list: list[torch.Tensor],
    scales: list[float],
    xa: torch.Tensor,
    p: float,
    seed: torch.Tensor | None,
    need_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    dg, du = _dgate_dup_torch(x, dh, w, xa, b_list)
    dx, da, dbs = _gemm.lora_backward_torch(
        x, [dg, du], w, a_list, b_list, scales, xa, p, seed, need_dx
    )
    return (x.new_empty(0) if dx is None else dx), da, dbs


@_backward_torch_op.register_fake
def _(x, dh, w, a_list, b_list, scales, xa, p, seed, need_dx):
    rank = sum(a.shape[0] for a in a_list)
    dx = x.new_empty(x.shape if need_dx else (0,))
    return dx, x.new_empty(rank, x.shape[1]), [x.new_empty(b.shape) for b in b_list]


# --------------------------------------------------------------------------------------------
# Plain-torch reference (test oracle)
# --------------------------------------------------------------------------------------------
def lora_gate_up_reference(
    x: torch.Tensor,
    weight_gate_up: torch.Tensor,
    a_g: torch.Tensor,
    a_u: torch.Tensor,
    b_g: torch.Tensor,
    b_u: torch.Tensor,
    scales: float | Sequence[float],
    dropout_p: float = 0.0,
    seed: int = 0,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """silu(gate) ⊙ up of two LoRA linears, by plain autograd: the oracle for `lora_gate_up`.

    `keep` (0/1, shape of x) overrides the seeded mask, so a kernel can be checked against the
    reference with the kernel's own mask.
    """
    sg, su = _pair(scales)
    if dropout_p > 0.0 and keep is None:
        keep = torch_keep_mask(x.shape, dropout_p, seed, x.device)
    xd = x if dropout_p == 0.0 else x * keep.to(x.dtype) / (1.0 - dropout_p)
    wg, wu = weight_gate_up.split(b_g.shape[0])
    g = x @ wg.t() + sg * ((xd @ a_g.t()) @ b_g.t())
    u = x @ wu.t() + su * ((xd @ a_u.t()) @ b_u.t())
    return torch.nn.functional.silu(g) * u


# --------------------------------------------------------------------------------------------
# Custom ops and their autograd (x 2-D in its own dtype, cast inside: only x itself is saved)
# --------------------------------------------------------------------------------------------
_ADAPTERS = ("a_g", "a_u", "b_g", "b_u")
_ARG_NAMES = ("x", "w", *_ADAPTERS, "scales", "p", "seed", "dtype")


@registered_op(triton_op, "fastmid::lora_gate_up")
def _lora_gate_up_op(
    x: torch.Tensor,
    w: torch.Tensor,
    a_g: torch.Tensor,
    a_u: torch.Tensor,
    b_g: torch.Tensor,
    b_u: torch.Tensor,
    scales: list[float],
    p: float,
    seed: torch.Tensor | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h (M,I), xa (M,R)) in `dtype`; `scales` are the effective ones."""
    with torch.autocast(x.device.type, enabled=False):
        x, w = x.to(dtype).contiguous(), w.to(dtype)
        a_list = [a.to(dtype) for a in (a_g, a_u)]
        b_list = [b.to(dtype).contiguous() for b in (b_g, b_u)]
        if not use_triton(x, dtype):
            return _forward_torch_op(x, w, a_list, b_list, scales, p, seed)
        ranks = [a.shape[0] for a in a_list]
        xa = _gemm.launch_thin(x, torch.cat(a_list), scales, ranks, p, seed)
        return _gemm.launch_swiglu(x, w, xa, *b_list), xa


@registered_op(triton_op, "fastmid::lora_gate_up_backward")
def _lora_gate_up_backward_op(
    dh: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    a_g: torch.Tensor,
    a_u: torch.Tensor,
    b_g: torch.Tensor,
    b_u: torch.Tensor,
    xa: torch.Tensor,
    scales: list[float],
    p: float,
    seed: torch.Tensor | None,
    dtype: torch.dtype,
    need_dx: bool,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(dx in x's dtype (empty without `need_dx`), [dA_g, dA_u, dB_g, dB_u] in the adapters'
    dtypes)."""
    adapters = (a_g, a_u, b_g, b_u)
    with torch.autocast(x.device.type, enabled=False):
        x, w = x.to(dtype).contiguous(), w.to(dtype)
        dh = dh.to(dtype).contiguous()
        a_list = [a.to(dtype) for a in adapters[:2]]
        b_list = [b.to(dtype).contiguous() for b in adapters[2:]]
        if use_triton(x, dtype):
            # The recomputing GEMM with the SwiGLU derivative as its epilogue: [dg | du].
            dgu = _gemm.launch_swiglu(x, w, xa, *b_list, dh=dh)
            half = w.shape[0] // 2
            dx, da, dbs = _gemm.lora_backward(
                x, dgu, [dgu[:, :half], dgu[:, half:]], w, a_list, b_list, scales, xa, p, seed,
                need_dx,
            )  # fmt: skip
        else:
            dx, da, dbs = _backward_torch_op(x, dh, w, a_list, b_list, scales, xa, p, seed, need_dx)
    das = da.split([a.shape[0] for a in a_list])
    # Copies: the dA slices are views of one tensor, and op outputs must not alias.
    grads = [g.to(t.dtype, copy=True) for g, t in zip((*das, *dbs), adapters, strict=True)]
    return dx.to(x.dtype), grads


_gemm.register_grouped_autograd(_lora_gate_up_op, _lora_gate_up_backward_op, _ARG_NAMES, _ADAPTERS)


def _pair(scales: float | Sequence[float]) -> tuple[float, float]:
    if isinstance(scales, (int, float)):
        return (float(scales),) * 2
    if len(scales) != 2:
        raise ValueError(f"scales must be one float or two (gate, up), got {len(scales)}")
    return float(scales[0]), float(scales[1])


def lora_gate_up(
    x: torch.Tensor,
    weight_gate_up: torch.Tensor,
    a_g: torch.Tensor,
    a_u: torch.Tensor,
    b_g: torch.Tensor,
    b_u: torch.Tensor,
    scales: float | Sequence[float],
    dropout_p: float = 0.0,
    seed: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """h = silu(gate) ⊙ up for two LoRA linears sharing one read of x (see module docstring).

    x (..., K); weight_gate_up = cat(Wgate, Wup) (2I, K), frozen, built once by the caller;
    a_g (r_g, K), a_u (r_u, K), b_g (I, r_g), b_u (I, r_u); scales: one float or (s_g, s_u).
    One dropout mask is shared by gate and up; `seed` (int or 0-dim tensor) fixes it, None
    draws one from torch's generator.
    Returns h (..., I). Backward recomputes gate and up instead of storing them.
    """
    K = x.shape[-1]
    inter = b_g.shape[0]
    if weight_gate_up.shape != (2 * inter, K) or b_u.shape[0] != inter:
        raise ValueError(
            f"weight_gate_up is {tuple(weight_gate_up.shape)}, expected ({2 * inter}, {K})"
        )
    for a, b in ((a_g, b_g), (a_u, b_u)):
        if a.shape[1] != K or b.shape[1] != a.shape[0]:
            raise ValueError(f"adapter shapes A {tuple(a.shape)}, B {tuple(b.shape)} for K={K}")
    check_dropout(dropout_p)
    h, _ = _lora_gate_up_op(
        x.reshape(-1, K), weight_gate_up, a_g, a_u, b_g, b_u,
        [effective_scale(s, dropout_p) for s in _pair(scales)], float(dropout_p),
        dropout_seed(dropout_p, seed, x.device), compute_dtype(x),
    )  # fmt: skip
    return h.view(*x.shape[:-1], inter)


# --------------------------------------------------------------------------------------------
# Ahead-of-time compilation targets (`python -m fastmid.kernels.cubin_report`): the SwiGLU
# GEMM; the thin, TN and dx GEMMs of the backward are lora_linear's launches.
# --------------------------------------------------------------------------------------------
_DIVISIBLE = ("I", "K", "stride_xm", "stride_wn", "stride_om", "stride_dhm")
INSPECT_TARGETS = [
    inspect_target(
        "lora_gate_up_fwd", "swiglu", ones=(), divisible=_DIVISIBLE, BACKWARD=False, GROUP_M=8,
    ),
    inspect_target(
        "lora_gate_up_bwd_recompute", "swiglu", ones=(), divisible=_DIVISIBLE, BACKWARD=True,
        GROUP_M=8,
    ),
]  # fmt: skip
