"""Grouped LoRA gate/up projection with the SwiGLU product fused: h = silu(g) ⊙ u.

Shapes (leading dims of x flattened into M):
    x (M,K); frozen w = cat(Wgate, Wup) (2I,K); a_g (r_g,K), a_u (r_u,K), b_g (I,r_g),
    b_u (I,r_u); scales s_g, s_u; R = r_g+r_u. LoRA dropout: one 0/1 keep-mask m shared by
    gate and up (they read the same x), 1/(1-p) folded into s' = s/(1-p).

    xa = (m ⊙ x)·[s_g' A_g; s_u' A_u]ᵀ                   (M,R)   one thin product
    [g | u] = x·wᵀ + [xa_g·B_gᵀ | xa_u·B_uᵀ]              (M,2I)  one GEMM over the fused w
    h  = silu(g) ⊙ u                                       (M,I)   the output
    dg = dh ⊙ u ⊙ σ(g)(1 + g(1-σ(g)))      du = dh ⊙ silu(g)
    gs = [s_g' dg·B_g | s_u' du·B_u]                       (M,R)
    dx = [dg | du]·w + m ⊙ (gs·[A_g; A_u])   (skipped when x needs no grad)
    dA = gsᵀ·(m ⊙ x)          dB_g = dgᵀ·xa_g      dB_u = duᵀ·xa_u

Memory/compute trade (`recompute`): by default forward saves [g | u] (M,2I) with x and xa,
fewer values than an unfused MLP keeps (g, u and silu(g), 3·M·I) and no extra GEMM. With
`recompute=True` (the memory mode) forward saves only x and xa and backward recomputes [g | u]
with one more base GEMM (2·M·K·2I FLOPs, about +50% on the layer's forward + backward: the
first H200 run measured 13.6 ms against 7.7 ms at the Llama-3-8B shape), turning it into dg and
du in place. From dg and du on, gate and up are two grouped LoRA linears (`_lora`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _lora
from ._common import check_dropout, compute_dtype, dropout_seed, effective_scale, torch_keep_mask

__all__ = ["lora_gate_up", "lora_gate_up_reference"]


# --------------------------------------------------------------------------------------------
# Plain-torch reference (test oracle)
# --------------------------------------------------------------------------------------------
def lora_gate_up_reference(
    x: torch.Tensor, weight_gate_up: torch.Tensor,
    a_g: torch.Tensor, a_u: torch.Tensor, b_g: torch.Tensor, b_u: torch.Tensor,
    scales: float | Sequence[float], dropout_p: float = 0.0, seed: int = 0,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
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
    seed_offset: int = 0,
    recompute: bool = False,
) -> torch.Tensor:
    """h = silu(gate) ⊙ up for two LoRA linears sharing one read of x (see module docstring).

    x (..., K); weight_gate_up = cat(Wgate, Wup) (2I, K), frozen, built once by the caller;
    a_g (r_g, K), a_u (r_u, K), b_g (I, r_g), b_u (I, r_u); scales: one float or (s_g, s_u).
    One dropout mask is shared by gate and up; `seed` (int or 0-dim tensor) plus `seed_offset`
    fix it, seed None draws one from torch's generator.
    Returns h (..., I). `recompute=True` is the memory mode: backward recomputes gate and up
    (one more GEMM of the forward's size) instead of keeping them, (M, 2I) values, alive
    between forward and backward.
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
    spec = _lora.Spec(
        tuple(effective_scale(s, dropout_p) for s in _pair(scales)), float(dropout_p),
        seed_offset, compute_dtype(x), swiglu=True, recompute=recompute,
        cache=torch.is_grad_enabled(),
    )  # fmt: skip
    seed_t = dropout_seed(dropout_p, seed, x.device)
    h = _lora.apply(
        "lora_gate_up", x.reshape(-1, K), weight_gate_up, None, (a_g, a_u), (b_g, b_u), spec,
        seed_t,
    )  # fmt: skip
    return h.view(*x.shape[:-1], inter)
