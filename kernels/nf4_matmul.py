"""NF4 matmul: a GEMM against a 4-bit NormalFloat frozen weight, dequantized tile by tile.

Format (QLoRA's NF4 with double-quantized block scales, the layout of torchao's NF4Tensor):
the frozen `w (N,K)` is read row-major as a flat vector `w[i]`, i = n·K + k, cut into blocks of
`QB` values (64) and those blocks' scales into groups of `SB` scales:

    data[i // 2]        uint8, two 4-bit codes per byte, the even element in the high nibble
    scalers[i // QB]    int8, the block's absmax scale minus `mean`, quantized per group
    factors[i // (QB·SB)]  the group's quantization factor
    w[i] = codebook[code_i] · (scalers[i // QB] / factors[i // (QB·SB)] + mean)

The kernel computes `out (M,P) = x (M,R) · B (R,P)` where `B[r,p] = w[r·stride_wr + p·stride_wp]`
is dequantized inside the K loop, one (BR, BP) tile at a time, so the bf16 weight never exists in
full. Both products of a frozen linear are this one kernel:

    y  = x·Wᵀ    (R = K, P = N, stride_wr = 1, stride_wp = K)     forward
    dx = dy·W    (R = N, P = K, stride_wr = K, stride_wp = 1)     backward (no dW, ever)

The autograd Function saves only the quantized tensors (about 0.53 bytes per weight) and
dequantizes again in backward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import (
    InspectTarget,
    compute_dtype,
    cuda_arch,
    kernel_signature,
    shipped_arch,
    to_triton_configs,
    use_triton,
)


class NF4Weight(NamedTuple):
    """The plain tensors of an NF4 weight of `shape` (N, K) (see the module docstring)."""

    data: torch.Tensor
    scalers: torch.Tensor
    factors: torch.Tensor
    mean: torch.Tensor
    codebook: torch.Tensor
    shape: tuple[int, int]
    block_size: int
    scaler_block_size: int


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------


@triton.jit
def _nf4_matmul_kernel(
    X, Q, S, F, Mean, Codebook, Bias, Out,
    M, P, R,
    stride_xm, stride_xr, stride_om, stride_op, stride_wr, stride_wp,
    HAS_BIAS: tl.constexpr, QB: tl.constexpr, SB: tl.constexpr,
    BM: tl.constexpr, BP: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """Out (M,P) = X (M,R) · dequant(B) (R,P) (+ bias over P); B[r,p] is the NF4 weight's flat
    element r·stride_wr + p·stride_wp. The weight has fewer than 2³¹ elements (checked by the
    launcher), so its offsets are int32; X and Out rows are int64."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_p = tl.cdiv(P, BP)
    # Grouped launch order: GROUP_M row-blocks share weight column-blocks while they sit in L2.
    group = GROUP_M * num_p
    first_m = (pid // group) * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % group) % group_rows)
    pid_p = (pid % group) // group_rows

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_p = pid_p * BP + tl.arange(0, BP)
    offs_r = tl.arange(0, BR)
    rows = offs_m.to(tl.int64)
    m_ok = offs_m < M
    p_ok = offs_p < P
    mean = tl.load(Mean).to(tl.float32)

    acc = tl.zeros((BM, BP), dtype=tl.float32)
    x_ptrs = X + rows[:, None] * stride_xm + offs_r[None, :] * stride_xr
    for r0 in range(0, R, BR):
        r_ok = (r0 + offs_r) < R
        x = tl.load(x_ptrs, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        w_ok = r_ok[:, None] & p_ok[None, :]
        idx = (r0 + offs_r)[:, None] * stride_wr + offs_p[None, :] * stride_wp
        byte = tl.load(Q + (idx >> 1), mask=w_ok, other=0)
        code = tl.where((idx & 1) == 0, byte >> 4, byte & 15)
        value = tl.load(Codebook + code.to(tl.int32))
        blk = idx // QB
        scaler = tl.load(S + blk, mask=w_ok, other=0).to(tl.float32)
        factor = tl.load(F + blk // SB, mask=w_ok, other=1.0).to(tl.float32)
        w = (value * (scaler / factor + mean)).to(x.dtype)
        acc = tl.dot(x, w, acc)
        x_ptrs += BR * stride_xr

    if HAS_BIAS:
        acc += tl.load(Bias + offs_p, mask=p_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = Out + rows[:, None] * stride_om + offs_p[None, :] * stride_op
    tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=m_ok[:, None] & p_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Configs and launcher
# ---------------------------------------------------------------------------------------------

# Shipped configs per arch (checked by `python -m fastmid.kernels.cubin_report`: no spills, tensor
# cores). The dequantized (BR, BP) tile is built in registers from per-element index math and
# four gathers before it reaches the MMA, so the tiles are smaller than the plain GEMM's.
MATMUL_CONFIGS: dict[int, list[dict[str, int]]] = {
    90: [
        {"BM": 128, "BP": 64, "BR": 64, "num_warps": 8, "num_stages": 3},
        {"BM": 64, "BP": 128, "BR": 64, "num_warps": 8, "num_stages": 3},
        {"BM": 64, "BP": 64, "BR": 64, "num_warps": 4, "num_stages": 3},
    ],
    80: [
        {"BM": 128, "BP": 64, "BR": 64, "num_warps": 8, "num_stages": 3},
        # BR 32: with BR 64 triton 3.6 (torch 2.11's) built 255 / 243 registers for the
        # forward / dx (cubin report of the first H200 run). Now every sm_80 config stays at
        # or below 194 registers with triton 3.6 and 183 with 3.9.
        {"BM": 64, "BP": 128, "BR": 32, "num_warps": 8, "num_stages": 3},
        {"BM": 64, "BP": 64, "BR": 32, "num_warps": 4, "num_stages": 3},
    ],
}
# Small blocks under the interpreter: quick, and the test shapes span several tiles.
_INTERPRET_CONFIG = {"BM": 32, "BP": 32, "BR": 32}
_tuned: dict[int, object] = {}


def nf4_matmul(
    x: torch.Tensor, weight: NF4Weight, transpose: bool, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Triton `x·dequant(W)ᵀ (+ bias)` (transpose=True, x (M,K)) or `x·dequant(W)`
    (transpose=False, x (M,N)), in x's dtype with fp32 accumulation; x is 2-D."""
    n, k = weight.shape
    m, r = x.shape
    assert r == (k if transpose else n), f"x {tuple(x.shape)} vs weight {weight.shape}"
    assert n * k < 2**31, "weight offsets are int32"
    p = n if transpose else k
    stride_wr, stride_wp = (1, k) if transpose else (k, 1)
    out = torch.empty((m, p), device=x.device, dtype=x.dtype)
    codebook = weight.codebook.float()
    args = (
        x, weight.data, weight.scalers, weight.factors, weight.mean, codebook,
        bias if bias is not None else out, out,
        m, p, r,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1), stride_wr, stride_wp,
    )  # fmt: skip
    consts = {
        "HAS_BIAS": bias is not None,
        "QB": weight.block_size,
        "SB": weight.scaler_block_size,
        "GROUP_M": 8,
    }
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(p, meta["BP"]),)
    if not x.is_cuda:
        _nf4_matmul_kernel[grid(_INTERPRET_CONFIG)](*args, **consts, **_INTERPRET_CONFIG)
        return out
    kwargs = {}
    if x.dtype == torch.float32:
        tf32 = torch.backends.cuda.matmul.allow_tf32
        kwargs["default_dot_input_precision"] = "tf32" if tf32 else "ieee"
    arch = shipped_arch(cuda_arch(x.device))
    fn = _tuned.get(arch)
    if fn is None:
        fn = triton.autotune(to_triton_configs(MATMUL_CONFIGS[arch]), key=["P", "R"])(
            _nf4_matmul_kernel
        )
        _tuned[arch] = fn
    fn[grid](*args, **consts, **kwargs)
    return out


# ---------------------------------------------------------------------------------------------
# Plain-torch dequantization and reference (also the CPU execution path)
# ---------------------------------------------------------------------------------------------


def nf4_dequantize(weight: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The full (N, K) weight in `dtype`, with torchao's arithmetic order (scales rounded to
    `dtype` before the codebook product), so it matches `NF4Tensor.to(dtype)` bit for bit when
    `dtype` is the weight's own dtype."""
    n, k = weight.shape
    qb, sb = weight.block_size, weight.scaler_block_size
    scales = weight.scalers.view(-1, sb) / weight.factors.unsqueeze(-1)
    scales = scales.flatten().to(dtype) + weight.mean.to(dtype)
    # One gather per byte through a 256-entry table of code pairs, instead of unpacking the two
    # nibbles into index tensors eight times the size of the data.
    codebook = weight.codebook.to(dtype)
    byte = torch.arange(256, device=codebook.device)
    pairs = torch.stack([codebook[byte >> 4], codebook[byte & 15]], dim=1)
    values = pairs.index_select(0, weight.data.int()).view(-1, qb)
    return values.mul_(scales.unsqueeze(-1)).view(n, k)


def nf4_linear_reference(
    x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`x·dequant(W)ᵀ + bias` the obvious way (dequantize in x's dtype, then matmul)."""
    y = x @ nf4_dequantize(weight, x.dtype).t()
    return y if bias is None else y + bias


# ---------------------------------------------------------------------------------------------
# Autograd Function and public op
# ---------------------------------------------------------------------------------------------


class NF4LinearFunction(torch.autograd.Function):
    """Autograd Function of `nf4_linear`: saves the quantized tensors only, grads for x only."""

    @staticmethod
    def forward(ctx, x, data, scalers, factors, mean, codebook, bias, meta):
        dt = compute_dtype(x)
        weight = NF4Weight(data, scalers, factors, mean, codebook, *meta)
        lead, k = x.shape[:-1], x.shape[-1]
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, k).to(dt)
            b_ = None if bias is None else bias.to(dt)
            if use_triton(x2):
                y = nf4_matmul(x2, weight, transpose=True, bias=b_)
            else:
                w = nf4_dequantize(weight, dt)
                y = torch.mm(x2, w.t()) if b_ is None else torch.addmm(b_, x2, w.t())
        ctx.save_for_backward(data, scalers, factors, mean, codebook)
        ctx.meta, ctx.dtype, ctx.x_dtype = meta, dt, x.dtype
        return y.view(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        grads = [None] * 8
        if not ctx.needs_input_grad[0]:
            return tuple(grads)
        weight = NF4Weight(*ctx.saved_tensors, *ctx.meta)
        n, k = weight.shape
        with torch.autocast(grad_y.device.type, enabled=False):
            dy = grad_y.reshape(-1, n).to(ctx.dtype)
            if use_triton(dy):
                dx = nf4_matmul(dy, weight, transpose=False)
            else:
                dx = torch.mm(dy, nf4_dequantize(weight, ctx.dtype))
        grads[0] = dx.to(ctx.x_dtype).view(*grad_y.shape[:-1], k)
        return tuple(grads)


def nf4_linear(x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None = None):
    """`y = x·dequant(W)ᵀ + bias` for x (..., K) and a frozen NF4 weight (N, K); runs in the
    autocast dtype when autocast is on. Gradients flow to x only; nothing weight-sized is
    saved for backward (dequantized again there)."""
    meta = (tuple(weight.shape), weight.block_size, weight.scaler_block_size)
    return NF4LinearFunction.apply(
        x, weight.data, weight.scalers, weight.factors, weight.mean, weight.codebook, bias, meta
    )


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation targets (`python -m fastmid.kernels.cubin_report`)
# ---------------------------------------------------------------------------------------------


def _inspect_target(name: str, ones: tuple[str, ...], divisible: tuple[str, ...]):
    pointers = {"X": "*{dtype}", "Q": "*u8", "S": "*i8", "F": "*{dtype}", "Mean": "*{dtype}",
                "Codebook": "*fp32", "Bias": "*{dtype}", "Out": "*{dtype}"}  # fmt: skip
    signature, unit = kernel_signature(_nf4_matmul_kernel, pointers, ones=ones)
    return InspectTarget(
        name=name,
        fn=_nf4_matmul_kernel,
        signature=signature,
        constexprs={**unit, "HAS_BIAS": False, "QB": 64, "SB": 64, "GROUP_M": 8},
        configs=MATMUL_CONFIGS,
        divisible=divisible,
    )


# The two launches of a frozen linear, with the unit strides of their real operands.
INSPECT_TARGETS: list[InspectTarget] = [
    _inspect_target(
        "nf4_matmul_fwd", ones=("stride_xr", "stride_op", "stride_wr"),
        divisible=("P", "R", "stride_xm", "stride_om", "stride_wp"),
    ),
    _inspect_target(
        "nf4_matmul_bwd_dx", ones=("stride_xr", "stride_op", "stride_wp"),
        divisible=("P", "R", "stride_xm", "stride_om", "stride_wr"),
    ),
]  # fmt: skip
