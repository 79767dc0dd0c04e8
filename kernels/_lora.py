"""Forward and backward of grouped LoRA linears, shared by lora_linear, lora_qkv and lora_gate_up.

One to three members read the same x over a frozen concatenated weight w = cat(W_i) (N,K).
Operands are 2-D and in the compute dtype; `scales` are the effective ones (dropout's 1/(1-p)
folded in); one keep-mask m of x is shared by every member:

    xa = (m ⊙ x)·[s_i A_i]ᵀ      y = x·wᵀ + bias + [xa_i·B_iᵀ]      g = [s_i dy_i·B_i]
    dx = dy·w + m ⊙ (g·[A_i])    dA = gᵀ·(m ⊙ x)    dB_i = dy_iᵀ·xa_i

For gate/up (`swiglu`) the op's output is h = silu(gate) ⊙ up of y = [gate | up], and dy is
[dgate | dup] built from dh; y is saved for backward, or recomputed there (`recompute`, the
memory mode: one more GEMM of the forward's size instead of keeping (M, 2I) values).

Execution (`dispatch`): the frozen GEMMs and the unmasked rank-r products are torch calls,
cuBLAS on CUDA, the rank-r terms accumulated by `addmm_` (beta = 1) into y and into dx so no
extra pass over either; only the dropout-masked products run as Triton kernels (`_gemm`), and
only where Triton runs. The same composition is the CPU path.

Host overhead is budgeted (it decides speed at small shapes on a GPU): eager calls run a plain
`torch.autograd.Function` (`LoraFunction`), never the dispatcher; the adapters' compute-dtype
copies are made once per change of the adapters (`adapter_operands`), not per call; the
dropout seed is a device tensor passed in with an integer layer offset (no RNG draw per call).
The `torch.library` ops (`fastmid::lora_linear`, `lora_qkv`, `lora_gate_up` and their backward)
exist for torch.compile and fake tensors only.

Adapter gradients: dA and dB come back in fp32 (the adapters' dtype) straight from the
product that forms them where the device allows (the Triton dA kernel accumulates and writes
fp32; on CUDA cuBLAS writes fp32 from 16-bit operands), so autograd neither casts nor copies
them: the first micro-batch's gradient becomes `.grad` as is, later ones are added in place
by autograd's accumulation. The op never writes `.grad` itself, so DDP/FSDP hooks and gradient
scalers see every gradient as usual. On CPU a 16-bit product is cast once per stacked dA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import _gemm
from ._common import torch_keep_mask, traced, use_triton

# --------------------------------------------------------------------------------------------
# Dispatch: which products run as Triton kernels. Everything else is the torch composition
# (cuBLAS on CUDA). Triton earns a product only where it removes a pass over memory: the three
# that apply LoRA dropout's mask draw it in-kernel instead of materialising m ⊙ x (torch: a
# mask pass, a masked copy of x, then the GEMM reading it). Without dropout there is no pass to
# save and cuBLAS runs everything; the first H200 run measured our Triton GEMMs at ~45% of
# cuBLAS, so no frozen GEMM is dispatched to Triton at any shape.
# --------------------------------------------------------------------------------------------
TRITON_PRODUCTS = ("xa = (m⊙x)·Aᵀ", "dA = gᵀ·(m⊙x)", "dx += m⊙(g·A)")


def masked_on_triton(x: torch.Tensor, dropout_p: float) -> bool:
    """True when the dropout-masked products (`TRITON_PRODUCTS`) of a call on `x` (already in
    the compute dtype) run as Triton kernels: dropout on and Triton available for x (CUDA, or
    the interpreter on fp32/fp16 CPU tensors; `FASTMID_KERNEL_PATH=torch` turns it off)."""
    return dropout_p > 0.0 and use_triton(x, x.dtype)


@dataclass(frozen=True)
class Spec:
    """The non-tensor settings of one call."""

    scales: tuple[float, ...]  # effective: dropout's 1/(1-p) folded in
    p: float
    seed_offset: int
    dtype: torch.dtype  # compute dtype
    swiglu: bool = False
    recompute: bool = False
    # Keep the adapters' compute-dtype copies between calls (`adapter_operands`): calls with
    # grad enabled, i.e. training steps.
    cache: bool = True


# --------------------------------------------------------------------------------------------
# The adapters in the compute dtype, made once per change of the adapters
# --------------------------------------------------------------------------------------------
_CACHE_ATTR = "_fastmid_operands"
# Optimizer steps taken in this process: a fused optimizer (torch's `fused=True` AdamW, CPU and
# CUDA) updates the parameters in place without bumping their version counters, so the cache
# key also holds this count, advanced by a global post-step hook on every torch optimizer.
_optimizer_steps = 0


def _count_step(_optimizer, _args, _kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_step)


@dataclass(frozen=True)
class Operands:
    """The adapters of one call as the products use them (compute dtype): A stacked (R,K), its
    rows scaled by the members' scales, and each (s_i·B_i) for g."""

    ranks: tuple[int, ...]
    a: torch.Tensor  # cat(A_i) (R,K)
    a_scaled_t: torch.Tensor  # cat(s_i A_i)ᵀ (K,R)
    b_t: tuple[torch.Tensor, ...]  # B_iᵀ (r_i,N_i)
    b_scaled: tuple[torch.Tensor, ...]  # s_i B_i (N_i,r_i)


def _build_operands(
    a_list: Sequence[torch.Tensor], b_list: Sequence[torch.Tensor], scales, dtype
) -> Operands:
    a = [t.to(dtype) for t in a_list]
    b = [t.to(dtype) for t in b_list]
    a_scaled = [t * s for t, s in zip(a, scales, strict=True)]
    return Operands(
        ranks=tuple(t.shape[0] for t in a),
        a=torch.cat(a) if len(a) > 1 else a[0],
        a_scaled_t=(torch.cat(a_scaled) if len(a) > 1 else a_scaled[0]).t(),
        b_t=tuple(t.t() for t in b),
        b_scaled=tuple(t * s for t, s in zip(b, scales, strict=True)),
    )


def adapter_operands(
    a_list: Sequence[torch.Tensor],
    b_list: Sequence[torch.Tensor],
    scales: tuple[float, ...],
    dtype: torch.dtype,
    cache: bool = True,
) -> Operands:
    """The adapters as `Operands`, cached on the first A tensor and rebuilt only when an adapter
    may have changed: the key holds the number of optimizer steps taken (`_count_step`), each
    adapter's version counter (bumped by every other in-place update: `copy_`, `load_state_dict`)
    and storage, the scales and the dtype. So with fp32 adapters under bf16 autocast the bf16
    copies are made once per optimizer step, not once per call.

    Contract: a write outside a torch optimizer's step that bypasses the version counter
    (through `.data`) is not seen; write adapters in place under `torch.no_grad()` instead.
    They are built afresh, and nothing is kept, with `cache=False` (calls under no_grad:
    evaluation, a warm-up pass before adapters are broadcast through `.data`) and when no
    adapter needs a cast (the copies are then two small scalings; gradcheck perturbs its
    inputs through `.data`)."""
    tensors = (*a_list, *b_list)
    if not cache or all(t.dtype == dtype for t in tensors):
        return _build_operands(a_list, b_list, scales, dtype)
    key = (_optimizer_steps, dtype, scales, tuple((t._version, t.data_ptr()) for t in tensors))
    holder = a_list[0]
    hit = holder.__dict__.get(_CACHE_ATTR)
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.no_grad():
        ops = _build_operands(a_list, b_list, scales, dtype)
    holder.__dict__[_CACHE_ATTR] = (key, ops)
    return ops


# --------------------------------------------------------------------------------------------
# The composition
# --------------------------------------------------------------------------------------------


def _masked(x: torch.Tensor, spec: Spec, seed: torch.Tensor) -> torch.Tensor:
    """m ⊙ x on the torch path (the Triton kernels never materialise it)."""
    keep = torch_keep_mask(x.shape, spec.p, seed, offset=spec.seed_offset)
    return torch.where(keep, x, 0.0)


def _base_plus_rank(x, w, bias, xa, ops: Operands) -> torch.Tensor:
    """y = x·wᵀ (+ bias) + [xa_i·B_iᵀ]: one GEMM over the fused weight, then each member's
    rank-r product accumulated into its columns (beta = 1: no extra pass over y)."""
    y = F.linear(x, w, bias)
    if len(ops.ranks) == 1:
        return y.addmm_(xa, ops.b_t[0])
    n0 = c0 = 0
    for b_t, r in zip(ops.b_t, ops.ranks, strict=True):
        n = b_t.shape[1]
        y[:, n0 : n0 + n].addmm_(xa[:, c0 : c0 + r], b_t)
        n0, c0 = n0 + n, c0 + r
    return y


def forward(x, w, bias, ops: Operands, spec: Spec, seed):
    """(out, xa, saved y or None) of one call; see the module docstring."""
    if spec.p == 0.0:
        xa = torch.mm(x, ops.a_scaled_t)
    elif masked_on_triton(x, spec.p):
        xa = _gemm.launch_thin(x, ops.a, spec.scales, ops.ranks, spec.p, seed, spec.seed_offset)
    else:
        xa = torch.mm(_masked(x, spec, seed), ops.a_scaled_t)
    y = _base_plus_rank(x, w, bias, xa, ops)
    if not spec.swiglu:
        return y, xa, None
    half = y.shape[1] // 2
    h = F.silu(y[:, :half]).mul_(y[:, half:])
    return h, xa, None if spec.recompute else y


def _swiglu_grad(dh, gu) -> torch.Tensor:
    """[dg | du] (M,2I), a new buffer, from dh and the saved pre-activations gu = [g | u]:
    dg = dh·u·silu'(g), du = dh·silu(g)."""
    half = gu.shape[1] // 2
    g, u = gu[:, :half], gu[:, half:]
    out = torch.empty_like(gu)
    dg, du = out[:, :half], out[:, half:]
    torch.mul(dh, u, out=dg)
    torch.ops.aten.silu_backward.grad_input(dg, g, grad_input=dg)
    torch.ops.aten.silu.out(g, out=du)
    du.mul_(dh)
    return out


def _swiglu_grad_in_place(dh, gu) -> tuple[torch.Tensor, torch.Tensor]:
    """(dg, du) written over a recomputed gu = [g | u], no other (M,I) buffer: u → dh·u → dg,
    then g → silu(g) → du. The two end up in each other's columns, so dx takes one GEMM per
    member."""
    half = gu.shape[1] // 2
    g, u = gu[:, :half], gu[:, half:]
    u.mul_(dh)
    dg = torch.ops.aten.silu_backward.grad_input(u, g, grad_input=u)
    du = F.silu(g, inplace=True).mul_(dh)
    return dg, du


def _fp32_product(lhs: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """lhs·rhs in fp32: cuBLAS writes fp32 straight from 16-bit operands on CUDA; elsewhere
    the product is cast (a no-op for fp32 operands)."""
    if lhs.is_cuda and lhs.dtype != torch.float32:
        return torch.mm(lhs, rhs, out_dtype=torch.float32)
    return torch.mm(lhs, rhs).float()


def backward(dy, x, w, bias, xa, saved_y, ops: Operands, spec: Spec, seed, need_dx: bool):
    """(dx or None, dA stacked (R,K) fp32, [dB_i] fp32) of one call given the output's
    gradient `dy` (for gate/up: dh)."""
    sizes = [t.shape[0] for t in ops.b_scaled]
    if spec.swiglu and saved_y is None:
        dys = _swiglu_grad_in_place(dy, _base_plus_rank(x, w, bias, xa, ops))
        dy = None  # dg and du are not side by side: no one GEMM over the fused weight
    else:
        if spec.swiglu:
            dy = _swiglu_grad(dy, saved_y)
        dys = dy.split(sizes, dim=1) if len(sizes) > 1 else (dy,)
    triton_masked = masked_on_triton(x, spec.p)
    # g (M,R): each member's s_i·dy_i·B_i.
    if len(sizes) == 1:
        g = torch.mm(dys[0], ops.b_scaled[0])
    else:
        g = torch.empty(x.shape[0], sum(ops.ranks), dtype=x.dtype, device=x.device)
        c0 = 0
        for dy_i, b_s, r in zip(dys, ops.b_scaled, ops.ranks, strict=True):
            torch.mm(dy_i, b_s, out=g[:, c0 : c0 + r])
            c0 += r
    # The torch path's keep-mask of x, drawn once for dA and dx.
    keep = None
    if spec.p > 0.0 and not triton_masked:
        keep = torch_keep_mask(x.shape, spec.p, seed, offset=spec.seed_offset)
    if triton_masked:
        da = _gemm.launch_tn(g, x.contiguous(), spec.p, seed, spec.seed_offset)
    else:
        da = _fp32_product(g.t(), x if keep is None else torch.where(keep, x, 0.0))
    if len(sizes) == 1:
        dbs = [_fp32_product(dys[0].t(), xa)]
    else:
        dbs, c0 = [], 0
        for dy_i, r in zip(dys, ops.ranks, strict=True):
            dbs.append(_fp32_product(dy_i.t(), xa[:, c0 : c0 + r]))
            c0 += r
    dx = None
    if need_dx:
        if dy is not None:  # one cuBLAS GEMM over the fused weight
            dx = torch.mm(dy, w)
        else:
            n0 = 0
            for dy_i, n in zip(dys, sizes, strict=True):
                w_i = w[n0 : n0 + n]
                dx = torch.mm(dy_i, w_i) if dx is None else dx.addmm_(dy_i, w_i)
                n0 += n
        # The rank-r term added into dx: beta = 1, or the masked Triton update, no extra pass.
        if spec.p == 0.0:
            dx.addmm_(g, ops.a)
        elif triton_masked:
            _gemm.launch_masked_add(dx, g, ops.a, spec.p, seed, spec.seed_offset)
        else:
            dx.add_(torch.where(keep, torch.mm(g, ops.a), 0.0))
    return dx, da, dbs


# --------------------------------------------------------------------------------------------
# Eager path: a plain autograd.Function
# --------------------------------------------------------------------------------------------


class LoraFunction(torch.autograd.Function):
    """apply(spec, seed, x, w, bias, *a_list, *b_list) → out. x (M,K) in any dtype (cast to
    the compute dtype inside; only x itself is saved), w and bias frozen (never a grad)."""

    @staticmethod
    def forward(ctx, spec: Spec, seed, x, w, bias, *adapters):
        n = len(adapters) // 2
        ops = adapter_operands(adapters[:n], adapters[n:], spec.scales, spec.dtype, spec.cache)
        dtype = spec.dtype
        with torch.autocast(x.device.type, enabled=False):
            bias_c = None if bias is None else bias.to(dtype)
            out, xa, saved_y = forward(x.to(dtype), w.to(dtype), bias_c, ops, spec, seed)
        # bias is needed again only to recompute gate/up.
        kept_bias = bias if spec.swiglu and spec.recompute else None
        ctx.save_for_backward(x, w, kept_bias, xa, saved_y, seed, *adapters)
        # The operands built here serve the backward too (the cached ones are the same object;
        # the adapters are saved above, so an in-place change before backward is an error).
        ctx.spec, ctx.ops = spec, ops
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        spec: Spec = ctx.spec
        x, w, bias, xa, saved_y, seed, *adapters = ctx.saved_tensors
        n_inputs = 5 + len(adapters)
        if grad_out is None:
            return (None,) * n_inputs
        dtype, ops = spec.dtype, ctx.ops
        need_dx = ctx.needs_input_grad[2]
        with torch.autocast(x.device.type, enabled=False):
            bias_c = None if bias is None else bias.to(dtype)
            dx, da, dbs = backward(
                grad_out.to(dtype), x.to(dtype), w.to(dtype), bias_c, xa, saved_y, ops, spec,
                seed, need_dx,
            )  # fmt: skip
        grads = _adapter_grads(da, dbs, adapters, ctx.needs_input_grad[5:])
        return None, None, None if dx is None else dx.to(x.dtype), None, None, *grads


def _adapter_grads(da, dbs, adapters, needed) -> list[torch.Tensor | None]:
    """Each adapter's gradient in its own dtype (a no-op for fp32 adapters): dA split into the
    members' row blocks (views), then the dB's."""
    n = len(adapters) // 2
    das = da.split([t.shape[0] for t in adapters[:n]]) if n > 1 else (da,)
    return [
        g.to(t.dtype) if need else None
        for g, t, need in zip((*das, *dbs), adapters, needed, strict=True)
    ]


# --------------------------------------------------------------------------------------------
# torch.compile path: the same functions as opaque custom ops (one schema, three names, so a
# traced graph names the op it came from)
# --------------------------------------------------------------------------------------------


def _forward_op(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    a_list: list[torch.Tensor],
    b_list: list[torch.Tensor],
    scales: list[float],
    p: float,
    seed: torch.Tensor | None,
    seed_offset: int,
    dtype: torch.dtype,
    swiglu: bool,
    recompute: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, xa, saved y, empty when none) in `dtype`."""
    spec = Spec(tuple(scales), p, seed_offset, dtype, swiglu, recompute)
    ops = adapter_operands(a_list, b_list, spec.scales, dtype, cache=False)
    with torch.autocast(x.device.type, enabled=False):
        bias = None if bias is None else bias.to(dtype)
        out, xa, saved_y = forward(x.to(dtype), w.to(dtype), bias, ops, spec, seed)
    return out, xa, x.new_empty(0, dtype=dtype) if saved_y is None else saved_y


def _forward_fake(x, w, bias, a_list, b_list, scales, p, seed, seed_offset, dtype, swiglu,
                  recompute):  # fmt: skip
    m, n = x.shape[0], w.shape[0]
    rank = sum(a.shape[0] for a in a_list)
    out = x.new_empty(m, n // 2 if swiglu else n, dtype=dtype)
    saved = x.new_empty((m, n) if swiglu and not recompute else (0,), dtype=dtype)
    return out, x.new_empty(m, rank, dtype=dtype), saved


@torch.library.custom_op("fastmid::lora_grouped_backward", mutates_args=())
def _backward_op(
    dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
    xa: torch.Tensor, saved_y: torch.Tensor, a_list: list[torch.Tensor],
    b_list: list[torch.Tensor], scales: list[float], p: float, seed: torch.Tensor | None,
    seed_offset: int, dtype: torch.dtype, swiglu: bool, recompute: bool, need_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:  # fmt: skip
    """(dx in x's dtype (empty without `need_dx`), dA stacked fp32, [dB_i] fp32)."""
    spec = Spec(tuple(scales), p, seed_offset, dtype, swiglu, recompute)
    ops = adapter_operands(a_list, b_list, spec.scales, dtype, cache=False)
    with torch.autocast(x.device.type, enabled=False):
        bias = None if bias is None else bias.to(dtype)
        y = None if saved_y.numel() == 0 else saved_y
        dx, da, dbs = backward(
            dy.to(dtype), x.to(dtype), w.to(dtype), bias, xa, y, ops, spec, seed, need_dx
        )
    return (x.new_empty(0) if dx is None else dx.to(x.dtype)), da, dbs


@_backward_op.register_fake
def _(dy, x, w, bias, xa, saved_y, a_list, b_list, scales, p, seed, seed_offset, dtype, swiglu,
      recompute, need_dx):  # fmt: skip
    rank = sum(a.shape[0] for a in a_list)
    dx = x.new_empty(x.shape if need_dx else (0,))
    da = x.new_empty(rank, x.shape[1], dtype=torch.float32)
    return dx, da, [b.new_empty(b.shape, dtype=torch.float32) for b in b_list]


def _setup_context(ctx, inputs, output) -> None:
    x, w, bias, a_list, b_list, scales, p, seed, seed_offset, dtype, swiglu, recompute = inputs
    ctx.save_for_backward(x, w, bias, output[1], output[2], seed, *a_list, *b_list)
    ctx.n = len(a_list)
    ctx.settings = (list(scales), p, seed_offset, dtype, swiglu, recompute)


def _backward(ctx, grad_out, _grad_xa, _grad_saved):
    x, w, bias, xa, saved_y, seed, *adapters = ctx.saved_tensors
    n = ctx.n
    need_dx = ctx.needs_input_grad[0]
    dx, da, dbs = _backward_op(
        grad_out, x, w, bias, xa, saved_y, adapters[:n], adapters[n:], *ctx.settings[:2], seed,
        *ctx.settings[2:], need_dx,
    )  # fmt: skip
    needed = [ctx.needs_input_grad[3]] * n + [ctx.needs_input_grad[4]] * n
    grads = _adapter_grads(da, dbs, adapters, needed)
    return (
        dx if need_dx else None, None, None, grads[:n], grads[n:],
        None, None, None, None, None, None, None,
    )  # fmt: skip


def _register(name: str):
    op = torch.library.custom_op(f"fastmid::{name}", mutates_args=())(_forward_op)
    op.register_fake(_forward_fake)
    op.register_autograd(_backward, setup_context=_setup_context)
    return op


REGISTERED = {name: _register(name) for name in ("lora_linear", "lora_qkv", "lora_gate_up")}


def apply(
    name: str,
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    a_list: Sequence[torch.Tensor],
    b_list: Sequence[torch.Tensor],
    spec: Spec,
    seed: torch.Tensor | None,
) -> torch.Tensor:
    """Run op `name` on 2-D x: the eager autograd.Function, or the registered op while
    torch.compile traces or a tensor is a subclass (fake tensors)."""
    if traced((x, w, bias, seed, *a_list, *b_list)):
        out, _, _ = REGISTERED[name](
            x, w, bias, list(a_list), list(b_list), list(spec.scales), spec.p, seed,
            spec.seed_offset, spec.dtype, spec.swiglu, spec.recompute,
        )  # fmt: skip
        return out
    return LoraFunction.apply(spec, seed, x, w, bias, *a_list, *b_list)
