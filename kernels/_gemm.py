"""The GEMMs every fused LoRA op is built from, with one launcher and one autotune helper.

- `launch_thin`: out (M,R) = (m ⊙ x)·wᵀ, each of up to three members' rank columns times its
  own scale. The rank-r GEMM over the long K: forward xa = (m ⊙ x)·[s'A]ᵀ, backward g = s'·dy·B.
- `launch_tn`: out (P,Q) = lhsᵀ·(m ⊙ rhs), reduced over the M tokens and split over M across
  programs on a GPU: the adapter gradients dA = gᵀ·(m ⊙ x) and dB = dyᵀ·xa.
- `launch_main`: out (M,N) = x·w (+ bias) + Σ_seg xa_seg·b_segᵀ on each segment's columns, the
  rank-r product added into the one accumulator (no second (M,N) pass). With dropout (one
  segment: the dx GEMM) the rank-r term is masked, dx = dy·w + m ⊙ (g·A). `launch_swiglu` is the
  same GEMM over gate and up tiles side by side with the SwiGLU product (or its derivative) as
  the epilogue.

Policies shared by all of them:
- dropout: the keep-mask is drawn in-kernel (Philox, `keep_mask`) from a seed read from a
  device tensor at the flat row-major offsets of x, so forward and backward agree without a
  stored mask and without a host sync;
- precision: fp32 operands use IEEE fp32 dots unless torch allows TF32 for its own matmuls
  (`torch.backends.cuda.matmul.allow_tf32`), so a kernel is never less precise than the torch
  matmul it replaces; bf16/fp16 operands use the tensor cores' native products;
- autotuning: every kernel is tuned over its shipped configs for the device's arch family, keyed
  on the sizes that stay fixed during training (not M, which packed batches change).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import (
    INTERPRET,
    InspectTarget,
    cuda_arch,
    keep_mask,
    kernel_signature,
    rank_block,
    registered_op,
    shipped_arch,
    to_triton_configs,
    torch_keep_mask,
    use_triton,
)

# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


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
def flat_offsets(rows, cols, width, WIDE: tl.constexpr):
    """Row-major flat offsets rows·width + cols of a tile, the dropout mask's counters: int64
    when the tensor has 2³¹ elements or more (WIDE), else int32, which needs half the
    registers and gives the same Philox counters (the high word is zero either way)."""
    if WIDE:
        return rows[:, None].to(tl.int64) * width + cols[None, :]
    return rows[:, None] * width + cols[None, :]


@triton.jit
def add_segment(
    acc, XA, stride_xam, rm, m_ok, B, stride_bn, stride_br, rn, n0, n_lo, n_hi, r_len,
    BN: tl.constexpr, BR: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """The rank-r epilogue: acc += XA[rm, :r_len]·B[rn-n_lo, :r_len]ᵀ on the tile's columns
    inside [n_lo, n_hi). Accumulates into the GEMM accumulator (no second (BM,BN) tile held);
    a tile (columns n0..n0+BN) that does not touch the segment runs zero iterations."""
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
        acc = tl.dot(xa, b, acc, input_precision=DOT)
    return acc


@triton.jit
def _thin_kernel(
    X, W, OUT, SEED,
    M, R, K,
    stride_xm, stride_xk, stride_wr, stride_wk, stride_om,
    scale0, scale1, scale2, c1, c2, p,
    DROPOUT: tl.constexpr, WIDE: tl.constexpr, DOT: tl.constexpr,
    BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """OUT (M,R) = (m ⊙ X)·Wᵀ with column r scaled by its member's scale: scale0 on [0, c1),
    scale1 on [c1, c2), scale2 on [c2, R). One program owns BM rows and BR rank columns (all
    of them for R <= 128), so X is read once."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rr = pid_r * BR + tl.arange(0, BR)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    r_ok = rr < R
    rows = rm.to(tl.int64)
    x_ptr = X + rows[:, None] * stride_xm + rk[None, :] * stride_xk
    w_ptr = W + rr[None, :] * stride_wr + rk[:, None] * stride_wk
    if DROPOUT:
        seed = tl.load(SEED)
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_ok = (k0 + rk) < K
        x = tl.load(x_ptr, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if DROPOUT:
            # Flat row-major offsets of x: the numbers the backward kernels redraw from.
            offs = flat_offsets(rm, k0 + rk, K, WIDE)
            x = tl.where(keep_mask(seed, offs, p), x, 0.0).to(x.dtype)
        w = tl.load(w_ptr, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT)
        x_ptr += BK * stride_xk
        w_ptr += BK * stride_wk
    scale = tl.where(rr < c1, scale0, tl.where(rr < c2, scale1, scale2))
    acc *= scale[None, :]
    o_ptr = OUT + rows[:, None] * stride_om + rr[None, :]
    tl.store(o_ptr, acc.to(OUT.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _tn_kernel(
    L, RT, OUT, SEED,
    P, Q, M, rows_per_split,
    stride_lm, stride_lp, stride_rm, stride_os, stride_op,
    p,
    DROPOUT: tl.constexpr, WIDE: tl.constexpr, DOT: tl.constexpr,
    BP: tl.constexpr, BQ: tl.constexpr, BM: tl.constexpr,
):  # fmt: skip
    """OUT[s] (P,Q) = Lᵀ·(m ⊙ RT) over rows [s·rows_per_split, (s+1)·rows_per_split) of M,
    for split s = program axis 2 (one split: the whole sum).

    RT is row-major with unit column stride; its dropout offsets are row·Q + col, the element
    indices the forward thin GEMM used for x, so the mask is redrawn exactly."""
    pid_p = tl.program_id(0)
    pid_q = tl.program_id(1)
    pid_s = tl.program_id(2)
    rp = pid_p * BP + tl.arange(0, BP)
    rq = pid_q * BQ + tl.arange(0, BQ)
    rm = tl.arange(0, BM)
    p_ok = rp < P
    q_ok = rq < Q
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    if DROPOUT:
        seed = tl.load(SEED)
    acc = tl.zeros((BP, BQ), dtype=tl.float32)
    for m0 in range(m_start, m_end, BM):
        rows = (m0 + rm).to(tl.int64)
        m_ok = (m0 + rm) < m_end
        # L is loaded already transposed (BP, BM): the pointer grid does the transpose.
        lt = tl.load(
            L + rows[None, :] * stride_lm + rp[:, None] * stride_lp,
            mask=p_ok[:, None] & m_ok[None, :],
            other=0.0,
        )
        rt = tl.load(
            RT + rows[:, None] * stride_rm + rq[None, :],
            mask=m_ok[:, None] & q_ok[None, :],
            other=0.0,
        )
        if DROPOUT:
            offs = flat_offsets(m0 + rm, rq, Q, WIDE)
            rt = tl.where(keep_mask(seed, offs, p), rt, 0.0).to(rt.dtype)
        acc = tl.dot(lt, rt, acc, input_precision=DOT)
    o_ptr = OUT + pid_s * stride_os + rp[:, None].to(tl.int64) * stride_op + rq[None, :]
    tl.store(o_ptr, acc.to(OUT.dtype.element_ty), mask=p_ok[:, None] & q_ok[None, :])


@triton.jit
def _main_kernel(
    X, W, BIAS, Y, XA, B0, B1, B2, SEED,
    M, N, K,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_ym, stride_xam,
    s0_bn, s0_br, s1_bn, s1_br, s2_bn, s2_br,
    n1, n2, xa1, xa2, r0_len, r1_len, r2_len, p,
    HAS_BIAS: tl.constexpr, NUM_SEG: tl.constexpr, DROPOUT: tl.constexpr, WIDE: tl.constexpr,
    DOT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """Y (M,N) = X·W (+ bias) + Σ_seg XA_seg·B_segᵀ on the segment's columns.

    W is addressed as (K,N) through strides, so the same kernel runs the forward base GEMM
    (W = wᵀ) and the backward dx GEMM (W = w). Segment s covers columns [n_s, n_{s+1}) with
    n_0 = 0, n_3 = N (with one segment, n1 = N), and reads XA from column xa_s (xa_0 = 0).
    The rank-r product is formed first in the one fp32 accumulator, so DROPOUT (dx only, one
    segment) can mask it with the forward keep-mask of x before the main K loop adds onto it:
    no second accumulator tile.
    """
    pid_m, pid_n = tile_ids(M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    n_ok = rn < N
    rows = rm.to(tl.int64)
    n0 = pid_n * BN
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc = add_segment(
        acc, XA, stride_xam, rm, m_ok, B0, s0_bn, s0_br, rn, n0, 0, n1, r0_len, BN, BR, DOT
    )
    if NUM_SEG == 3:
        acc = add_segment(
            acc, XA + xa1, stride_xam, rm, m_ok, B1, s1_bn, s1_br, rn, n0, n1, n2, r1_len,
            BN, BR, DOT,
        )  # fmt: skip
        acc = add_segment(
            acc, XA + xa2, stride_xam, rm, m_ok, B2, s2_bn, s2_br, rn, n0, n2, N, r2_len,
            BN, BR, DOT,
        )  # fmt: skip
    if DROPOUT:
        acc = tl.where(keep_mask(tl.load(SEED), flat_offsets(rm, rn, N, WIDE), p), acc, 0.0)
    x_ptr = X + rows[:, None] * stride_xm + rk[None, :] * stride_xk
    w_ptr = W + rn[None, :].to(tl.int64) * stride_wn + rk[:, None].to(tl.int64) * stride_wk
    for k0 in range(0, K, BK):
        k_ok = (k0 + rk) < K
        x = tl.load(x_ptr, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT)
        x_ptr += BK * stride_xk
        w_ptr += BK * stride_wk
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptr = Y + rows[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptr, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _swiglu_kernel(
    X, W, XA, BG, BU, DH, OUT,
    M, I, K, RG, RU,
    stride_xm, stride_wn, stride_xam, stride_dhm, stride_om,
    BACKWARD: tl.constexpr, DOT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """The main GEMM over gate and up tiles side by side, for W = [Wg; Wu] (2I,K) and
    XA = [xa_g | xa_u]: g and u of one (BM,BN) tile, then the SwiGLU epilogue
    h = silu(g)·u, or in BACKWARD (OUT (M,2I) = [dg | du]) its derivative against DH.

    Two fp32 accumulators live through the K loop, so the tiles are smaller than a plain
    GEMM's: the shipped configs are the largest that compile without spills."""
    pid_m, pid_n = tile_ids(M, I, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    n_ok = rn < I
    rows = rm.to(tl.int64)
    n0 = pid_n * BN
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    acc_g = add_segment(acc_g, XA, stride_xam, rm, m_ok, BG, RG, 1, rn, n0, 0, I, RG, BN, BR, DOT)
    acc_u = add_segment(
        acc_u, XA + RG, stride_xam, rm, m_ok, BU, RU, 1, rn, n0, 0, I, RU, BN, BR, DOT
    )
    x_ptr = X + rows[:, None] * stride_xm + rk[None, :]
    wg_ptr = W + rn[None, :].to(tl.int64) * stride_wn + rk[:, None]
    wu_ptr = wg_ptr + I.to(tl.int64) * stride_wn
    for k0 in range(0, K, BK):
        k_ok = (k0 + rk) < K
        x = tl.load(x_ptr, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & n_ok[None, :]
        acc_g = tl.dot(x, tl.load(wg_ptr, mask=w_mask, other=0.0), acc_g, input_precision=DOT)
        acc_u = tl.dot(x, tl.load(wu_ptr, mask=w_mask, other=0.0), acc_u, input_precision=DOT)
        x_ptr += BK
        wg_ptr += BK
        wu_ptr += BK
    sig = tl.sigmoid(acc_g)
    silu = acc_g * sig
    mask = m_ok[:, None] & n_ok[None, :]
    o_ptr = OUT + rows[:, None] * stride_om + rn[None, :]
    if BACKWARD:
        dh = tl.load(DH + rows[:, None] * stride_dhm + rn[None, :], mask=mask, other=0.0)
        dh = dh.to(tl.float32)
        dg = dh * acc_u * (sig + silu * (1.0 - sig))
        tl.store(o_ptr, dg.to(OUT.dtype.element_ty), mask=mask)
        tl.store(o_ptr + I, (dh * silu).to(OUT.dtype.element_ty), mask=mask)
    else:
        tl.store(o_ptr, (silu * acc_u).to(OUT.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Shipped configs per arch. Every one compiles with zero spills and tensor-core instructions
# (`python -m fastmid.kernels.cubin_report`). The rank block BR is not tuned: the launchers
# derive it from the rank.
# --------------------------------------------------------------------------------------------

# sm_90: 8 warps over a 128-row tile are two warpgroups of 64 rows each, so a 128-wide tile
# issues wgmma with N = 128. sm_80 keeps a BK=32 variant for its smaller shared memory.
MAIN_CONFIGS: dict[int, list[dict[str, int]]] = {
    90: [
        {"BM": 128, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3},
        {"BM": 128, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 4},
        {"BM": 64, "BN": 128, "BK": 64, "num_warps": 4, "num_stages": 4},
    ],
    80: [
        {"BM": 128, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3},
        {"BM": 128, "BN": 64, "BK": 32, "num_warps": 8, "num_stages": 4},
        {"BM": 64, "BN": 64, "BK": 64, "num_warps": 4, "num_stages": 3},
    ],
}
# The dx GEMM with dropout also draws a Philox mask over its whole output tile, 64 values per
# thread at a wgmma N = 128 tile (128x128 with 8 warps, 64x128 with 4): with the accumulator
# that spilled over 1 KB on sm_90 even with int32 counters (measured), so this variant ships
# tiles where each thread holds 32 values: 64x128 with 8 warps (wgmma N = 64) and 64x64.
MAIN_DROPOUT_CONFIGS: dict[int, list[dict[str, int]]] = {
    90: [
        {"BM": 64, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3},
        {"BM": 64, "BN": 64, "BK": 64, "num_warps": 4, "num_stages": 4},
    ],
    80: [
        {"BM": 64, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3},
        {"BM": 64, "BN": 64, "BK": 64, "num_warps": 4, "num_stages": 3},
    ],
}
# Rank tiles up to 128 wide: 8 warps keep the (BM x 128) fp32 accumulator well under the
# register cap.
THIN_CONFIGS: dict[int, list[dict[str, int]]] = {
    90: [
        {"BM": 128, "BK": 64, "num_warps": 8, "num_stages": 3},
        {"BM": 64, "BK": 64, "num_warps": 8, "num_stages": 4},
    ],
    80: [
        {"BM": 128, "BK": 32, "num_warps": 8, "num_stages": 4},
        {"BM": 64, "BK": 64, "num_warps": 8, "num_stages": 3},
    ],
}
TN_CONFIGS: dict[int, list[dict[str, int]]] = {
    90: [
        {"BP": 64, "BQ": 128, "BM": 64, "num_warps": 4, "num_stages": 3},
        {"BP": 128, "BQ": 64, "BM": 64, "num_warps": 8, "num_stages": 3},
        {"BP": 64, "BQ": 64, "BM": 64, "num_warps": 4, "num_stages": 4},
    ],
    80: [
        {"BP": 64, "BQ": 64, "BM": 64, "num_warps": 4, "num_stages": 4},
        {"BP": 128, "BQ": 32, "BM": 64, "num_warps": 4, "num_stages": 4},
        {"BP": 64, "BQ": 16, "BM": 128, "num_warps": 4, "num_stages": 3},
    ],
}
# Two live (BM,BN) fp32 accumulators: 128x64 with 8 warps holds as many accumulator registers
# per thread as one 128x128 GEMM tile, so the wgmma N is 64 here. N = 128 tiles measured at the
# 255-register cap (128x128, 8 warps) or spilling 16 bytes (64x128, 4 warps) on sm_90.
# The rank chunk BR is part of the config: 64 on sm_90 (32 there costs 60-70 more registers),
# 32 on sm_80 (64 put the 64x64 tile at the 255-register cap); measured with cubin_report.
SWIGLU_CONFIGS: dict[int, list[dict[str, int]]] = {
    90: [
        {"BM": 128, "BN": 64, "BK": 64, "BR": 64, "num_warps": 8, "num_stages": 3},
        {"BM": 64, "BN": 64, "BK": 64, "BR": 64, "num_warps": 4, "num_stages": 3},
    ],
    80: [
        {"BM": 128, "BN": 64, "BK": 32, "BR": 32, "num_warps": 8, "num_stages": 4},
        {"BM": 64, "BN": 64, "BK": 32, "BR": 32, "num_warps": 4, "num_stages": 3},
    ],
}

# kind → (kernel, configs per arch, autotune key). M is left out of the keys: packed batches
# change it every step, N and K do not.
KERNELS = {
    "main": (_main_kernel, MAIN_CONFIGS, ["N", "K", "NUM_SEG", "HAS_BIAS"]),
    "main_dropout": (_main_kernel, MAIN_DROPOUT_CONFIGS, ["N", "K"]),
    "thin": (_thin_kernel, THIN_CONFIGS, ["R", "K", "DROPOUT"]),
    "tn": (_tn_kernel, TN_CONFIGS, ["P", "Q", "DROPOUT"]),
    "swiglu": (_swiglu_kernel, SWIGLU_CONFIGS, ["I", "K", "BACKWARD"]),
}
# Under the interpreter every program is a numpy loop: one small config, so modest test shapes
# still cross tile edges; the thin/grad tiles are wide so the (slow) dropout mask is drawn few
# times.
_INTERPRET_CONFIGS = {
    "main": {"BM": 32, "BN": 32, "BK": 32},
    "main_dropout": {"BM": 32, "BN": 32, "BK": 32},
    "thin": {"BM": 32, "BK": 64},
    "tn": {"BP": 32, "BQ": 64, "BM": 64},
    "swiglu": {"BM": 32, "BN": 32, "BK": 32, "BR": 16},
}
_tuned: dict[tuple[str, int], object] = {}


# Pointer arguments of each kernel (`inspect_target` types them).
_POINTERS = {
    "thin": ("X", "W", "OUT", "SEED"),
    "tn": ("L", "RT", "OUT", "SEED"),
    "main": ("X", "W", "BIAS", "Y", "XA", "B0", "B1", "B2", "SEED"),
    "main_dropout": ("X", "W", "BIAS", "Y", "XA", "B0", "B1", "B2", "SEED"),
    "swiglu": ("X", "W", "XA", "BG", "BU", "DH", "OUT"),
}


def inspect_target(
    name: str, kind: str, ones: tuple[str, ...], divisible: tuple[str, ...], **constexprs: object
) -> InspectTarget:
    """One launch of the shared GEMM `kind` as an op makes it: its unit strides (which the
    runtime turns into constants), the integer arguments taken as multiples of 16, and its
    fixed constexprs (DOT is irrelevant for the bf16/fp16 operands compiled; dropout counters
    are int32, WIDE=False, as for every tensor under 2³¹ elements)."""
    fn, configs, _ = KERNELS[kind]
    pointers = {n: "*{dtype}" for n in _POINTERS[kind]}
    pointers.update({"SEED": "*i64"} if "SEED" in _POINTERS[kind] else {})
    if kind == "tn":
        pointers["OUT"] = "*fp32"
    floats = ("p", "scale0", "scale1", "scale2")
    signature, unit = kernel_signature(fn, pointers, floats=floats, ones=ones)
    return InspectTarget(
        name=name,
        fn=fn,
        signature=signature,
        constexprs={
            **unit,
            **({"WIDE": False} if "WIDE" in signature else {}),
            "DOT": "tf32",
            **constexprs,
        },
        configs=configs,
        divisible=divisible,
    )


def autotuned(kind: str, arch: int):
    """The kernel of `kind` autotuned over its shipped configs for `arch` (built once)."""
    if (kind, arch) not in _tuned:
        kernel, configs, key = KERNELS[kind]
        _tuned[kind, arch] = triton.autotune(to_triton_configs(configs[arch]), key=key)(kernel)
    return _tuned[kind, arch]


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision for operands of `dtype`: IEEE for fp32 unless torch allows TF32
    for its matmuls. (bf16/fp16 products are exact in fp32 either way.)"""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def launch(kind: str, device: torch.device, grid, **args) -> None:
    """Launch kernel `kind`: autotuned over the shipped configs of the device's arch family on
    CUDA (traceable by torch.compile through `wrap_triton`), with the fixed small config under
    the interpreter."""
    if INTERPRET and device.type != "cuda":
        kernel = KERNELS[kind][0]
        kernel[grid](**args, **_INTERPRET_CONFIGS[kind])
        return
    wrap_triton(autotuned(kind, shipped_arch(cuda_arch(device))))[grid](**args)


# --------------------------------------------------------------------------------------------
# Launchers: check → allocate → grid → launch. `seed` is a 0-dim int64 tensor on the operands'
# device (read only with dropout on).
# --------------------------------------------------------------------------------------------


def launch_thin(
    x: torch.Tensor,
    w: torch.Tensor,
    scales: Sequence[float],
    ranks: Sequence[int],
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """out (M,R) = (m ⊙ x)·wᵀ, each member's rank columns times its scale; x (M,K), w (R,K) any
    strides; one to three members with R = Σ ranks. `out` (unit column stride) defaults to a
    new tensor in x's dtype. The keep-mask m (dropout_p > 0) is drawn at x's offsets row·K+col.
    """
    M, K = x.shape
    R = w.shape[0]
    assert w.shape[1] == K and sum(ranks) == R and 1 <= len(ranks) <= 3
    if out is None:
        out = torch.empty((M, R), device=x.device, dtype=x.dtype)
    assert out.shape == (M, R) and out.stride(1) == 1
    s = [float(v) for v in scales] + [0.0] * (3 - len(scales))
    c1 = ranks[0] if len(ranks) > 1 else R
    c2 = c1 + ranks[1] if len(ranks) > 2 else R
    br = rank_block(R, widest=128)
    grid = lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(R, br))
    launch(
        "thin", x.device, grid,
        X=x, W=w, OUT=out, SEED=seed if dropout_p > 0 else out, M=M, R=R, K=K,
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        stride_wr=w.stride(0), stride_wk=w.stride(1), stride_om=out.stride(0),
        scale0=s[0], scale1=s[1], scale2=s[2], c1=c1, c2=c2, p=dropout_p,
        DROPOUT=dropout_p > 0, WIDE=M * K >= 2**31, DOT=dot_precision(x.dtype), BR=br,
    )  # fmt: skip
    return out


def launch_tn(
    lhs: torch.Tensor,
    rhs: torch.Tensor,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """lhsᵀ·(m ⊙ rhs) (P,Q) in fp32 for lhs (M,P) any strides, rhs (M,Q) unit column stride."""
    M, P = lhs.shape
    Q = rhs.shape[1]
    assert rhs.shape[0] == M and rhs.stride(1) == 1
    # Few output tiles but a long reduction over M: on a GPU split M across programs until the
    # device is full, then sum the fp32 partial slices.
    splits = 1
    if lhs.is_cuda:
        sms = torch.cuda.get_device_properties(lhs.device).multi_processor_count
        tiles = triton.cdiv(P, 64) * triton.cdiv(Q, 64)
        splits = max(1, min(triton.cdiv(2 * sms, tiles), triton.cdiv(M, 512)))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), 128) * 128
    splits = max(1, triton.cdiv(M, rows_per_split))
    out = torch.empty((splits, P, Q), device=lhs.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(P, meta["BP"]), triton.cdiv(Q, meta["BQ"]), splits)
    launch(
        "tn", lhs.device, grid,
        L=lhs, RT=rhs, OUT=out, SEED=seed if dropout_p > 0 else out,
        P=P, Q=Q, M=M, rows_per_split=rows_per_split,
        stride_lm=lhs.stride(0), stride_lp=lhs.stride(1), stride_rm=rhs.stride(0),
        stride_os=out.stride(0), stride_op=out.stride(1), p=dropout_p,
        DROPOUT=dropout_p > 0, WIDE=M * Q >= 2**31, DOT=dot_precision(lhs.dtype),
    )  # fmt: skip
    return out[0] if splits == 1 else out.sum(0)


def launch_main(
    x: torch.Tensor,
    w_kn: torch.Tensor,
    xa: torch.Tensor,
    segments: Sequence[tuple[torch.Tensor, int, int]],
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """x·w_kn (+ bias) + Σ xa[:, c:c+r]·bᵀ on each segment's columns, a new (M,N) tensor.

    x (M,K) and w_kn (K,N) any strides; xa (M,R) with unit column stride. `segments` holds one
    or three (b (N_s, r_s) any strides, first column n_s, first xa column c_s), covering the
    columns in order. dropout_p > 0 (one segment only) masks the rank-r term with the
    keep-mask at the output's offsets row·N + col (dx has x's shape).
    """
    M, K = x.shape
    N = w_kn.shape[1]
    assert w_kn.shape[0] == K and xa.stride(1) == 1 and len(segments) in (1, 3)
    assert dropout_p == 0.0 or len(segments) == 1
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    segs = list(segments) + [segments[0]] * (3 - len(segments))
    (b0, _, _), (b1, n1, c1), (b2, n2, c2) = segs
    if len(segments) == 1:
        n1, n2, c1, c2 = N, N, 0, 0
    br = rank_block(max(b.shape[1] for b, _, _ in segments))
    grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)
    launch(
        "main_dropout" if dropout_p > 0 else "main", x.device, grid,
        X=x, W=w_kn, BIAS=bias if bias is not None else out, Y=out, XA=xa, B0=b0, B1=b1, B2=b2,
        SEED=seed if dropout_p > 0 else out, M=M, N=N, K=K,
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        stride_wk=w_kn.stride(0), stride_wn=w_kn.stride(1),
        stride_ym=out.stride(0), stride_xam=xa.stride(0),
        s0_bn=b0.stride(0), s0_br=b0.stride(1), s1_bn=b1.stride(0), s1_br=b1.stride(1),
        s2_bn=b2.stride(0), s2_br=b2.stride(1),
        n1=n1, n2=n2, xa1=c1, xa2=c2,
        r0_len=b0.shape[1], r1_len=b1.shape[1], r2_len=b2.shape[1], p=dropout_p,
        HAS_BIAS=bias is not None, NUM_SEG=len(segments), DROPOUT=dropout_p > 0,
        WIDE=M * N >= 2**31, DOT=dot_precision(x.dtype), BR=br, GROUP_M=8,
    )  # fmt: skip
    return out


def launch_swiglu(
    x: torch.Tensor,
    w: torch.Tensor,
    xa: torch.Tensor,
    b_g: torch.Tensor,
    b_u: torch.Tensor,
    dh: torch.Tensor | None = None,
) -> torch.Tensor:
    """silu(g) ⊙ u (M,I) for g, u = the gate and up halves of x·wᵀ + the rank-r products; with
    dh given, [dg | du] (M,2I) instead. x (M,K) and w (2I,K) with unit column stride;
    xa (M, r_g+r_u); b_g, b_u contiguous."""
    M, K = x.shape
    I = w.shape[0] // 2
    rg, ru = b_g.shape[1], b_u.shape[1]
    assert x.stride(1) == 1 and w.stride(1) == 1 and w.shape == (2 * I, K)
    assert b_g.is_contiguous() and b_u.is_contiguous() and xa.shape == (M, rg + ru)
    out = torch.empty((M, I if dh is None else 2 * I), device=x.device, dtype=x.dtype)
    grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(I, meta["BN"]),)
    launch(
        "swiglu", x.device, grid,
        X=x, W=w, XA=xa, BG=b_g, BU=b_u, DH=out if dh is None else dh, OUT=out,
        M=M, I=I, K=K, RG=rg, RU=ru,
        stride_xm=x.stride(0), stride_wn=w.stride(0), stride_xam=xa.stride(0),
        stride_dhm=0 if dh is None else dh.stride(0), stride_om=out.stride(0),
        BACKWARD=dh is not None, DOT=dot_precision(x.dtype), GROUP_M=8,
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------
# Forward and backward of grouped LoRA linears (one to three members reading the same x over a
# frozen concatenated weight w = cat(W_i)), on both execution paths. 2-D operands in the
# compute dtype; `scales` are the effective ones (dropout's 1/(1-p) folded in); one keep-mask
# of x shared by every member:
#     xa = (m ⊙ x)·[s_i A_i]ᵀ      y = x·wᵀ + bias + [xa_i·B_iᵀ]      g = [s_i dy_i·B_i]
#     dx = dy·w + m ⊙ (g·[A_i])    dA = gᵀ·(m ⊙ x)    dB_i = dy_iᵀ·xa_i
# --------------------------------------------------------------------------------------------


def lora_forward_triton(x, w, bias, a_list, b_list, scales, p, seed):
    """(y, xa) with the Triton kernels: one thin GEMM, one main GEMM with a segment per member."""
    ranks = [a.shape[0] for a in a_list]
    a_cat = a_list[0] if len(a_list) == 1 else torch.cat(a_list)
    xa = launch_thin(x, a_cat, scales, ranks, p, seed)
    segs, n0, c0 = [], 0, 0
    for b, r in zip(b_list, ranks, strict=True):
        segs.append((b, n0, c0))
        n0, c0 = n0 + b.shape[0], c0 + r
    return launch_main(x, w.t(), xa, segs, bias), xa


def lora_backward_triton(x, dy, dys, w, a_list, b_list, scales, xa, p, seed, need_dx):
    """(dx or None, dA of all members stacked (fp32), [dB_i] (fp32)) with the Triton kernels;
    `dy` is the (M,N) output gradient, `dys` its members' column blocks."""
    ranks = [a.shape[0] for a in a_list]
    g = torch.empty(x.shape[0], sum(ranks), dtype=x.dtype, device=x.device)
    c0 = 0
    for dy_i, b, s, r in zip(dys, b_list, scales, ranks, strict=True):
        launch_thin(dy_i, b.t(), [s], [r], out=g[:, c0 : c0 + r])
        c0 += r
    da = launch_tn(g, x, p, seed)
    dbs, c0 = [], 0
    for dy_i, r in zip(dys, ranks, strict=True):
        dbs.append(launch_tn(dy_i, xa[:, c0 : c0 + r]))
        c0 += r
    dx = None
    if need_dx:
        a_cat = a_list[0] if len(a_list) == 1 else torch.cat(a_list)
        dx = launch_main(dy, w, g, [(a_cat.t(), 0, 0)], None, p, seed)
    return dx, da, dbs


def lora_forward_torch(x, w, bias, a_list, b_list, scales, p, seed):
    """(y, xa) on the torch path: few BLAS calls, the rank-r products accumulated into column
    views of the base output by `addmm_` (beta=1, so no extra pass over y)."""
    # Scales folded into A's rows: one small (R,K) op instead of a pass over xa.
    a_s = torch.cat([a * s for a, s in zip(a_list, scales, strict=True)])
    xd = x if p == 0.0 else torch.where(torch_keep_mask(x.shape, p, seed), x, 0.0)
    xa = torch.mm(xd, a_s.t())
    y = torch.mm(x, w.t()) if bias is None else torch.addmm(bias, x, w.t())
    n0 = c0 = 0
    for b in b_list:
        n, r = b.shape
        y[:, n0 : n0 + n].addmm_(xa[:, c0 : c0 + r], b.t())
        n0, c0 = n0 + n, c0 + r
    return y, xa


def lora_backward_torch(x, dys, w, a_list, b_list, scales, xa, p, seed, need_dx):
    """(dx or None, dA of all members stacked, [dB_i]) on the torch path, given each member's
    output gradient in `dys` (column views are fine)."""
    M = x.shape[0]
    ranks = [a.shape[0] for a in a_list]
    keep = None if p == 0.0 else torch_keep_mask(x.shape, p, seed)
    # g is built transposed, (R,M): each member's rows are a contiguous slice to write into.
    gt = torch.empty(sum(ranks), M, dtype=x.dtype, device=x.device)
    c0 = 0
    for dy, b, s, r in zip(dys, b_list, scales, ranks, strict=True):
        torch.mm((b * s).t(), dy.t(), out=gt[c0 : c0 + r])
        c0 += r
    da = torch.mm(gt, x if keep is None else torch.where(keep, x, 0.0))
    dbs, c0 = [], 0
    for dy, r in zip(dys, ranks, strict=True):
        dbs.append(torch.mm(dy.t(), xa[:, c0 : c0 + r]))
        c0 += r
    dx = None
    if need_dx:
        # dy·w as one GEMM per member accumulating into dx (beta=1): no (M,N) concatenation,
        # and measured no slower than one GEMM over it.
        n0 = 0
        for dy in dys:
            w_i = w[n0 : n0 + dy.shape[1]]
            dx = torch.mm(dy, w_i) if dx is None else dx.addmm_(dy, w_i)
            n0 += dy.shape[1]
        a_cat = torch.cat(a_list)
        if keep is None:
            dx.addmm_(gt.t(), a_cat)
        else:
            dx.add_(torch.where(keep, torch.mm(gt.t(), a_cat), 0.0))
    return dx, da, dbs


# The torch path as opaque custom ops: under torch.compile it runs exactly as in eager (the
# in-place accumulation into column views stays in place), while the Triton kernels of the CUDA
# path stay visible to the compiler through the ops' `triton_op`s.


@registered_op(torch.library.custom_op, "fastmid::lora_forward_torch")
def lora_forward_torch_op(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    a_list: list[torch.Tensor],
    b_list: list[torch.Tensor],
    scales: list[float],
    p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`lora_forward_torch` as an op."""
    return lora_forward_torch(x, w, bias, a_list, b_list, scales, p, seed)


@lora_forward_torch_op.register_fake
def _(x, w, bias, a_list, b_list, scales, p, seed):
    rank = sum(a.shape[0] for a in a_list)
    return x.new_empty(x.shape[0], w.shape[0]), x.new_empty(x.shape[0], rank)


@registered_op(torch.library.custom_op, "fastmid::lora_backward_torch")
def lora_backward_torch_op(
    x: torch.Tensor,
    dys: list[torch.Tensor],
    w: torch.Tensor,
    a_list: list[torch.Tensor],
    b_list: list[torch.Tensor],
    scales: list[float],
    xa: torch.Tensor,
    p: float,
    seed: torch.Tensor | None,
    need_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """`lora_backward_torch` as an op; dx is empty when `need_dx` is False."""
    dx, da, dbs = lora_backward_torch(x, dys, w, a_list, b_list, scales, xa, p, seed, need_dx)
    return (x.new_empty(0) if dx is None else dx), da, dbs


@lora_backward_torch_op.register_fake
def _(x, dys, w, a_list, b_list, scales, xa, p, seed, need_dx):
    rank = sum(a.shape[0] for a in a_list)
    dx = x.new_empty(x.shape if need_dx else (0,))
    return dx, x.new_empty(rank, x.shape[1]), [x.new_empty(b.shape) for b in b_list]


def lora_forward(x, w, bias, a_list, b_list, scales, p, seed):
    """(y, xa) on the path `use_triton` picks (operands already in the compute dtype)."""
    if use_triton(x, x.dtype):
        return lora_forward_triton(x, w, bias, a_list, b_list, scales, p, seed)
    return lora_forward_torch_op(x, w, bias, list(a_list), list(b_list), list(scales), p, seed)


def lora_backward(x, dy, dys, w, a_list, b_list, scales, xa, p, seed, need_dx):
    """(dx or an empty tensor, dA stacked, [dB_i]) on the path `use_triton` picks."""
    if use_triton(x, x.dtype):
        dx, da, dbs = lora_backward_triton(
            x.contiguous(), dy, dys, w, a_list, b_list, scales, xa, p, seed, need_dx
        )
        return (x.new_empty(0) if dx is None else dx), da, dbs
    return lora_backward_torch_op(
        x, list(dys), w, list(a_list), list(b_list), list(scales), xa, p, seed, need_dx
    )


def register_grouped_autograd(
    op, backward_op, arg_names: tuple[str, ...], adapters: tuple[str, ...]
):
    """The autograd of a grouped op ``op(x, w, [bias,] *adapters, scales, p, seed, dtype)``
    returning ``(out, xa)``: save x, w, the adapters, xa and the seed; ``backward_op`` gives dx
    and the adapter grads; every other input (the frozen weight, bias, settings) gets none."""
    has_bias = "bias" in arg_names

    def setup_context(ctx, inputs, output) -> None:
        x, w, *rest = inputs
        *adapter_tensors, scales, p, seed, dtype = rest[1:] if has_bias else rest
        ctx.save_for_backward(x, w, *adapter_tensors, output[1], seed)
        ctx.scales, ctx.p, ctx.dtype = scales, p, dtype

    def backward(ctx, grad_out, _grad_xa):
        x, w, *adapter_tensors, xa, seed = ctx.saved_tensors
        need = dict(zip(arg_names, ctx.needs_input_grad, strict=True))
        dx, adapter_grads = backward_op(
            grad_out, x, w, *adapter_tensors, xa, ctx.scales, ctx.p, seed, ctx.dtype, need["x"]
        )
        grads = dict.fromkeys(arg_names)
        grads["x"] = dx if need["x"] else None
        for name, g in zip(adapters, adapter_grads, strict=True):
            grads[name] = g if need[name] else None
        return tuple(grads[n] for n in arg_names)

    op.register_autograd(backward, setup_context=setup_context)
