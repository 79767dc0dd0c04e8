"""Fused LoRA linear: a frozen projection plus a rank-r adapter, forward and backward.

Shapes: `x (M,K)` (any leading dims are flattened into M), frozen `w (N,K)`, optional frozen
`bias (N)`, adapter `a (r,K)`, `b (N,r)`, scale `s` (alpha/r). With LoRA dropout `drop(x) =
m ⊙ x / (1-p)` for a 0/1 keep-mask `m`; the 1/(1-p) is folded into `s' = s/(1-p)`, and s' into
the rank-r products when they are formed, so every later product is a plain GEMM:

    xa = s'·(m ⊙ x)·Aᵀ                    (M,r)   saved for backward, with x
    y  = x·Wᵀ + bias + xa·Bᵀ              (M,N)
    g  = s'·dy·B                          (M,r)
    dx = dy·W + m ⊙ (g·A)                 (M,K)   only when x needs a grad
    dA = gᵀ·(m ⊙ x)                       (r,K)
    dB = dyᵀ·xa                           (N,r)

dW and d(bias) are never computed. The mask is never stored: forward and backward both draw it
from the same seed. This is the one-segment case of the shared GEMMs (`_gemm`): thin GEMM for
xa and g, the main GEMM with the rank-r epilogue for y and dx, the TN GEMM for dA and dB.
"""

from __future__ import annotations

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
)
from ._gemm import inspect_target

# --------------------------------------------------------------------------------------------
# Plain-torch reference (test oracle) and the fast torch path (CPU execution)
# --------------------------------------------------------------------------------------------


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
        keep = torch_keep_mask(x.shape, dropout_p, seed, x.device)
    x_drop = x if dropout_p == 0.0 else x * keep.to(x.dtype) / (1.0 - dropout_p)
    y = x @ weight.t() + scale * ((x_drop @ lora_a.t()) @ lora_b.t())
    return y if bias is None else y + bias


# --------------------------------------------------------------------------------------------
# Custom ops (torch.compile traces them without a graph break) and their autograd
# --------------------------------------------------------------------------------------------
# The op takes 2-D x (M,K) in its own dtype and casts to the compute dtype `dtype` inside, so
# only x itself is saved for backward (no compute-dtype copy). Both paths are the one-member
# case of the grouped GEMMs in `_gemm`.


@registered_op(triton_op, "fastmid::lora_linear")
def _lora_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, xa) of the forward in `dtype`; `scale` is the effective one (1/(1-p) folded in)."""
    # Casts are explicit so the op means the same with or without autocast; autocast itself is
    # off inside so it cannot re-cast anything.
    with torch.autocast(x.device.type, enabled=False):
        bias = None if bias is None else bias.to(dtype)
        a, b = [lora_a.to(dtype)], [lora_b.to(dtype)]
        return _gemm.lora_forward(
            x.to(dtype), weight.to(dtype), bias, a, b, [scale], dropout_p, seed
        )


@registered_op(triton_op, "fastmid::lora_linear_backward")
def _lora_linear_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    xa: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    dtype: torch.dtype,
    need_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dA, dB): dx in x's dtype (empty when `need_dx` is False), dA and dB in the
    adapters' dtypes."""
    with torch.autocast(x.device.type, enabled=False):
        dy = dy.to(dtype)
        a, b = [lora_a.to(dtype)], [lora_b.to(dtype)]
        dx, da, (db,) = _gemm.lora_backward(
            x.to(dtype), dy, [dy], weight.to(dtype), a, b, [scale], xa, dropout_p, seed, need_dx
        )
    return dx.to(x.dtype), da.to(lora_a.dtype), db.to(lora_b.dtype)


_ARG_NAMES = ("x", "weight", "lora_a", "lora_b", "bias", "scale", "dropout_p", "seed", "dtype")


def _setup_context(ctx, inputs, output) -> None:
    x, weight, lora_a, lora_b, _bias, scale, dropout_p, seed, dtype = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], seed)
    ctx.scale, ctx.dropout_p, ctx.dtype = scale, dropout_p, dtype


def _backward(ctx, grad_y, _grad_xa):
    x, weight, lora_a, lora_b, xa, seed = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    dx, da, db = _lora_linear_backward_op(
        grad_y, x, xa, weight, lora_a, lora_b, ctx.scale, ctx.dropout_p, seed, ctx.dtype, need_dx
    )
    grads = dict.fromkeys(_ARG_NAMES)
    grads["x"] = dx if need_dx else None
    grads["lora_a"] = da if ctx.needs_input_grad[2] else None
    grads["lora_b"] = db if ctx.needs_input_grad[3] else None
    return tuple(grads[n] for n in _ARG_NAMES)


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """`y = x·Wᵀ + bias + scale·(drop(x)·Aᵀ)·Bᵀ` for x (..., K), frozen weight (N, K) and bias
    (N), adapter lora_a (r, K), lora_b (N, r).

    Runs in the autocast dtype when autocast is on (adapter grads come back in the adapters'
    own dtype). `seed` (an int or a 0-dim integer tensor) fixes the dropout mask; None draws it
    from torch's generator. Grads are returned for x (when it needs one), lora_a and lora_b,
    never for weight or bias.
    """
    check_dropout(dropout_p)
    k = x.shape[-1]
    y, _ = _lora_linear_op(
        x.reshape(-1, k),
        weight,
        lora_a,
        lora_b,
        bias,
        effective_scale(scale, dropout_p),
        float(dropout_p),
        dropout_seed(dropout_p, seed, x.device),
        compute_dtype(x),
    )
    return y.view(*x.shape[:-1], weight.shape[0])


# --------------------------------------------------------------------------------------------
# Ahead-of-time compilation targets (`python -m fastmid.kernels.cubin_report`)
# --------------------------------------------------------------------------------------------


# Each launch as the op makes it, with the unit strides of its real operands, dropout on where
# it can be (the heaviest variant) and the rank blocks of the default budget-matched rank
# (r > 64: a 128-wide thin tile, 64-wide chunks in the main GEMM's epilogue).
INSPECT_TARGETS = [
    inspect_target(
        "lora_linear_fwd_xa", "thin", ones=("stride_xk", "stride_wk"),
        divisible=("K", "stride_xm", "stride_wr", "stride_om"), DROPOUT=True, BR=128,
    ),
    inspect_target(
        "lora_linear_fwd_y", "main", ones=("stride_xk", "stride_wk", "s0_br", "s1_br", "s2_br"),
        divisible=("N", "K", "stride_xm", "stride_wn", "stride_ym", "stride_xam"),
        HAS_BIAS=True, NUM_SEG=1, DROPOUT=False, BR=64, GROUP_M=8,
    ),
    inspect_target(
        "lora_linear_bwd_g", "thin", ones=("stride_xk", "stride_wr"),
        divisible=("K", "stride_xm", "stride_wk", "stride_om"), DROPOUT=False, BR=128,
    ),
    inspect_target(
        "lora_linear_bwd_dx", "main", ones=("stride_xk", "stride_wn", "s0_bn", "s1_bn", "s2_bn"),
        divisible=("N", "K", "stride_xm", "stride_wk", "stride_ym", "s0_br", "s1_br", "s2_br"),
        HAS_BIAS=False, NUM_SEG=1, DROPOUT=False, BR=64, GROUP_M=8,
    ),
    inspect_target(
        "lora_linear_bwd_dx_dropout", "main_dropout",
        ones=("stride_xk", "stride_wn", "s0_bn", "s1_bn", "s2_bn"),
        divisible=("N", "K", "stride_xm", "stride_wk", "stride_ym", "s0_br", "s1_br", "s2_br"),
        HAS_BIAS=False, NUM_SEG=1, DROPOUT=True, BR=64, GROUP_M=8,
    ),
    inspect_target(
        "lora_linear_bwd_da", "tn", ones=("stride_lp",),
        divisible=("Q", "stride_lm", "stride_rm", "stride_os", "stride_op"), DROPOUT=True,
    ),
    inspect_target(
        "lora_linear_bwd_db", "tn", ones=("stride_lp",),
        divisible=("P", "stride_lm", "stride_rm", "stride_os", "stride_op"), DROPOUT=False,
    ),
]  # fmt: skip
