"""Grouped LoRA q/k/v projection: three adapted linears that read x once.

Shapes (leading dims of x flattened into M):
    x (M,K); frozen w = cat(Wq, Wk, Wv) (N,K) with N = Nq+Nk+Nv; optional bias (N,);
    a_i (r_i,K), b_i (N_i,r_i), scale s_i for i in q, k, v; R = r_q+r_k+r_v.

LoRA dropout uses a 0/1 keep-mask m with 1/(1-p) folded into the scales, s_i' = s_i/(1-p);
ONE mask is shared by q, k and v because they read the same x:
    xa   = (m ⊙ x)·[s_q' A_q; s_k' A_k; s_v' A_v]ᵀ               (M,R)   one thin GEMM
    y    = x·wᵀ + bias + [xa_q B_qᵀ | xa_k B_kᵀ | xa_v B_vᵀ]       (M,N)   = q | k | v
    g    = [s_q' dq·B_q | s_k' dk·B_k | s_v' dv·B_v]              (M,R)
    dx   = dy·w + m ⊙ (g·[A_q; A_k; A_v])    (skipped when x needs no grad)
    dA_i = g_iᵀ·(m ⊙ x)                    dB_i = dy_iᵀ·xa_i
dW and dbias are never computed. The scales are folded into xa and g when they are formed, so
every later product is a plain GEMM with no per-member rescaling pass. Forward saves x and xa
only (R columns, a few percent of the output); the dropout mask is redrawn from its seed in
backward instead of being stored.

Execution: the three-member case of the grouped composition in `_lora` — one cuBLAS GEMM over
the fused weight for y and one for dx, each member's rank-r product accumulated into its
columns of y by `addmm_` (beta=1, so no extra pass); the dropout-masked products on Triton
where it runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _lora
from ._common import check_dropout, compute_dtype, dropout_seed, effective_scale, torch_keep_mask

__all__ = ["lora_qkv", "lora_qkv_reference"]


# --------------------------------------------------------------------------------------------
# Plain-torch reference (test oracle)
# --------------------------------------------------------------------------------------------
def lora_qkv_reference(
    x: torch.Tensor, weight_qkv: torch.Tensor,
    a_q: torch.Tensor, a_k: torch.Tensor, a_v: torch.Tensor,
    b_q: torch.Tensor, b_k: torch.Tensor, b_v: torch.Tensor,
    scales: float | Sequence[float], bias_qkv: torch.Tensor | None = None,
    dropout_p: float = 0.0, seed: int = 0, keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Three independent LoRA linears on x, by plain autograd: the oracle for `lora_qkv`.

    `keep` (0/1, shape of x) overrides the seeded mask, so a kernel can be checked against the
    reference with the kernel's own mask.
    """
    scales = _triple(scales)
    if dropout_p > 0.0 and keep is None:
        keep = torch_keep_mask(x.shape, dropout_p, seed, x.device)
    xd = x if dropout_p == 0.0 else x * keep.to(x.dtype) / (1.0 - dropout_p)
    sizes = [b.shape[0] for b in (b_q, b_k, b_v)]
    ws = weight_qkv.split(sizes)
    biases = bias_qkv.split(sizes) if bias_qkv is not None else (None,) * 3
    return tuple(
        torch.nn.functional.linear(x, w, bias) + s * ((xd @ a.t()) @ b.t())
        for w, bias, a, b, s in zip(
            ws, biases, (a_q, a_k, a_v), (b_q, b_k, b_v), scales, strict=True
        )
    )


def _triple(scales: float | Sequence[float]) -> tuple[float, float, float]:
    if isinstance(scales, (int, float)):
        return (float(scales),) * 3
    if len(scales) != 3:
        raise ValueError(f"scales must be one float or three (q, k, v), got {len(scales)}")
    return tuple(float(s) for s in scales)


def lora_qkv(
    x: torch.Tensor,
    weight_qkv: torch.Tensor,
    a_q: torch.Tensor,
    a_k: torch.Tensor,
    a_v: torch.Tensor,
    b_q: torch.Tensor,
    b_k: torch.Tensor,
    b_v: torch.Tensor,
    scales: float | Sequence[float],
    bias_qkv: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor | None = None,
    seed_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v = three LoRA linears sharing one read of x (see the module docstring).

    x (..., K); weight_qkv = cat(Wq, Wk, Wv) (Nq+Nk+Nv, K), frozen, built once by the caller;
    a_i (r_i, K); b_i (N_i, r_i); scales: one float or (s_q, s_k, s_v); bias_qkv (N,) or None.
    One dropout mask is shared by q, k and v; `seed` (int or 0-dim tensor) plus `seed_offset`
    fix it, seed None draws one from torch's generator.
    Returns q (..., Nq), k (..., Nk), v (..., Nv), column views of one fused output buffer.
    """
    K = x.shape[-1]
    sizes = [b.shape[0] for b in (b_q, b_k, b_v)]
    if weight_qkv.shape != (sum(sizes), K):
        raise ValueError(f"weight_qkv is {tuple(weight_qkv.shape)}, expected ({sum(sizes)}, {K})")
    for a, b in zip((a_q, a_k, a_v), (b_q, b_k, b_v), strict=True):
        if a.shape[1] != K or b.shape[1] != a.shape[0]:
            raise ValueError(f"adapter shapes A {tuple(a.shape)}, B {tuple(b.shape)} for K={K}")
    check_dropout(dropout_p)
    spec = _lora.Spec(
        tuple(effective_scale(s, dropout_p) for s in _triple(scales)), float(dropout_p),
        seed_offset, compute_dtype(x), cache=torch.is_grad_enabled(),
    )  # fmt: skip
    seed_t = dropout_seed(dropout_p, seed, x.device)
    y = _lora.apply(
        "lora_qkv", x.reshape(-1, K), weight_qkv, bias_qkv, (a_q, a_k, a_v), (b_q, b_k, b_v),
        spec, seed_t,
    )  # fmt: skip
    # q, k, v are column views of the one fused output: no copy out of it.
    return tuple(t.view(*x.shape[:-1], t.shape[1]) for t in y.split(sizes, dim=1))
