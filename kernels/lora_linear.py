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
from the same seed. This is the one-member case of the grouped composition (`_lora`): cuBLAS
for the frozen GEMMs with the rank-r terms added by `addmm_`, Triton for the dropout-masked
products (`_gemm`, whose launches this module registers for `cubin_report`).
"""

from __future__ import annotations

import torch

from . import _lora
from ._common import check_dropout, compute_dtype, dropout_seed, effective_scale, torch_keep_mask
from ._gemm import inspect_target

# --------------------------------------------------------------------------------------------
# Plain-torch reference (test oracle) and the fast torch path (CPU execution)
# --------------------------------------------------------------------------------------------


def lora_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
    scale: float, bias: torch.Tensor | None = None, dropout_p: float = 0.0, seed: int = 0,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """The op's math written the obvious way, differentiable by autograd.

    `keep` (0/1, shape of `x`) overrides the seeded mask, so a kernel can be checked against
    the reference with the kernel's own mask.
    """
    if dropout_p > 0.0 and keep is None:
        keep = torch_keep_mask(x.shape, dropout_p, seed, x.device)
    x_drop = x if dropout_p == 0.0 else x * keep.to(x.dtype) / (1.0 - dropout_p)
    y = x @ weight.t() + scale * ((x_drop @ lora_a.t()) @ lora_b.t())
    return y if bias is None else y + bias


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor | None = None,
    seed_offset: int = 0,
) -> torch.Tensor:
    """`y = x·Wᵀ + bias + scale·(drop(x)·Aᵀ)·Bᵀ` for x (..., K), frozen weight (N, K) and bias
    (N), adapter lora_a (r, K), lora_b (N, r).

    Runs in the autocast dtype when autocast is on (adapter grads come back in the adapters'
    own dtype). `seed` (an int or a 0-dim int64 tensor on x's device: the micro-batch's seed)
    plus `seed_offset` (the layer's) fix the dropout mask; seed None draws one from torch's
    generator. Grads are returned for x (when it needs one), lora_a and lora_b, never for
    weight or bias.
    """
    check_dropout(dropout_p)
    k = x.shape[-1]
    spec = _lora.Spec(
        (effective_scale(scale, dropout_p),), float(dropout_p), seed_offset, compute_dtype(x),
        cache=torch.is_grad_enabled(),
    )  # fmt: skip
    seed_t = dropout_seed(dropout_p, seed, x.device)
    x2 = x.reshape(-1, k)
    y = _lora.apply("lora_linear", x2, weight, bias, (lora_a,), (lora_b,), spec, seed_t)
    return y.view(*x.shape[:-1], weight.shape[0])


# --------------------------------------------------------------------------------------------
# Ahead-of-time compilation targets (`python -m fastmid.kernels.cubin_report`): the three
# Triton launches every LoRA op makes with dropout on (q/k/v and gate/up make the same ones
# with more rank columns), with the unit strides of their real operands and the rank blocks of
# the default budget-matched rank (r > 64: a 128-wide thin tile, 64-wide chunks in the dx
# update).
# --------------------------------------------------------------------------------------------
INSPECT_TARGETS = [
    inspect_target(
        "lora_linear_fwd_xa", "thin", ones=("stride_xk", "stride_wk"),
        divisible=("K", "stride_xm", "stride_wr", "stride_om"), BR=128,
    ),
    inspect_target(
        "lora_linear_bwd_da", "tn", ones=("stride_lp",),
        divisible=("Q", "stride_lm", "stride_rm", "stride_os", "stride_op"),
    ),
    inspect_target(
        "lora_linear_bwd_dx_dropout", "masked_add", ones=("stride_dk", "stride_gr", "stride_ak"),
        divisible=("K", "stride_dm", "stride_gm", "stride_ar"), BR=64,
    ),
]  # fmt: skip
