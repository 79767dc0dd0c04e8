"""Fused LoRA linear: a frozen projection plus a rank-r adapter, forward and backward.

Shapes: `x (M,K)` (any leading dims are flattened into M), frozen `w (N,K)`, optional frozen
`bias (N)`, adapter `a (r,K)`, `b (N,r)`, scale `s` (alpha/r). With LoRA dropout `drop(x) =
m ⊙ x / (1-p)` for a 0/1 keep-mask `m`; the 1/(1-p) is folded into `s' = s/(1-p)`.

    xa = (m ⊙ x)·Aᵀ                       (M,r)   saved for backward, with x
    y  = x·Wᵀ + bias + s'·xa·Bᵀ           (M,N)
    dx = dy·W + m ⊙ (s'·(dy·B)·A)         (M,K)   only when x needs a grad
    dA = s'·(dy·B)ᵀ·(m ⊙ x)               (r,K)
    dB = s'·dyᵀ·xa                        (N,r)

dW and d(bias) are never computed. The mask is never stored: forward and backward both draw it
from the same seed.
"""

from __future__ import annotations

import torch

from ._common import (
    check_dropout,
    compute_dtype,
    draw_seed,
    effective_scale,
    torch_keep_mask,
)

# ---------------------------------------------------------------------------------------------
# Plain-torch reference (test oracle) and the fast torch path (CPU execution)
# ---------------------------------------------------------------------------------------------


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """The op's math written the obvious way, differentiable by autograd.

    `keep` (0/1, shape of `x`) overrides the seeded mask, so a kernel can be checked against
    the reference with the kernel's own mask.
    """
    if dropout_p > 0.0 and keep is None:
        keep = torch_keep_mask(x.shape, dropout_p, seed, x.device, x.dtype)
    x_drop = x if dropout_p == 0.0 else x * keep.to(x.dtype) / (1.0 - dropout_p)
    y = x @ weight.t() + scale * ((x_drop @ lora_a.t()) @ lora_b.t())
    return y if bias is None else y + bias


def _torch_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: torch.Tensor | None,
    scale_eff: float,
    dropout_p: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU path of the forward on 2-D operands in one dtype; returns (y, xa)."""
    x_drop = x
    if dropout_p > 0.0:
        x_drop = x * torch_keep_mask(x.shape, dropout_p, seed, x.device, x.dtype)
    xa = torch.mm(x_drop, lora_a.t())
    y = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
    # The rank-r product accumulates into the base output inside the GEMM (beta=1): no extra
    # elementwise pass over y, which matters most in bf16 where the GEMMs themselves are fast.
    y.addmm_(xa, lora_b.t(), alpha=scale_eff)
    return y, xa


def _torch_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    xa: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale_eff: float,
    dropout_p: float,
    seed: int,
    need_dx: bool,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """CPU path of the backward on 2-D operands in one dtype; returns (dx, dA, dB)."""
    # dy·B is shared by dA and dx; scaling this (M,r) product once is cheaper than scaling
    # either (r,K) or (M,K) result.
    dyb = torch.mm(dy, lora_b).mul_(scale_eff)
    grad_b = torch.mm(dy.t(), xa).mul_(scale_eff)
    keep = None
    x_drop = x
    if dropout_p > 0.0:
        keep = torch_keep_mask(x.shape, dropout_p, seed, x.device, x.dtype)
        x_drop = x * keep
    grad_a = torch.mm(dyb.t(), x_drop)
    grad_x = None
    if need_dx:
        grad_x = torch.mm(dy, weight)
        if keep is None:
            grad_x.addmm_(dyb, lora_a)
        else:
            grad_x.add_(torch.mm(dyb, lora_a).mul_(keep))
    return grad_x, grad_a, grad_b


# ---------------------------------------------------------------------------------------------
# Autograd Function and public op
# ---------------------------------------------------------------------------------------------


class LoraLinearFunction(torch.autograd.Function):
    """Autograd Function of `lora_linear`; grads flow to x, lora_a and lora_b only."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        bias: torch.Tensor | None,
        scale: float,
        dropout_p: float,
        seed: int,
    ) -> torch.Tensor:
        dtype = compute_dtype(x)
        lead_shape, k = x.shape[:-1], x.shape[-1]
        scale_eff = effective_scale(scale, dropout_p)
        # Casts are explicit so the op means the same with or without autocast; autocast
        # itself is switched off around the GEMMs so it cannot re-cast anything.
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, k).to(dtype)
            w = weight.to(dtype)
            b_ = None if bias is None else bias.to(dtype)
            y, xa = _torch_forward(
                x2, w, lora_a.to(dtype), lora_b.to(dtype), b_, scale_eff, dropout_p, seed
            )
        ctx.save_for_backward(x2, xa, weight, lora_a, lora_b)
        ctx.scale_eff = scale_eff
        ctx.dropout_p = dropout_p
        ctx.seed = seed
        ctx.x_dtype = x.dtype
        return y.reshape(*lead_shape, weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x2, xa, weight, lora_a, lora_b = ctx.saved_tensors
        dtype = x2.dtype
        need_dx = ctx.needs_input_grad[0]
        with torch.autocast(grad_y.device.type, enabled=False):
            dy = grad_y.reshape(-1, grad_y.shape[-1]).to(dtype)
            dx, da, db = _torch_backward(
                dy,
                x2,
                xa,
                weight.to(dtype),
                lora_a.to(dtype),
                lora_b.to(dtype),
                ctx.scale_eff,
                ctx.dropout_p,
                ctx.seed,
                need_dx,
            )
        grad_x = None
        if dx is not None:
            grad_x = dx.to(ctx.x_dtype).reshape(*grad_y.shape[:-1], x2.shape[1])
        grad_a = da.to(lora_a.dtype) if ctx.needs_input_grad[2] else None
        grad_b = db.to(lora_b.dtype) if ctx.needs_input_grad[3] else None
        grad_weight = grad_bias = grad_scale = grad_p = grad_seed = None
        return grad_x, grad_weight, grad_a, grad_b, grad_bias, grad_scale, grad_p, grad_seed


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
) -> torch.Tensor:
    """`y = x·Wᵀ + bias + scale·(drop(x)·Aᵀ)·Bᵀ` for x (..., K), frozen weight (N, K) and bias
    (N), adapter lora_a (r, K), lora_b (N, r).

    Runs in the autocast dtype when autocast is on (adapter grads come back in the adapters'
    own dtype). `seed=None` draws the dropout seed from torch's RNG. Grads are returned for x
    (when it needs one), lora_a and lora_b, never for weight or bias.
    """
    check_dropout(dropout_p)
    return LoraLinearFunction.apply(
        x, weight, lora_a, lora_b, bias, float(scale), float(dropout_p), draw_seed(dropout_p, seed)
    )
