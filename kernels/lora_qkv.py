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

Execution: Triton kernels when `use_triton(x)` (CUDA, or the interpreter under
TRITON_INTERPRET=1); otherwise a torch path of few BLAS calls: one base GEMM over the
concatenated weight, the three rank-r products accumulated into column views of its output by
`addmm_` (beta=1, so no extra pass), one dx GEMM over the concatenated weight.

This file also holds the grouped building blocks that `lora_gate_up` reuses: the thin GEMM
(`launch_thin`), the weight-gradient GEMM (`launch_tn`) and the base GEMM with segment
epilogues (`launch_grouped_mm`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._common import (
    InspectTarget,
    check_dropout,
    compute_dtype,
    cuda_arch,
    draw_seed,
    effective_scale,
    keep_mask,
    kernel_signature,
    shipped_arch,
    to_triton_configs,
    torch_keep_mask,
    use_triton,
)

__all__ = ["LoraQKVFunction", "lora_qkv", "lora_qkv_reference"]


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _thin_kernel(
    X, W, OUT,
    M, R, K,
    stride_xm, stride_xk, stride_wr, stride_wk, stride_om,
    scale0, scale1, scale2, c1, c2, seed, p,
    DROPOUT: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """OUT (M,R) = (m ⊙ X)·Wᵀ with column r scaled by its member's scale: scale0 on [0, c1),
    scale1 on [c1, c2), scale2 on [c2, R). The rank-r GEMM (K is the long reduction)."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rr = pid_r * BR + tl.arange(0, BR)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    r_ok = rr < R
    x_ptr = X + rm[:, None].to(tl.int64) * stride_xm + rk[None, :] * stride_xk
    w_ptr = W + rr[None, :] * stride_wr + rk[:, None] * stride_wk
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_ok = (k0 + rk) < K
        x = tl.load(x_ptr, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if DROPOUT:
            offs = rm[:, None].to(tl.int64) * K + (k0 + rk)[None, :]
            x = tl.where(keep_mask(seed, offs, p), x, 0.0).to(x.dtype)
        w = tl.load(w_ptr, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(x, w, acc)
        x_ptr += BK * stride_xk
        w_ptr += BK * stride_wk
    scale = tl.where(rr < c1, scale0, tl.where(rr < c2, scale1, scale2))
    acc *= scale[None, :]
    o_ptr = OUT + rm[:, None].to(tl.int64) * stride_om + rr[None, :]
    tl.store(o_ptr, acc.to(OUT.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _tn_kernel(
    L, RT, OUT,
    P, Q, M,
    stride_lm, stride_lp, stride_rm, stride_op,
    seed, p, scale,
    DROPOUT: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr, BM: tl.constexpr,
):  # fmt: skip
    """OUT (P,Q) = scale·Lᵀ·drop(RT), reduced over the M rows: the adapter gradients.

    RT is row-major with unit column stride; its dropout offsets are row·Q + col, the same
    element indices the forward thin GEMM used for x, so the mask is redrawn exactly.
    """
    pid_p = tl.program_id(0)
    pid_q = tl.program_id(1)
    rp = pid_p * BP + tl.arange(0, BP)
    rq = pid_q * BQ + tl.arange(0, BQ)
    rm = tl.arange(0, BM)
    p_ok = rp < P
    q_ok = rq < Q
    acc = tl.zeros((BP, BQ), dtype=tl.float32)
    for m0 in range(0, M, BM):
        rows = m0 + rm
        m_ok = rows < M
        lt = tl.load(
            L + rows[None, :].to(tl.int64) * stride_lm + rp[:, None] * stride_lp,
            mask=p_ok[:, None] & m_ok[None, :],
            other=0.0,
        )
        rt = tl.load(
            RT + rows[:, None].to(tl.int64) * stride_rm + rq[None, :],
            mask=m_ok[:, None] & q_ok[None, :],
            other=0.0,
        )
        if DROPOUT:
            offs = rows[:, None].to(tl.int64) * Q + rq[None, :]
            rt = tl.where(keep_mask(seed, offs, p), rt, 0.0).to(rt.dtype)
        acc = tl.dot(lt, rt, acc)
    acc *= scale
    o_ptr = OUT + rp[:, None].to(tl.int64) * stride_op + rq[None, :]
    tl.store(o_ptr, acc.to(OUT.dtype.element_ty), mask=p_ok[:, None] & q_ok[None, :])


@triton.jit
def add_segment(
    acc, XA, stride_xam, rm, m_ok, B, stride_bn, stride_br, rn, n0, n_lo, n_hi, r_len,
    BN: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    """acc += XA[rm, :r_len]·B[rn-n_lo, :r_len]ᵀ for the tile's columns inside [n_lo, n_hi).

    Accumulates straight into the GEMM accumulator (no second (BM,BN) buffer held live). A
    tile (columns n0..n0+BN) that does not touch the segment runs zero iterations.
    """
    in_seg = (rn >= n_lo) & (rn < n_hi)
    r_end = tl.where((n0 < n_hi) & (n0 + BN > n_lo), r_len, 0)
    rr = tl.arange(0, BR)
    for r0 in range(0, r_end, BR):
        r_ok = (r0 + rr) < r_len
        xa = tl.load(
            XA + rm[:, None].to(tl.int64) * stride_xam + (r0 + rr)[None, :],
            mask=m_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            B + (rn - n_lo)[None, :] * stride_bn + (r0 + rr)[:, None] * stride_br,
            mask=r_ok[:, None] & in_seg[None, :],
            other=0.0,
        )
        acc = tl.dot(xa, b, acc)
    return acc


@triton.jit
def tile_ids(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program on a 1-D grid, GROUP_M row tiles at a time: programs
    that run together share the same weight columns, so they stay in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % size_m, (pid % per_group) // size_m


@triton.jit
def _grouped_mm_kernel(
    X, W, BIAS, Y, XA, B0, B1, B2,
    M, N, K,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_ym, stride_xam,
    s0_bn, s0_br, s1_bn, s1_br, s2_bn, s2_br,
    n1, n2, xa1, xa2, r0_len, r1_len, r2_len, seed, p,
    HAS_BIAS: tl.constexpr, NUM_SEG: tl.constexpr, DROPOUT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """Y (M,N) = X·W (+bias) + Σ_seg XA_seg·B_segᵀ on the segment's columns.

    W is addressed as (K,N) through strides, so the same kernel runs the forward base GEMM
    (W = wᵀ) and the backward dx GEMM (W = w). Segment s covers columns [n_s, n_{s+1}) with
    n_0 = 0, n_3 = N (with one segment, n1 = N), and reads XA from column xa_s (xa_0 = 0).
    DROPOUT (dx only, one segment) masks the low-rank term with the forward keep-mask of x:
    dx = dy·w + m ⊙ (g·A).
    """
    pid_m, pid_n = tile_ids(M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    n_ok = rn < N
    x_ptr = X + rm[:, None].to(tl.int64) * stride_xm + rk[None, :] * stride_xk
    w_ptr = W + rn[None, :].to(tl.int64) * stride_wn + rk[:, None].to(tl.int64) * stride_wk
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_ok = (k0 + rk) < K
        x = tl.load(x_ptr, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(x, w, acc)
        x_ptr += BK * stride_xk
        w_ptr += BK * stride_wk
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    n0 = pid_n * BN
    if DROPOUT:
        # The mask applies to the low-rank term only, so it needs its own accumulator here.
        lo = tl.zeros((BM, BN), dtype=tl.float32)
        lo = add_segment(
            lo, XA, stride_xam, rm, m_ok, B0, s0_bn, s0_br, rn, n0, 0, n1, r0_len, BN, BR
        )
        offs = rm[:, None].to(tl.int64) * N + rn[None, :]
        acc += tl.where(keep_mask(seed, offs, p), lo, 0.0)
    else:
        acc = add_segment(
            acc, XA, stride_xam, rm, m_ok, B0, s0_bn, s0_br, rn, n0, 0, n1, r0_len, BN, BR
        )
    if NUM_SEG == 3:
        acc = add_segment(
            acc, XA + xa1, stride_xam, rm, m_ok, B1, s1_bn, s1_br, rn, n0, n1, n2, r1_len, BN, BR
        )
        acc = add_segment(
            acc, XA + xa2, stride_xam, rm, m_ok, B2, s2_bn, s2_br, rn, n0, n2, N, r2_len, BN, BR
        )
    y_ptr = Y + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
    tl.store(y_ptr, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# --------------------------------------------------------------------------------------------
# Launchers: check → allocate (by the caller) → grid → launch
# --------------------------------------------------------------------------------------------
# Shipped configs per arch. Every one compiles with zero spills and tensor-core MMAs
# (`python -m fastmid.kernels.inspect`). The thin GEMMs are memory bound (R ≤ a few hundred
# columns), so they get tall M tiles; the base GEMM gets the usual square-ish tiles.
_MAIN = [
    {"BM": 128, "BN": 128, "BK": 64, "BR": 32, "num_warps": 8, "num_stages": 3},
    {"BM": 128, "BN": 64, "BK": 64, "BR": 32, "num_warps": 8, "num_stages": 3},
    {"BM": 64, "BN": 64, "BK": 64, "BR": 32, "num_warps": 4, "num_stages": 4},
]
_THIN = [
    {"BM": 128, "BR": 64, "BK": 64, "num_warps": 4, "num_stages": 4},
    {"BM": 64, "BR": 32, "BK": 64, "num_warps": 4, "num_stages": 4},
    {"BM": 64, "BR": 16, "BK": 128, "num_warps": 4, "num_stages": 3},
]
_TN = [
    {"BP": 64, "BQ": 64, "BM": 64, "num_warps": 4, "num_stages": 4},
    {"BP": 128, "BQ": 32, "BM": 64, "num_warps": 4, "num_stages": 4},
    {"BP": 64, "BQ": 16, "BM": 128, "num_warps": 4, "num_stages": 3},
]
GROUPED_MM_CONFIGS = {80: _MAIN, 90: _MAIN}
# dx with dropout keeps a second (BM,BN) accumulator for the masked low-rank term and draws a
# Philox mask over the tile: half-size tiles.
_MAIN_DROPOUT = [
    {"BM": 64, "BN": 128, "BK": 64, "BR": 32, "num_warps": 8, "num_stages": 3},
    {"BM": 64, "BN": 64, "BK": 64, "BR": 32, "num_warps": 4, "num_stages": 3},
]
GROUPED_MM_DROPOUT_CONFIGS = {80: _MAIN_DROPOUT, 90: _MAIN_DROPOUT}
# sm_80: the 64×16×128 thin tile with the dropout mask spills 8 bytes there; BK=64 instead.
THIN_CONFIGS = {
    80: [*_THIN[:2], {"BM": 64, "BR": 16, "BK": 64, "num_warps": 4, "num_stages": 4}],
    90: _THIN,
}
TN_CONFIGS = {80: _TN, 90: _TN}

# Under the interpreter: one small config, so modest test shapes still cross tile edges; the
# thin/grad tiles are wide over the rank so the (slow, interpreted) dropout mask is drawn
# few times.
_INTERPRET_META = {
    "grouped_mm": {"BM": 32, "BN": 32, "BK": 32, "BR": 32},
    "grouped_mm_dropout": {"BM": 32, "BN": 32, "BK": 32, "BR": 32},
    "thin": {"BM": 32, "BR": 64, "BK": 64},
    "tn": {"BP": 32, "BQ": 64, "BM": 64},
}
# M is left out of the autotune keys: packed batches change it every step, N and K do not.
_KERNELS = {
    "grouped_mm": (_grouped_mm_kernel, GROUPED_MM_CONFIGS, ["N", "K", "NUM_SEG"]),
    "grouped_mm_dropout": (_grouped_mm_kernel, GROUPED_MM_DROPOUT_CONFIGS, ["N", "K"]),
    "thin": (_thin_kernel, THIN_CONFIGS, ["R", "K", "DROPOUT"]),
    "tn": (_tn_kernel, TN_CONFIGS, ["P", "Q", "DROPOUT"]),
}
_tuned: dict[tuple[str, int], object] = {}


def _launch(name: str, device: torch.device, grid, **args) -> None:
    kernel, configs, key = _KERNELS[name]
    if device.type != "cuda":
        kernel[grid](**args, **_INTERPRET_META[name])
        return
    arch = shipped_arch(cuda_arch(device))
    if (name, arch) not in _tuned:
        _tuned[name, arch] = triton.autotune(to_triton_configs(configs[arch]), key=key)(kernel)
    _tuned[name, arch][grid](**args)


def launch_thin(
    x: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    scales: Sequence[float],
    ranks: Sequence[int],
    dropout_p: float = 0.0,
    seed: int = 0,
) -> None:
    """out (M,R) = (m ⊙ x)·wᵀ, each member's rank columns times its scale; x (M,K), w (R,K)
    any strides; one to three members with R = Σ ranks.

    The keep-mask m (only when dropout_p > 0) is drawn at x's row-major offsets row·K + col.
    """
    M, K = x.shape
    R = w.shape[0]
    assert w.shape[1] == K and out.shape == (M, R) and out.stride(1) == 1
    assert sum(ranks) == R and 1 <= len(ranks) <= 3
    s = [float(v) for v in scales] + [0.0] * (3 - len(scales))
    c1 = ranks[0] if len(ranks) > 1 else R
    c2 = c1 + ranks[1] if len(ranks) > 2 else R
    grid = lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(R, meta["BR"]))
    _launch(
        "thin", x.device, grid,
        X=x, W=w, OUT=out, M=M, R=R, K=K,
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        stride_wr=w.stride(0), stride_wk=w.stride(1), stride_om=out.stride(0),
        scale0=s[0], scale1=s[1], scale2=s[2], c1=c1, c2=c2, seed=seed, p=dropout_p,
        DROPOUT=dropout_p > 0,
    )  # fmt: skip


def launch_tn(
    lhs: torch.Tensor,
    rhs: torch.Tensor,
    out: torch.Tensor,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> None:
    """out (P,Q) = lhsᵀ·(m ⊙ rhs); lhs (M,P) any strides, rhs (M,Q) with unit column stride."""
    M, P = lhs.shape
    Q = rhs.shape[1]
    assert rhs.shape[0] == M and rhs.stride(1) == 1
    assert out.shape == (P, Q) and out.stride(1) == 1
    grid = lambda meta: (triton.cdiv(P, meta["BP"]), triton.cdiv(Q, meta["BQ"]))
    _launch(
        "tn", lhs.device, grid,
        L=lhs, RT=rhs, OUT=out, P=P, Q=Q, M=M,
        stride_lm=lhs.stride(0), stride_lp=lhs.stride(1), stride_rm=rhs.stride(0),
        stride_op=out.stride(0), seed=seed, p=dropout_p, scale=1.0, DROPOUT=dropout_p > 0,
    )  # fmt: skip


def launch_grouped_mm(
    x: torch.Tensor,
    w_kn: torch.Tensor,
    out: torch.Tensor,
    xa: torch.Tensor,
    segments: Sequence[tuple[torch.Tensor, int, int]],
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> None:
    """out (M,N) = x·w_kn (+bias) + Σ xa[:, c:c+r]·bᵀ on each segment's columns.

    x (M,K) and w_kn (K,N) any strides; xa (M,R) and out with unit column stride. `segments`
    holds one or three (b (N_s, r_s) any strides, first column n_s, first xa column c_s),
    covering the columns of out in order. dropout_p > 0 (one segment only) masks the low-rank
    term with the keep-mask at out's offsets row·N + col (dx has x's shape).
    """
    M, K = x.shape
    N = w_kn.shape[1]
    assert w_kn.shape[0] == K and out.shape == (M, N) and out.stride(1) == 1
    assert xa.stride(1) == 1 and len(segments) in (1, 3)
    assert dropout_p == 0.0 or len(segments) == 1
    segs = list(segments) + [segments[0]] * (3 - len(segments))
    (b0, _, _), (b1, n1, c1), (b2, n2, c2) = segs
    if len(segments) == 1:
        n1, n2, c1, c2 = N, N, 0, 0
    grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)
    _launch(
        "grouped_mm_dropout" if dropout_p > 0 else "grouped_mm", x.device, grid,
        X=x, W=w_kn, BIAS=bias if bias is not None else out, Y=out, XA=xa, B0=b0, B1=b1, B2=b2,
        M=M, N=N, K=K,
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        stride_wk=w_kn.stride(0), stride_wn=w_kn.stride(1),
        stride_ym=out.stride(0), stride_xam=xa.stride(0),
        s0_bn=b0.stride(0), s0_br=b0.stride(1), s1_bn=b1.stride(0), s1_br=b1.stride(1),
        s2_bn=b2.stride(0), s2_br=b2.stride(1),
        n1=n1, n2=n2, xa1=c1, xa2=c2,
        r0_len=b0.shape[1], r1_len=b1.shape[1], r2_len=b2.shape[1], seed=seed, p=dropout_p,
        HAS_BIAS=bias is not None, NUM_SEG=len(segments), DROPOUT=dropout_p > 0, GROUP_M=8,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Forward / backward on both paths. 2-D operands in the compute dtype; `scales` are the
# effective ones (dropout's 1/(1-p) folded in), the keep-mask is 0/1.
# --------------------------------------------------------------------------------------------
def _forward_triton(x, w, bias, a_list, b_list, scales, p, seed):
    M = x.shape[0]
    ranks = [a.shape[0] for a in a_list]
    xa = torch.empty(M, sum(ranks), dtype=x.dtype, device=x.device)
    a_cat = torch.cat(a_list).to(x.dtype)
    launch_thin(x, a_cat, xa, scales, ranks, p, seed)
    y = torch.empty(M, w.shape[0], dtype=x.dtype, device=x.device)
    segs, n0, c0 = [], 0, 0
    for b, r in zip(b_list, ranks, strict=True):
        segs.append((b.to(x.dtype), n0, c0))
        n0, c0 = n0 + b.shape[0], c0 + r
    launch_grouped_mm(x, w.t(), y, xa, segs, bias)
    return y, xa


def _forward_torch(x, w, bias, a_list, b_list, scales, p, seed):
    # Scales folded into A's rows: one small (R,K) op instead of a pass over xa.
    a_s = torch.cat([a * s for a, s in zip(a_list, scales, strict=True)]).to(x.dtype)
    xd = x if p == 0 else x * torch_keep_mask(x.shape, p, seed, x.device, x.dtype)
    xa = torch.mm(xd, a_s.t())
    y = torch.mm(x, w.t()) if bias is None else torch.addmm(bias, x, w.t())
    n0 = c0 = 0
    for b in b_list:
        n, r = b.shape
        # beta=1 GEMM into a column view: the low-rank term lands in the same BLAS call.
        y[:, n0 : n0 + n].addmm_(xa[:, c0 : c0 + r], b.to(x.dtype).t())
        n0, c0 = n0 + n, c0 + r
    return y, xa


def _backward_triton(x, dys, w, a_list, b_list, scales, xa, p, seed, need_dx):
    M, K = x.shape
    ranks = [a.shape[0] for a in a_list]
    gs = torch.empty(M, sum(ranks), dtype=x.dtype, device=x.device)
    c0 = 0
    for dy, b, s, r in zip(dys, b_list, scales, ranks, strict=True):
        launch_thin(dy, b.to(x.dtype).t(), gs[:, c0 : c0 + r], [s], [r])
        c0 += r
    da = torch.empty(sum(ranks), K, dtype=torch.float32, device=x.device)
    launch_tn(gs, x, da, p, seed)
    dbs, c0 = [], 0
    for dy, b, r in zip(dys, b_list, ranks, strict=True):
        db = torch.empty(b.shape, dtype=torch.float32, device=x.device)
        launch_tn(dy, xa[:, c0 : c0 + r], db)
        dbs.append(db)
        c0 += r
    dx = None
    if need_dx:
        dx = torch.empty(M, K, dtype=x.dtype, device=x.device)
        a_cat = torch.cat(a_list).to(x.dtype)
        launch_grouped_mm(torch.cat(dys, 1), w, dx, gs, [(a_cat.t(), 0, 0)], None, p, seed)
    return dx, da, dbs


def grouped_backward_torch(x, dys, w, a_list, b_list, scales, xa, p, seed, need_dx):
    """Torch backward of grouped LoRA linears over the frozen concatenation `w`, given each
    member's output gradient in `dys`: (dx or None, dA of all members stacked, [dB_i]).
    Shared with lora_gate_up, whose member gradients are dg and du."""
    M = x.shape[0]
    ranks = [a.shape[0] for a in a_list]
    keep = None if p == 0 else torch_keep_mask(x.shape, p, seed, x.device, x.dtype)
    # g is built transposed, (R,M): each member's rows are a contiguous slice to write into.
    gt = torch.empty(sum(ranks), M, dtype=x.dtype, device=x.device)
    c0 = 0
    for dy, b, s, r in zip(dys, b_list, scales, ranks, strict=True):
        torch.mm((b * s).to(x.dtype).t(), dy.t(), out=gt[c0 : c0 + r])
        c0 += r
    da = torch.mm(gt, x if keep is None else x * keep)
    dbs, c0 = [], 0
    for dy, r in zip(dys, ranks, strict=True):
        dbs.append(torch.mm(dy.t(), xa[:, c0 : c0 + r]))
        c0 += r
    dx = None
    if need_dx:
        # dy·w as three GEMMs accumulating into dx (beta=1): no (M,N) concatenation of dq, dk,
        # dv, and measured no slower than one GEMM over it.
        n0 = 0
        for dy in dys:
            w_i = w[n0 : n0 + dy.shape[1]]
            dx = torch.mm(dy, w_i) if dx is None else dx.addmm_(dy, w_i)
            n0 += dy.shape[1]
        a_cat = torch.cat(a_list).to(x.dtype)
        if keep is None:
            dx.addmm_(gt.t(), a_cat)
        else:
            dx.add_(torch.mm(gt.t(), a_cat).mul_(keep))
    return dx, da, dbs


# --------------------------------------------------------------------------------------------
# Plain-torch reference (test oracle)
# --------------------------------------------------------------------------------------------
def lora_qkv_reference(
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
    seed: int = 0,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three independent LoRA linears on x, by plain autograd: the oracle for `lora_qkv`.

    `keep` (0/1, shape of x) overrides the seeded mask, so a kernel can be checked against the
    reference with the kernel's own mask.
    """
    scales = _triple(scales)
    if dropout_p > 0.0 and keep is None:
        keep = torch_keep_mask(x.shape, dropout_p, seed, x.device, x.dtype)
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


# --------------------------------------------------------------------------------------------
# Autograd Function and functional op
# --------------------------------------------------------------------------------------------
_ARG_NAMES = ("x", "w", "bias", "a_q", "a_k", "a_v", "b_q", "b_k", "b_v", "scales", "p", "seed")


class LoraQKVFunction(torch.autograd.Function):
    """Autograd for `lora_qkv`: Triton where `use_triton(x)`, the torch path elsewhere."""

    @staticmethod
    def forward(ctx, x, w, bias, a_q, a_k, a_v, b_q, b_k, b_v, scales, p, seed):
        dt = compute_dtype(x)
        lead, K = x.shape[:-1], x.shape[-1]
        a_list, b_list = (a_q, a_k, a_v), (b_q, b_k, b_v)
        scales_eff = [effective_scale(s, p) for s in scales]
        run = _forward_triton if use_triton(x) else _forward_torch
        with torch.autocast(x.device.type, enabled=False):
            y, xa = run(
                x.reshape(-1, K).to(dt),
                w.to(dt),
                None if bias is None else bias.to(dt),
                a_list,
                b_list,
                scales_eff,
                p,
                seed,
            )
        # x itself, not its compute-dtype copy: under autocast the copy would be extra memory
        # for the whole step, while recasting in backward is one cheap pass.
        ctx.save_for_backward(x, w, *a_list, *b_list, xa)
        ctx.scales, ctx.p, ctx.seed, ctx.dtype = scales_eff, p, seed, dt
        # q, k, v are column views of one (M,N) buffer: no copy out of the fused output.
        outs, n0 = [], 0
        for b in b_list:
            n = b.shape[0]
            outs.append(y[:, n0 : n0 + n].view(*lead, n))
            n0 += n
        return tuple(outs)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        x, w, a_q, a_k, a_v, b_q, b_k, b_v, xa = ctx.saved_tensors
        dt, K = ctx.dtype, x.shape[-1]
        a_list, b_list = (a_q, a_k, a_v), (b_q, b_k, b_v)
        dys = [d.reshape(-1, d.shape[-1]).to(dt) for d in (dq, dk, dv)]
        x2 = x.reshape(-1, K).to(dt)
        # Dispatch on the compute-dtype copy: autocast is off in backward, so the saved x alone
        # would not tell that the GEMMs run in bf16 (which the interpreter cannot do).
        run = _backward_triton if use_triton(x2) else grouped_backward_torch
        with torch.autocast(x.device.type, enabled=False):
            dx, da, dbs = run(
                x2.contiguous(),
                dys,
                w.to(dt),
                a_list,
                b_list,
                ctx.scales,
                xa,
                ctx.p,
                ctx.seed,
                ctx.needs_input_grad[0],
            )
        grads = dict.fromkeys(_ARG_NAMES)
        if dx is not None:
            grads["x"] = dx.view(x.shape).to(x.dtype)
        c0 = 0
        for name, a in zip(("a_q", "a_k", "a_v"), a_list, strict=True):
            grads[name] = da[c0 : c0 + a.shape[0]].to(a.dtype)
            c0 += a.shape[0]
        for name, b, db in zip(("b_q", "b_k", "b_v"), b_list, dbs, strict=True):
            grads[name] = db.to(b.dtype)
        return tuple(grads[n] for n in _ARG_NAMES)


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
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v = three LoRA linears sharing one read of x (see the module docstring).

    x (..., K); weight_qkv = cat(Wq, Wk, Wv) (Nq+Nk+Nv, K), frozen, built once by the caller;
    a_i (r_i, K); b_i (N_i, r_i); scales: one float or (s_q, s_k, s_v); bias_qkv (N,) or None.
    One dropout mask is shared by q, k and v. `seed=None` draws one from torch's generator.
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
    return LoraQKVFunction.apply(
        x, weight_qkv, bias_qkv, a_q, a_k, a_v, b_q, b_k, b_v, _triple(scales),
        float(dropout_p), draw_seed(dropout_p, seed),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Ahead-of-time compilation targets (`python -m fastmid.kernels.inspect`)
# --------------------------------------------------------------------------------------------
def inspect_target(
    name: str,
    fn,
    configs: dict[int, list[dict[str, int]]],
    pointers: dict[str, str],
    ones: tuple[str, ...],
    divisible: tuple[str, ...],
    **constexprs: object,
) -> InspectTarget:
    """One launch as the Functions make it: its unit strides (which the runtime turns into
    constants), the integer arguments taken as multiples of 16, and its fixed constexprs."""
    floats = ("p", "scale", "scale0", "scale1", "scale2")
    signature, unit = kernel_signature(fn, pointers, floats=floats, ones=ones)
    return InspectTarget(
        name=name,
        fn=fn,
        signature=signature,
        constexprs={**unit, **constexprs},
        configs=configs,
        divisible=divisible,
    )


_P = "*{dtype}"
_MM_PTRS = {n: _P for n in ("X", "W", "BIAS", "Y", "XA", "B0", "B1", "B2")}
_THIN_PTRS = {"X": _P, "W": _P, "OUT": _P}
INSPECT_TARGETS: list[InspectTarget] = [
    inspect_target(
        "lora_qkv_fwd_xa", _thin_kernel, THIN_CONFIGS, _THIN_PTRS,
        ones=("stride_xk", "stride_wk"), divisible=("K", "stride_xm", "stride_wr"), DROPOUT=True,
    ),
    inspect_target(
        "lora_qkv_fwd_y", _grouped_mm_kernel, GROUPED_MM_CONFIGS, _MM_PTRS,
        ones=("stride_xk", "stride_wk", "s0_br", "s1_br", "s2_br"),
        divisible=("N", "K", "stride_xm", "stride_wn", "stride_ym", "n1", "n2"),
        HAS_BIAS=True, NUM_SEG=3, DROPOUT=False, GROUP_M=8,
    ),
    inspect_target(
        "lora_qkv_bwd_g", _thin_kernel, THIN_CONFIGS, _THIN_PTRS,
        ones=("stride_xk", "stride_wr"), divisible=("K", "stride_xm", "stride_wk"), DROPOUT=False,
    ),
    inspect_target(
        "lora_qkv_bwd_dx", _grouped_mm_kernel, GROUPED_MM_CONFIGS, _MM_PTRS,
        ones=("stride_xk", "stride_wn", "s0_bn", "s1_bn", "s2_bn"),
        divisible=("N", "K", "stride_xm", "stride_wk", "stride_ym", "s0_br", "s1_br", "s2_br"),
        HAS_BIAS=False, NUM_SEG=1, DROPOUT=False, GROUP_M=8,
    ),
    inspect_target(
        "lora_qkv_bwd_dx_dropout", _grouped_mm_kernel, GROUPED_MM_DROPOUT_CONFIGS, _MM_PTRS,
        ones=("stride_xk", "stride_wn", "s0_bn", "s1_bn", "s2_bn"),
        divisible=("N", "K", "stride_xm", "stride_wk", "stride_ym", "s0_br", "s1_br", "s2_br"),
        HAS_BIAS=False, NUM_SEG=1, DROPOUT=True, GROUP_M=8,
    ),
    inspect_target(
        "lora_qkv_bwd_da", _tn_kernel, TN_CONFIGS, {"L": _P, "RT": _P, "OUT": "*fp32"},
        ones=("stride_lp",), divisible=("Q", "stride_lm", "stride_rm", "stride_op"), DROPOUT=True,
    ),
    inspect_target(
        "lora_qkv_bwd_db", _tn_kernel, TN_CONFIGS, {"L": _P, "RT": _P, "OUT": "*fp32"},
        ones=("stride_lp",), divisible=("P", "stride_lm", "stride_rm"), DROPOUT=False,
    ),
]  # fmt: skip
