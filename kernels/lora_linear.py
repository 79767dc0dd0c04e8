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
    rank_block,
    shipped_arch,
    to_triton_configs,
    torch_keep_mask,
    use_triton,
)

# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _lora_thin_kernel(
    X, A, Out,
    M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_om, stride_or,
    seed, dropout_p,
    HAS_DROPOUT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    """Out (M,R) = (m ⊙ X)·Aᵀ for X (M,K), A (R,K): the rank-r GEMM over the long K.

    One program owns BM rows and (for R <= BR) every rank column, so X is read once."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_r = pid_r * BR + tl.arange(0, BR)
    offs_k = tl.arange(0, BK)
    rows = offs_m.to(tl.int64)
    x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    a_ptrs = A + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_ok = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            # Flat row-major offsets of x: the same numbers the backward kernels redraw from.
            flat = rows[:, None] * K + (k0 + offs_k)[None, :]
            x = tl.where(keep_mask(seed, flat, dropout_p), x, 0.0).to(x.dtype)
        a = tl.load(a_ptrs, mask=k_ok[:, None] & (offs_r[None, :] < R), other=0.0)
        acc = tl.dot(x, a, acc)
        x_ptrs += BK * stride_xk
        a_ptrs += BK * stride_ak
    out_ptrs = Out + rows[:, None] * stride_om + offs_r[None, :] * stride_or
    tl.store(
        out_ptrs,
        acc.to(Out.dtype.element_ty),
        mask=(offs_m[:, None] < M) & (offs_r[None, :] < R),
    )


@triton.jit
def _lora_mm_kernel(
    X, W, L, Rt, Bias, Out,
    M, N, K, R,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_lm, stride_lr, stride_rr, stride_rn,
    stride_om, stride_on,
    scale, seed, dropout_p,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """Out (M,N) = X·W + m ⊙ (scale·L·Rt) + bias for X (M,K), W (K,N) and the rank-R pair
    L (M,R), Rt (R,N) (any strides; m is drawn over Out's flat row-major offsets).

    Forward: X=x, W=wᵀ, L=xa, Rt=Bᵀ. Backward dx: X=dy, W=w, L=dy·B, Rt=A, mask on.
    The low-rank product is computed first into the one fp32 accumulator, so the main K loop
    adds onto it and the epilogue only adds bias and stores: no second accumulator tile."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    # Grouped launch order: GROUP_M row-blocks share W column-blocks while they sit in L2.
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % group) % group_rows)
    pid_n = (pid % group) // group_rows

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    m_ok = offs_m < M
    n_ok = offs_n < N

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    offs_r = tl.arange(0, BR)
    for r0 in range(0, R, BR):
        r_ok = (r0 + offs_r) < R
        l = tl.load(
            L + rows[:, None] * stride_lm + (r0 + offs_r)[None, :] * stride_lr,
            mask=m_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        rt = tl.load(
            Rt + (r0 + offs_r)[:, None] * stride_rr + cols[None, :] * stride_rn,
            mask=r_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(l, rt, acc)
    acc = acc * scale
    if HAS_DROPOUT:
        flat = rows[:, None] * N + cols[None, :]
        acc = tl.where(keep_mask(seed, flat, dropout_p), acc, 0.0)

    offs_k = tl.arange(0, BK)
    x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = W + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn
    for k0 in range(0, K, BK):
        k_ok = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(x, w, acc)
        x_ptrs += BK * stride_xk
        w_ptrs += BK * stride_wk

    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = Out + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _lora_grad_kernel(
    P, Q, Out,
    M, N, R, rows_per_split,
    stride_pm, stride_pn, stride_qm, stride_qr, stride_os, stride_on, stride_or,
    scale, seed, dropout_p,
    HAS_DROPOUT: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    """Out (N,R) = scale·(m ⊙ P)ᵀ·Q for P (M,N), Q (M,R): an adapter gradient, reducing over
    the M tokens. dB: P=dy, Q=xa. dA (written transposed through strides): P=x, Q=dy·B, mask
    on P's flat offsets. Program axis 2 splits M; split s writes slice s of Out (stride_os)."""
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_r = pid_r * BR + tl.arange(0, BR)
    offs_m = tl.arange(0, BM)
    cols = offs_n.to(tl.int64)
    n_ok = offs_n < N
    r_ok = offs_r < R
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    acc = tl.zeros((BN, BR), dtype=tl.float32)
    for m0 in range(m_start, m_end, BM):
        rows = (m0 + offs_m).to(tl.int64)
        m_ok = (m0 + offs_m) < m_end
        # P is loaded already transposed (BN, BM): the pointer grid does the transpose.
        pt = tl.load(
            P + cols[:, None] * stride_pn + rows[None, :] * stride_pm,
            mask=n_ok[:, None] & m_ok[None, :],
            other=0.0,
        )
        if HAS_DROPOUT:
            flat = rows[None, :] * N + cols[:, None]
            pt = tl.where(keep_mask(seed, flat, dropout_p), pt, 0.0).to(pt.dtype)
        q = tl.load(
            Q + rows[:, None] * stride_qm + offs_r[None, :] * stride_qr,
            mask=m_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(pt, q, acc)
    acc = acc * scale
    out_ptrs = Out + pid_s * stride_os + cols[:, None] * stride_on + offs_r[None, :] * stride_or
    tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=n_ok[:, None] & r_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Configs and launchers
# ---------------------------------------------------------------------------------------------

# Shipped configs per arch (checked by `python -m fastmid.kernels.inspect`: no spills, tensor
# cores). The rank block BR is not tuned: the launcher derives it from the rank.
MM_CONFIGS: dict[int, list[dict[str, int]]] = {
    90: [
        {"BM": 128, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3},
        {"BM": 128, "BN": 64, "BK": 64, "num_warps": 4, "num_stages": 4},
        {"BM": 64, "BN": 128, "BK": 64, "num_warps": 4, "num_stages": 4},
        {"BM": 64, "BN": 64, "BK": 64, "num_warps": 4, "num_stages": 4},
    ],
    80: [
        {"BM": 128, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3},
        {"BM": 128, "BN": 64, "BK": 32, "num_warps": 8, "num_stages": 4},
        {"BM": 64, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3},
        {"BM": 64, "BN": 64, "BK": 64, "num_warps": 4, "num_stages": 3},
    ],
}
# The dx GEMM with dropout draws a Philox mask over its whole output tile: a 128x128 tile
# needs more than 255 registers per thread for it (measured: >1 KB of spills on sm_80 and
# sm_90), so that variant ships with half-size tiles.
MM_DROPOUT_CONFIGS: dict[int, list[dict[str, int]]] = {
    90: [
        {"BM": 64, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3},
        {"BM": 128, "BN": 64, "BK": 64, "num_warps": 8, "num_stages": 3},
        {"BM": 64, "BN": 64, "BK": 64, "num_warps": 4, "num_stages": 4},
    ],
    80: [
        {"BM": 64, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3},
        {"BM": 128, "BN": 64, "BK": 64, "num_warps": 8, "num_stages": 3},
        {"BM": 64, "BN": 64, "BK": 64, "num_warps": 4, "num_stages": 3},
    ],
}
# The thin and adapter-gradient GEMMs hold a (rows x 128) fp32 tile for rank blocks up to 128;
# with 4 warps that sat at 254-255 registers per thread, so both ship 8-warp configs only.
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
GRAD_CONFIGS: dict[int, list[dict[str, int]]] = {
    90: [
        {"BN": 128, "BM": 64, "num_warps": 8, "num_stages": 3},
        {"BN": 64, "BM": 64, "num_warps": 8, "num_stages": 4},
    ],
    80: [
        {"BN": 128, "BM": 32, "num_warps": 8, "num_stages": 4},
        {"BN": 64, "BM": 64, "num_warps": 8, "num_stages": 3},
    ],
}
# Under the interpreter every program is a numpy loop: small blocks keep tests quick and make
# the modest test shapes span several blocks, so the edge masks are exercised.
_INTERPRET_CONFIG = {
    "mm": {"BM": 32, "BN": 32, "BK": 32},
    "mm_dropout": {"BM": 32, "BN": 32, "BK": 32},
    "thin": {"BM": 32, "BK": 32},
    "grad": {"BN": 32, "BM": 32},
}
_KEYS = {"mm": ["N", "K", "R"], "thin": ["K", "R"], "grad": ["N", "R"]}
_KEYS["mm_dropout"] = _KEYS["mm"]
_KERNELS = {"mm": _lora_mm_kernel, "thin": _lora_thin_kernel, "grad": _lora_grad_kernel}
_KERNELS["mm_dropout"] = _lora_mm_kernel
_CONFIGS = {
    "mm": MM_CONFIGS,
    "mm_dropout": MM_DROPOUT_CONFIGS,
    "thin": THIN_CONFIGS,
    "grad": GRAD_CONFIGS,
}
_tuned: dict[tuple[str, int], object] = {}


def _launch(kind: str, device: torch.device, grid, *args, **kwargs) -> None:
    """Launch kernel `kind`: autotuned over the shipped configs of the device's arch on CUDA,
    with the fixed small interpreter config otherwise."""
    if device.type != "cuda":
        meta = _INTERPRET_CONFIG[kind]
        _KERNELS[kind][grid(meta)](*args, **kwargs, **meta)
        return
    if args[0].dtype == torch.float32:
        # fp32 operands: follow torch's own matmul setting (full fp32 unless TF32 is allowed),
        # so the kernel is never less precise than the torch matmul it replaces.
        tf32 = torch.backends.cuda.matmul.allow_tf32
        kwargs["default_dot_input_precision"] = "tf32" if tf32 else "ieee"
    arch = shipped_arch(cuda_arch(device))
    fn = _tuned.get((kind, arch))
    if fn is None:
        configs = to_triton_configs(_CONFIGS[kind][arch])
        fn = triton.autotune(configs=configs, key=_KEYS[kind])(_KERNELS[kind])
        _tuned[(kind, arch)] = fn
    fn[grid](*args, **kwargs)


def _thin(x: torch.Tensor, a: torch.Tensor, seed: int, dropout_p: float) -> torch.Tensor:
    """(m ⊙ x)·aᵀ for x (M,K), a (R,K) given by strides (R <= 128 covered by one block)."""
    m, k = x.shape
    r = a.shape[0]
    out = torch.empty((m, r), device=x.device, dtype=x.dtype)
    br = max(16, triton.next_power_of_2(r)) if r <= 128 else 64
    grid = lambda meta: (triton.cdiv(m, meta["BM"]), triton.cdiv(r, br))
    _launch(
        "thin", x.device, grid,
        x, a, out, m, k, r,
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), out.stride(0), out.stride(1),
        seed, dropout_p,
        HAS_DROPOUT=dropout_p > 0.0, BR=br,
    )  # fmt: skip
    return out


def _grad(
    p: torch.Tensor, q: torch.Tensor, out: torch.Tensor, scale: float, seed: int, dropout_p: float
) -> torch.Tensor:
    """out (N,R) = scale·(m ⊙ p)ᵀ·q for p (M,N), q (M,R); `out` may be a transposed view."""
    m, n = p.shape
    r = q.shape[1]
    br = max(16, triton.next_power_of_2(r)) if r <= 128 else 64
    # Few output tiles (N/BN x R/BR) but a long reduction over M: split M across programs so
    # the GPU fills up, then sum the fp32 partial slices.
    splits = 1
    if p.is_cuda:
        sms = torch.cuda.get_device_properties(p.device).multi_processor_count
        tiles = triton.cdiv(n, 64) * triton.cdiv(r, br)
        splits = max(1, min(triton.cdiv(2 * sms, tiles), triton.cdiv(m, 256)))
    rows_per_split = triton.cdiv(triton.cdiv(m, splits), 128) * 128
    splits = triton.cdiv(m, rows_per_split)
    target = out
    if splits > 1:
        target = torch.empty((splits, n, r), device=p.device, dtype=torch.float32)
        strides = target.stride()
    else:
        strides = (0, out.stride(0), out.stride(1))
    grid = lambda meta: (triton.cdiv(n, meta["BN"]), triton.cdiv(r, br), splits)
    _launch(
        "grad", p.device, grid,
        p, q, target, m, n, r, rows_per_split,
        p.stride(0), p.stride(1), q.stride(0), q.stride(1), *strides,
        scale, seed, dropout_p,
        HAS_DROPOUT=dropout_p > 0.0, BR=br,
    )  # fmt: skip
    if splits > 1:
        out.copy_(target.sum(0))
    return out


def _mm(
    x: torch.Tensor,
    w_t: torch.Tensor,
    left: torch.Tensor,
    right_t: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    seed: int,
    dropout_p: float,
) -> torch.Tensor:
    """x·w_t + m ⊙ (scale·left·right_t) + bias, with w_t (K,N) and right_t (R,N) as views."""
    m, k = x.shape
    n = w_t.shape[1]
    r = left.shape[1]
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)
    _launch(
        "mm_dropout" if dropout_p > 0.0 else "mm", x.device, grid,
        x, w_t, left, right_t, bias if bias is not None else out, out,
        m, n, k, r,
        x.stride(0), x.stride(1), w_t.stride(0), w_t.stride(1), left.stride(0), left.stride(1),
        right_t.stride(0), right_t.stride(1), out.stride(0), out.stride(1),
        scale, seed, dropout_p,
        HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0.0, BR=rank_block(r), GROUP_M=8,
    )  # fmt: skip
    return out


def lora_linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: torch.Tensor | None,
    scale_eff: float,
    dropout_p: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward on 2-D operands of one dtype: returns (y, xa). `scale_eff` already
    includes the 1/(1-p) of dropout."""
    assert x.dim() == 2 and x.shape[1] == weight.shape[1] == lora_a.shape[1]
    assert lora_b.shape == (weight.shape[0], lora_a.shape[0])
    xa = _thin(x, lora_a, seed, dropout_p)
    y = _mm(x, weight.t(), xa, lora_b.t(), bias, scale_eff, seed, 0.0)
    return y, xa


def lora_linear_backward(
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
    """Triton backward on 2-D operands of one dtype: returns (dx or None, dA, dB)."""
    dyb = _thin(dy, lora_b.t(), 0, 0.0)
    grad_b = _grad(dy, xa, torch.empty_like(lora_b), scale_eff, 0, 0.0)
    grad_a = torch.empty_like(lora_a)
    _grad(x, dyb, grad_a.t(), scale_eff, seed, dropout_p)
    grad_x = None
    if need_dx:
        grad_x = _mm(dy, weight, dyb, lora_a, None, scale_eff, seed, dropout_p)
    return grad_x, grad_a, grad_b


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
            grad_x.addcmul_(torch.mm(dyb, lora_a), keep)
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
            forward = lora_linear_forward if use_triton(x2) else _torch_forward
            y, xa = forward(
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
            backward = lora_linear_backward if use_triton(x2) else _torch_backward
            dx, da, db = backward(
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


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation targets (`python -m fastmid.kernels.inspect`)
# ---------------------------------------------------------------------------------------------


def _inspect_target(name: str, kind: str, pointers: dict[str, str], ones: tuple[str, ...],
                    divisible: tuple[str, ...], **constexprs: object) -> InspectTarget:  # fmt: skip
    fn = _KERNELS[kind]
    floats = ("scale", "dropout_p")
    signature, unit = kernel_signature(fn, pointers, floats=floats, ones=ones)
    return InspectTarget(
        name=name,
        fn=fn,
        signature=signature,
        constexprs={**unit, **constexprs},
        configs=_CONFIGS[kind],
        divisible=divisible,
    )


_P = "*{dtype}"
# Each launch as the Function makes it, with the unit strides of its real operands, dropout
# on where it can be (the heaviest variant) and the rank block of the default budget-matched
# rank (r > 64, so 64-wide chunks on the main GEMM and a 128-wide thin/grad tile).
INSPECT_TARGETS: list[InspectTarget] = [
    _inspect_target(
        "lora_linear_fwd_xa", "thin", {"X": _P, "A": _P, "Out": _P},
        ones=("stride_xk", "stride_ak", "stride_or"), divisible=("K", "stride_xm", "stride_ar"),
        HAS_DROPOUT=True, BR=128,
    ),
    _inspect_target(
        "lora_linear_fwd_y", "mm", {n: _P for n in ("X", "W", "L", "Rt", "Bias", "Out")},
        ones=("stride_xk", "stride_wk", "stride_lr", "stride_rr", "stride_on"),
        divisible=("N", "K", "stride_xm", "stride_wn", "stride_om"),
        HAS_BIAS=True, HAS_DROPOUT=False, BR=64, GROUP_M=8,
    ),
    _inspect_target(
        "lora_linear_bwd_dyb", "thin", {"X": _P, "A": _P, "Out": _P},
        ones=("stride_xk", "stride_ar", "stride_or"), divisible=("K", "stride_xm"),
        HAS_DROPOUT=False, BR=128,
    ),
    _inspect_target(
        "lora_linear_bwd_dx", "mm", {n: _P for n in ("X", "W", "L", "Rt", "Bias", "Out")},
        ones=("stride_xk", "stride_wn", "stride_lr", "stride_rn", "stride_on"),
        divisible=("N", "K", "stride_xm", "stride_wk", "stride_rr", "stride_om"),
        HAS_BIAS=False, HAS_DROPOUT=False, BR=64, GROUP_M=8,
    ),
    _inspect_target(
        "lora_linear_bwd_dx_dropout", "mm_dropout",
        {n: _P for n in ("X", "W", "L", "Rt", "Bias", "Out")},
        ones=("stride_xk", "stride_wn", "stride_lr", "stride_rn", "stride_on"),
        divisible=("N", "K", "stride_xm", "stride_wk", "stride_rr", "stride_om"),
        HAS_BIAS=False, HAS_DROPOUT=True, BR=64, GROUP_M=8,
    ),
    _inspect_target(
        "lora_linear_bwd_db", "grad", {"P": _P, "Q": _P, "Out": "*fp32"},
        ones=("stride_pn", "stride_qr", "stride_or"), divisible=("N", "stride_pm", "stride_os"),
        HAS_DROPOUT=False, BR=128,
    ),
    _inspect_target(
        "lora_linear_bwd_da", "grad", {"P": _P, "Q": _P, "Out": "*fp32"},
        ones=("stride_pn", "stride_qr", "stride_or"), divisible=("N", "stride_pm", "stride_os"),
        HAS_DROPOUT=True, BR=128,
    ),
]  # fmt: skip
