"""The Triton kernels of the fused LoRA ops: only the pieces that save a pass over memory.

On CUDA the frozen GEMMs (y = x·Wᵀ, dx = dy·W) and the unmasked rank-r products belong to
cuBLAS (`_lora`); Triton runs the three products that touch LoRA dropout's keep-mask, drawing
it in-kernel (Philox, `keep_mask`) from a seed read from a device tensor plus a per-layer
offset, at the flat row-major offsets of x, so forward and backward agree without a stored
mask, without a host sync and without materialising m ⊙ x:

- `launch_thin`: xa (M,R) = (m ⊙ x)·Aᵀ, each of up to three members' rank columns times its
  own scale (forward);
- `launch_tn`: dA (R,K) = gᵀ·(m ⊙ x) in fp32, reduced over the M tokens and split over M
  across programs on a GPU (backward);
- `launch_masked_add`: dx += m ⊙ (g·A) in place, one read and one write of the cuBLAS dx
  (backward; torch would write g·A, then read it, the mask and dx again).

Policies shared by all of them:
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

from ._common import (
    INTERPRET,
    InspectTarget,
    cuda_arch,
    keep_mask,
    kernel_signature,
    rank_block,
    shipped_arch,
    to_triton_configs,
)

# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def flat_offsets(rows, cols, width, WIDE: tl.constexpr):
    """Row-major flat offsets rows·width + cols of a tile, the dropout mask's counters: int64
    when the tensor has 2³¹ elements or more (WIDE), else int32, which needs half the
    registers and gives the same Philox counters (the high word is zero either way)."""
    if WIDE:
        return rows[:, None].to(tl.int64) * width + cols[None, :]
    return rows[:, None] * width + cols[None, :]


@triton.jit
def _thin_kernel(
    X, W, OUT, SEED,
    M, R, K,
    stride_xm, stride_xk, stride_wr, stride_wk, stride_om,
    scale0, scale1, scale2, c1, c2, seed_offset, p,
    WIDE: tl.constexpr, DOT: tl.constexpr,
    BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """OUT (M,R) = (m ⊙ X)·Wᵀ with column r scaled by its member's scale: scale0 on [0, c1),
    scale1 on [c1, c2), scale2 on [c2, R); m is the keep-mask of (seed + seed_offset, p) at X's
    flat offsets. One program owns BM rows and BR rank columns (all of them for R <= 128), so
    X is read once."""
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
    seed = tl.load(SEED) + seed_offset
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_ok = (k0 + rk) < K
        x = tl.load(x_ptr, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
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
    seed_offset, p,
    WIDE: tl.constexpr, DOT: tl.constexpr,
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
    seed = tl.load(SEED) + seed_offset
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
        offs = flat_offsets(m0 + rm, rq, Q, WIDE)
        rt = tl.where(keep_mask(seed, offs, p), rt, 0.0).to(rt.dtype)
        acc = tl.dot(lt, rt, acc, input_precision=DOT)
    o_ptr = OUT + pid_s * stride_os + rp[:, None].to(tl.int64) * stride_op + rq[None, :]
    tl.store(o_ptr, acc.to(OUT.dtype.element_ty), mask=p_ok[:, None] & q_ok[None, :])


@triton.jit
def _masked_add_kernel(
    DX, G, A, SEED,
    M, K, R,
    stride_dm, stride_dk, stride_gm, stride_gr, stride_ar, stride_ak,
    seed_offset, p,
    WIDE: tl.constexpr, DOT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    """DX (M,K) += m ⊙ (G·A) in place for G (M,R) and A (R,K); m is the keep-mask of
    (seed + seed_offset, p) at DX's flat offsets row·K + col, which are x's (dx has x's
    shape), so it is the forward's mask. The rank-r product lives in one fp32 tile; DX is read
    once and written once."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rr = tl.arange(0, BR)
    m_ok = rm < M
    n_ok = rn < K
    rows = rm.to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(0, R, BR):
        r_ok = (r0 + rr) < R
        g = tl.load(
            G + rows[:, None] * stride_gm + (r0 + rr)[None, :] * stride_gr,
            mask=m_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        a = tl.load(
            A + (r0 + rr)[:, None] * stride_ar + rn[None, :] * stride_ak,
            mask=r_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(g, a, acc, input_precision=DOT)
    keep = keep_mask(tl.load(SEED) + seed_offset, flat_offsets(rm, rn, K, WIDE), p)
    mask = m_ok[:, None] & n_ok[None, :]
    d_ptr = DX + rows[:, None] * stride_dm + rn[None, :] * stride_dk
    dx = tl.load(d_ptr, mask=mask, other=0.0).to(tl.float32)
    tl.store(d_ptr, (dx + tl.where(keep, acc, 0.0)).to(DX.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Shipped configs per arch. Every one compiles with zero spills and tensor-core instructions
# (`python -m fastmid.kernels.cubin_report`). The rank block BR is not tuned: the launchers
# derive it from the rank.
# --------------------------------------------------------------------------------------------

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
# The masked dx update draws a Philox mask over its whole (BM,BN) tile next to the fp32
# accumulator and the dx tile: tiles where each thread holds 32 values of each, 64x128 with
# 8 warps (wgmma N = 64 on sm_90) and 64x64 with 4. There is no K loop to pipeline: the rank
# loop is one to a few iterations.
MASKED_ADD_CONFIGS: dict[int, list[dict[str, int]]] = {
    90: [
        {"BM": 64, "BN": 128, "num_warps": 8, "num_stages": 2},
        {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 2},
    ],
    80: [
        {"BM": 64, "BN": 128, "num_warps": 8, "num_stages": 2},
        {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 2},
    ],
}

# kind → (kernel, configs per arch, autotune key). M is left out of the keys: packed batches
# change it every step, the widths do not.
KERNELS = {
    "thin": (_thin_kernel, THIN_CONFIGS, ["R", "K"]),
    "tn": (_tn_kernel, TN_CONFIGS, ["P", "Q"]),
    "masked_add": (_masked_add_kernel, MASKED_ADD_CONFIGS, ["K", "R"]),
}
# Under the interpreter every program is a numpy loop: one small config, so modest test shapes
# still cross tile edges; the thin/grad tiles are wide so the (slow) dropout mask is drawn few
# times.
_INTERPRET_CONFIGS = {
    "thin": {"BM": 32, "BK": 64},
    "tn": {"BP": 32, "BQ": 64, "BM": 64},
    "masked_add": {"BM": 32, "BN": 32},
}
_tuned: dict[tuple[str, int], object] = {}


# Pointer arguments of each kernel (`inspect_target` types them).
_POINTERS = {
    "thin": ("X", "W", "OUT", "SEED"),
    "tn": ("L", "RT", "OUT", "SEED"),
    "masked_add": ("DX", "G", "A", "SEED"),
}


def inspect_target(
    name: str, kind: str, ones: tuple[str, ...], divisible: tuple[str, ...], **constexprs: object
) -> InspectTarget:
    """One launch of kernel `kind` as an op makes it: its unit strides (which the runtime turns
    into constants), the integer arguments taken as multiples of 16, and its fixed constexprs
    (DOT is irrelevant for the bf16/fp16 operands compiled; dropout counters are int32,
    WIDE=False, as for every tensor under 2³¹ elements)."""
    fn, configs, _ = KERNELS[kind]
    pointers = {n: "*{dtype}" for n in _POINTERS[kind]}
    pointers["SEED"] = "*i64"
    if kind == "tn":
        pointers["OUT"] = "*fp32"
    floats = ("p", "scale0", "scale1", "scale2")
    signature, unit = kernel_signature(fn, pointers, floats=floats, ones=ones)
    return InspectTarget(
        name=name,
        fn=fn,
        signature=signature,
        constexprs={**unit, "WIDE": False, "DOT": "tf32", **constexprs},
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
    CUDA, with the fixed small config under the interpreter. (The ops that call this are opaque
    to torch.compile, so no `wrap_triton` is needed.)"""
    if INTERPRET and device.type != "cuda":
        KERNELS[kind][0][grid](**args, **_INTERPRET_CONFIGS[kind])
        return
    autotuned(kind, shipped_arch(cuda_arch(device)))[grid](**args)


# --------------------------------------------------------------------------------------------
# Launchers: check → allocate → grid → launch. `seed` is a 0-dim int64 tensor on the operands'
# device; `seed_offset` the caller's layer offset added to it in-kernel.
# --------------------------------------------------------------------------------------------


def launch_thin(
    x: torch.Tensor,
    w: torch.Tensor,
    scales: Sequence[float],
    ranks: Sequence[int],
    dropout_p: float,
    seed: torch.Tensor,
    seed_offset: int = 0,
) -> torch.Tensor:
    """(M,R) = (m ⊙ x)·wᵀ in x's dtype, each member's rank columns times its scale; x (M,K),
    w (R,K) any strides; one to three members with R = Σ ranks. The keep-mask m is drawn at
    x's offsets row·K + col."""
    M, K = x.shape
    R = w.shape[0]
    assert w.shape[1] == K and sum(ranks) == R and 1 <= len(ranks) <= 3
    out = torch.empty((M, R), device=x.device, dtype=x.dtype)
    s = [float(v) for v in scales] + [0.0] * (3 - len(scales))
    c1 = ranks[0] if len(ranks) > 1 else R
    c2 = c1 + ranks[1] if len(ranks) > 2 else R
    br = rank_block(R, widest=128)
    grid = lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(R, br))
    launch(
        "thin", x.device, grid,
        X=x, W=w, OUT=out, SEED=seed, M=M, R=R, K=K,
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        stride_wr=w.stride(0), stride_wk=w.stride(1), stride_om=out.stride(0),
        scale0=s[0], scale1=s[1], scale2=s[2], c1=c1, c2=c2, seed_offset=seed_offset,
        p=dropout_p, WIDE=M * K >= 2**31, DOT=dot_precision(x.dtype), BR=br,
    )  # fmt: skip
    return out


def launch_tn(
    lhs: torch.Tensor,
    rhs: torch.Tensor,
    dropout_p: float,
    seed: torch.Tensor,
    seed_offset: int = 0,
) -> torch.Tensor:
    """lhsᵀ·(m ⊙ rhs) (P,Q) in fp32 for lhs (M,P) any strides, rhs (M,Q) unit column stride;
    the keep-mask at rhs's offsets row·Q + col."""
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
        L=lhs, RT=rhs, OUT=out, SEED=seed, P=P, Q=Q, M=M, rows_per_split=rows_per_split,
        stride_lm=lhs.stride(0), stride_lp=lhs.stride(1), stride_rm=rhs.stride(0),
        stride_os=out.stride(0), stride_op=out.stride(1), seed_offset=seed_offset, p=dropout_p,
        WIDE=M * Q >= 2**31, DOT=dot_precision(lhs.dtype),
    )  # fmt: skip
    return out[0] if splits == 1 else out.sum(0)


def launch_masked_add(
    dx: torch.Tensor,
    g: torch.Tensor,
    a: torch.Tensor,
    dropout_p: float,
    seed: torch.Tensor,
    seed_offset: int = 0,
) -> torch.Tensor:
    """dx += m ⊙ (g·a) in place and return dx: dx (M,K), g (M,R), a (R,K), any strides; the
    keep-mask at dx's offsets row·K + col."""
    M, K = dx.shape
    R = a.shape[0]
    assert g.shape == (M, R) and a.shape[1] == K
    br = rank_block(R)
    grid = lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(K, meta["BN"]))
    launch(
        "masked_add", dx.device, grid,
        DX=dx, G=g, A=a, SEED=seed, M=M, K=K, R=R,
        stride_dm=dx.stride(0), stride_dk=dx.stride(1), stride_gm=g.stride(0),
        stride_gr=g.stride(1), stride_ar=a.stride(0), stride_ak=a.stride(1),
        seed_offset=seed_offset, p=dropout_p, WIDE=M * K >= 2**31, DOT=dot_precision(dx.dtype),
        BR=br,
    )  # fmt: skip
    return dx
