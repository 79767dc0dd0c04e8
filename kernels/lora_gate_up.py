"""Grouped LoRA gate/up projection with the SwiGLU product fused: h = silu(g) ⊙ u.

Shapes (leading dims of x flattened into M):
    x (M,K); frozen w = cat(Wgate, Wup) (2I,K); a_g (r_g,K), a_u (r_u,K), b_g (I,r_g),
    b_u (I,r_u); scales s_g, s_u; R = r_g+r_u. LoRA dropout: one 0/1 keep-mask m shared by
    gate and up (they read the same x), 1/(1-p) folded into s' = s/(1-p).

    xa = (m ⊙ x)·[s_g' A_g; s_u' A_u]ᵀ                   (M,R)   one thin GEMM
    g  = x·Wgᵀ + xa_g·B_gᵀ      u = x·Wuᵀ + xa_u·B_uᵀ     (M,I)   never stored
    h  = silu(g) ⊙ u                                       (M,I)   the only output
    dg = dh ⊙ u ⊙ σ(g)(1 + g(1-σ(g)))      du = dh ⊙ silu(g)
    gs = [s_g' dg·B_g | s_u' du·B_u]                       (M,R)
    dx = [dg | du]·w + m ⊙ (gs·[A_g; A_u])   (skipped when x needs no grad)
    dA = gsᵀ·(m ⊙ x)          dB_g = dgᵀ·xa_g      dB_u = duᵀ·xa_u

Memory/compute trade: forward saves only x and xa (R columns). An unfused MLP keeps g, u and
silu(g) alive for backward, 3·M·I values; at SmolLM2 shapes (I = 1536 = 2.7·K) that is about
8× the size of x. Backward instead recomputes g and u with one more base GEMM (2·M·K·2I
FLOPs: the layer's forward cost again, about +50% on its fwd+bwd) and turns them into dg and du
in the same kernel's epilogue, so the recomputed pre-activations never reach memory on the
Triton path. The torch path recomputes into one (M,2I) buffer and builds dg and du in place.
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
    shipped_arch,
    to_triton_configs,
    torch_keep_mask,
    use_triton,
)
from .lora_qkv import (
    add_segment,
    grouped_backward_torch,
    inspect_target,
    launch_grouped_mm,
    launch_thin,
    launch_tn,
    tile_ids,
)

__all__ = ["LoraGateUpFunction", "lora_gate_up", "lora_gate_up_reference"]


# --------------------------------------------------------------------------------------------
# Triton kernel: gate and up tiles side by side, SwiGLU (or its derivative) in the epilogue
# --------------------------------------------------------------------------------------------
@triton.jit
def _lora_gate_up_kernel(
    X, W, XA, BG, BU, DH, OUT,
    M, I, K, RG, RU,
    stride_xm, stride_wn, stride_xam, stride_dhm, stride_om,
    BACKWARD: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """One (BM, BN) tile of h, or in BACKWARD of dg and du (OUT (M,2I) = [dg | du]).

    Two fp32 accumulators (gate, up) live through the K loop, so the tiles are smaller than a
    plain GEMM's: the shipped configs are the largest that compile without spills.
    """
    pid_m, pid_n = tile_ids(M, I, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    n_ok = rn < I
    x_ptr = X + rm[:, None].to(tl.int64) * stride_xm + rk[None, :]
    wg_ptr = W + rn[None, :].to(tl.int64) * stride_wn + rk[:, None]
    wu_ptr = wg_ptr + I.to(tl.int64) * stride_wn
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_ok = (k0 + rk) < K
        x = tl.load(x_ptr, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & n_ok[None, :]
        acc_g = tl.dot(x, tl.load(wg_ptr, mask=w_mask, other=0.0), acc_g)
        acc_u = tl.dot(x, tl.load(wu_ptr, mask=w_mask, other=0.0), acc_u)
        x_ptr += BK
        wg_ptr += BK
        wu_ptr += BK
    n0 = pid_n * BN
    acc_g = add_segment(acc_g, XA, stride_xam, rm, m_ok, BG, RG, 1, rn, n0, 0, I, RG, BN, BR)
    acc_u = add_segment(acc_u, XA + RG, stride_xam, rm, m_ok, BU, RU, 1, rn, n0, 0, I, RU, BN, BR)
    sig = tl.sigmoid(acc_g)
    silu = acc_g * sig
    mask = m_ok[:, None] & n_ok[None, :]
    o_ptr = OUT + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    if BACKWARD:
        dh = tl.load(DH + rm[:, None].to(tl.int64) * stride_dhm + rn[None, :], mask=mask, other=0.0)
        dh = dh.to(tl.float32)
        dg = dh * acc_u * (sig + silu * (1.0 - sig))
        tl.store(o_ptr, dg.to(OUT.dtype.element_ty), mask=mask)
        tl.store(o_ptr + I, (dh * silu).to(OUT.dtype.element_ty), mask=mask)
    else:
        tl.store(o_ptr, (silu * acc_u).to(OUT.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------
# Two live (BM,BN) fp32 accumulators. sm_90 keeps wgmma accumulators in registers: 128×64
# with 8 warps is 64 accumulator registers per thread, the budget of one 128×128 GEMM tile
# (128×128 spills). On sm_80 the BK=64 tiles compile at the 255-register cap (no spill, but no
# headroom), so it ships BK=32 tiles at 128-138 registers.
GATE_UP_CONFIGS = {
    90: [
        {"BM": 128, "BN": 64, "BK": 64, "BR": 32, "num_warps": 8, "num_stages": 3},
        {"BM": 64, "BN": 128, "BK": 64, "BR": 32, "num_warps": 8, "num_stages": 3},
        {"BM": 64, "BN": 64, "BK": 64, "BR": 32, "num_warps": 4, "num_stages": 3},
    ],
    80: [
        {"BM": 128, "BN": 64, "BK": 32, "BR": 32, "num_warps": 8, "num_stages": 4},
        {"BM": 64, "BN": 64, "BK": 32, "BR": 32, "num_warps": 4, "num_stages": 3},
    ],
}
_INTERPRET_META = {"BM": 32, "BN": 32, "BK": 32, "BR": 16}
_tuned: dict[int, object] = {}


def launch_gate_up(
    x: torch.Tensor,
    w: torch.Tensor,
    xa: torch.Tensor,
    b_g: torch.Tensor,
    b_u: torch.Tensor,
    out: torch.Tensor,
    dh: torch.Tensor | None = None,
) -> None:
    """out = silu(g) ⊙ u (M,I); with dh given, out = [dg | du] (M,2I) instead.

    x (M,K) and w (2I,K) with unit column stride; xa (M, r_g+r_u); b_g, b_u contiguous.
    """
    M, K = x.shape
    I = w.shape[0] // 2
    rg, ru = b_g.shape[1], b_u.shape[1]
    assert x.stride(1) == 1 and w.stride(1) == 1 and w.shape == (2 * I, K)
    assert b_g.is_contiguous() and b_u.is_contiguous() and xa.shape == (M, rg + ru)
    assert out.shape == (M, I if dh is None else 2 * I) and out.stride(1) == 1
    grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(I, meta["BN"]),)
    args = dict(
        X=x, W=w, XA=xa, BG=b_g, BU=b_u, DH=out if dh is None else dh, OUT=out,
        M=M, I=I, K=K, RG=rg, RU=ru,
        stride_xm=x.stride(0), stride_wn=w.stride(0), stride_xam=xa.stride(0),
        stride_dhm=0 if dh is None else dh.stride(0), stride_om=out.stride(0),
        BACKWARD=dh is not None, GROUP_M=8,
    )  # fmt: skip
    if not x.is_cuda:
        _lora_gate_up_kernel[grid](**args, **_INTERPRET_META)
        return
    arch = shipped_arch(cuda_arch(x.device))
    if arch not in _tuned:
        configs = to_triton_configs(GATE_UP_CONFIGS[arch])
        _tuned[arch] = triton.autotune(configs, key=["I", "K", "BACKWARD"])(_lora_gate_up_kernel)
    _tuned[arch][grid](**args)


# --------------------------------------------------------------------------------------------
# Forward / backward on both paths (2-D operands in the compute dtype, effective scales)
# --------------------------------------------------------------------------------------------
def _forward_triton(x, w, a_list, b_list, scales, p, seed):
    M = x.shape[0]
    ranks = [a.shape[0] for a in a_list]
    xa = torch.empty(M, sum(ranks), dtype=x.dtype, device=x.device)
    launch_thin(x, torch.cat(a_list).to(x.dtype), xa, scales, ranks, p, seed)
    h = torch.empty(M, w.shape[0] // 2, dtype=x.dtype, device=x.device)
    b_g, b_u = (b.to(x.dtype).contiguous() for b in b_list)
    launch_gate_up(x, w, xa, b_g, b_u, h)
    return h, xa


def _gate_up_torch(x, w, xa, b_list):
    """(M,2I) = [g | u]: one base GEMM, the two low-rank terms accumulated into its halves."""
    gu = torch.mm(x, w.t())
    half, rg = w.shape[0] // 2, b_list[0].shape[1]
    gu[:, :half].addmm_(xa[:, :rg], b_list[0].to(x.dtype).t())
    gu[:, half:].addmm_(xa[:, rg:], b_list[1].to(x.dtype).t())
    return gu


def _forward_torch(x, w, a_list, b_list, scales, p, seed):
    a_s = torch.cat([a * s for a, s in zip(a_list, scales, strict=True)]).to(x.dtype)
    xd = x if p == 0 else x * torch_keep_mask(x.shape, p, seed, x.device, x.dtype)
    xa = torch.mm(xd, a_s.t())
    gu = _gate_up_torch(x, w, xa, b_list)
    half = w.shape[0] // 2
    h = torch.nn.functional.silu(gu[:, :half])
    return h.mul_(gu[:, half:]), xa


def _backward_triton(x, dh, w, a_list, b_list, scales, xa, p, seed, need_dx):
    M, K = x.shape
    half = w.shape[0] // 2
    (rg, ru), (sg, su) = (a.shape[0] for a in a_list), scales
    b_g, b_u = (b.to(x.dtype).contiguous() for b in b_list)
    dgu = torch.empty(M, 2 * half, dtype=x.dtype, device=x.device)
    launch_gate_up(x, w, xa, b_g, b_u, dgu, dh)
    dg, du = dgu[:, :half], dgu[:, half:]
    gs = torch.empty(M, rg + ru, dtype=x.dtype, device=x.device)
    launch_thin(dg, b_g.t(), gs[:, :rg], [sg], [rg])
    launch_thin(du, b_u.t(), gs[:, rg:], [su], [ru])
    da = torch.empty(rg + ru, K, dtype=torch.float32, device=x.device)
    launch_tn(gs, x, da, p, seed)
    dbs = [torch.empty(b.shape, dtype=torch.float32, device=x.device) for b in b_list]
    launch_tn(dg, xa[:, :rg], dbs[0])
    launch_tn(du, xa[:, rg:], dbs[1])
    dx = None
    if need_dx:
        dx = torch.empty(M, K, dtype=x.dtype, device=x.device)
        a_cat = torch.cat(a_list).to(x.dtype)
        launch_grouped_mm(dgu, w, dx, gs, [(a_cat.t(), 0, 0)], None, p, seed)
    return dx, da, dbs


def _backward_torch(x, dh, w, a_list, b_list, scales, xa, p, seed, need_dx):
    half = w.shape[0] // 2
    # Recompute [g | u] into one buffer, then overwrite it in place: u → dh⊙u → dg, and
    # g → silu(g) → du. Peak extra memory is this (M,2I) buffer, nothing else of that size.
    gu = _gate_up_torch(x, w, xa, b_list)
    g, u = gu[:, :half], gu[:, half:]
    u.mul_(dh)
    dg = torch.ops.aten.silu_backward.grad_input(u, g, grad_input=u)
    du = torch.nn.functional.silu(g, inplace=True).mul_(dh)
    # From here gate and up are two grouped LoRA linears with output gradients dg and du.
    return grouped_backward_torch(x, [dg, du], w, a_list, b_list, scales, xa, p, seed, need_dx)


# --------------------------------------------------------------------------------------------
# Plain-torch reference (test oracle)
# --------------------------------------------------------------------------------------------
def lora_gate_up_reference(
    x: torch.Tensor,
    weight_gate_up: torch.Tensor,
    a_g: torch.Tensor,
    a_u: torch.Tensor,
    b_g: torch.Tensor,
    b_u: torch.Tensor,
    scales: float | Sequence[float],
    dropout_p: float = 0.0,
    seed: int = 0,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """silu(gate) ⊙ up of two LoRA linears, by plain autograd: the oracle for `lora_gate_up`.

    `keep` (0/1, shape of x) overrides the seeded mask, so a kernel can be checked against the
    reference with the kernel's own mask.
    """
    sg, su = _pair(scales)
    if dropout_p > 0.0 and keep is None:
        keep = torch_keep_mask(x.shape, dropout_p, seed, x.device, x.dtype)
    xd = x if dropout_p == 0.0 else x * keep.to(x.dtype) / (1.0 - dropout_p)
    wg, wu = weight_gate_up.split(b_g.shape[0])
    g = x @ wg.t() + sg * ((xd @ a_g.t()) @ b_g.t())
    u = x @ wu.t() + su * ((xd @ a_u.t()) @ b_u.t())
    return torch.nn.functional.silu(g) * u


# --------------------------------------------------------------------------------------------
# Autograd Function and functional op
# --------------------------------------------------------------------------------------------
_ARG_NAMES = ("x", "w", "a_g", "a_u", "b_g", "b_u", "scales", "p", "seed")


class LoraGateUpFunction(torch.autograd.Function):
    """Autograd for `lora_gate_up`: Triton where `use_triton(x)`, the torch path elsewhere."""

    @staticmethod
    def forward(ctx, x, w, a_g, a_u, b_g, b_u, scales, p, seed):
        dt = compute_dtype(x)
        lead, K = x.shape[:-1], x.shape[-1]
        a_list, b_list = (a_g, a_u), (b_g, b_u)
        scales_eff = [effective_scale(s, p) for s in scales]
        run = _forward_triton if use_triton(x) else _forward_torch
        with torch.autocast(x.device.type, enabled=False):
            h, xa = run(
                x.reshape(-1, K).to(dt).contiguous(), w.to(dt), a_list, b_list, scales_eff, p, seed
            )
        # x (not its compute-dtype copy) and the rank-R xa: the pre-activations are recomputed.
        ctx.save_for_backward(x, w, *a_list, *b_list, xa)
        ctx.scales, ctx.p, ctx.seed, ctx.dtype = scales_eff, p, seed, dt
        return h.view(*lead, h.shape[1])

    @staticmethod
    def backward(ctx, dh):
        x, w, a_g, a_u, b_g, b_u, xa = ctx.saved_tensors
        dt, K = ctx.dtype, x.shape[-1]
        a_list, b_list = (a_g, a_u), (b_g, b_u)
        x2 = x.reshape(-1, K).to(dt).contiguous()
        # Dispatch on the compute-dtype copy: autocast is off in backward, so the saved x alone
        # would not tell that the GEMMs run in bf16 (which the interpreter cannot do).
        run = _backward_triton if use_triton(x2) else _backward_torch
        with torch.autocast(x.device.type, enabled=False):
            dx, da, dbs = run(
                x2,
                dh.reshape(-1, dh.shape[-1]).to(dt).contiguous(),
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
        rg = a_g.shape[0]
        grads["a_g"], grads["a_u"] = da[:rg].to(a_g.dtype), da[rg:].to(a_u.dtype)
        grads["b_g"], grads["b_u"] = dbs[0].to(b_g.dtype), dbs[1].to(b_u.dtype)
        return tuple(grads[n] for n in _ARG_NAMES)


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
    seed: int | None = None,
) -> torch.Tensor:
    """h = silu(gate) ⊙ up for two LoRA linears sharing one read of x (see module docstring).

    x (..., K); weight_gate_up = cat(Wgate, Wup) (2I, K), frozen, built once by the caller;
    a_g (r_g, K), a_u (r_u, K), b_g (I, r_g), b_u (I, r_u); scales: one float or (s_g, s_u).
    One dropout mask is shared by gate and up; `seed=None` draws one from torch's generator.
    Returns h (..., I). Backward recomputes gate and up instead of storing them.
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
    return LoraGateUpFunction.apply(
        x, weight_gate_up, a_g, a_u, b_g, b_u, _pair(scales), float(dropout_p),
        draw_seed(dropout_p, seed),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Ahead-of-time compilation targets (`python -m fastmid.kernels.inspect`). The backward's
# thin, weight-gradient and dx GEMMs are the lora_qkv kernels, registered there.
# --------------------------------------------------------------------------------------------
_PTRS = {n: "*{dtype}" for n in ("X", "W", "XA", "BG", "BU", "DH", "OUT")}
_DIVISIBLE = ("I", "K", "stride_xm", "stride_wn", "stride_om", "stride_dhm")
INSPECT_TARGETS: list[InspectTarget] = [
    inspect_target(
        "lora_gate_up_fwd", _lora_gate_up_kernel, GATE_UP_CONFIGS, _PTRS, ones=(),
        divisible=_DIVISIBLE, BACKWARD=False, GROUP_M=8,
    ),
    inspect_target(
        "lora_gate_up_bwd_recompute", _lora_gate_up_kernel, GATE_UP_CONFIGS, _PTRS,
        ones=(), divisible=_DIVISIBLE, BACKWARD=True, GROUP_M=8,
    ),
]  # fmt: skip
