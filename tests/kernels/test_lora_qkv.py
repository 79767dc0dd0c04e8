"""lora_qkv: Triton kernels (interpreter on CPU, real on CUDA) and the torch path against the
fp64 reference of three separate LoRA linears; shared dropout mask, grad plumbing, autocast."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from fastmid.kernels._common import INTERPRET, torch_keep_mask, triton_keep_mask

from ._tolerance import (
    DEVICE,
    assert_all_within_torch_error,
    bf16_forward,
    force_torch_path,
    saved_by_op,
    spy_dx_gemms,
    torch_keep,
    triton_keep,
)

triton_only = pytest.mark.skipif(
    DEVICE == "cpu" and not INTERPRET, reason="Triton needs CUDA or TRITON_INTERPRET=1"
)
MODULE = importlib.import_module("fastmid.kernels.lora_qkv")
NAMES = ("q", "k", "v", "dx", "dA_q", "dA_k", "dA_v", "dB_q", "dB_k", "dB_v")


@pytest.fixture
def torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the torch execution path even where Triton would run."""
    force_torch_path(monkeypatch)


def make_inputs(lead, k, sizes, ranks, dtype, bias, device=DEVICE):
    """x (*lead,K), w_qkv (N,K), a_i (r_i,K), b_i (N_i,r_i), bias (N) with unit-scale outputs."""
    x = torch.randn(*lead, k, device=device, dtype=dtype)
    w = torch.randn(sum(sizes), k, device=device, dtype=dtype) / math.sqrt(k)
    a = [torch.randn(r, k, device=device, dtype=dtype) / math.sqrt(k) for r in ranks]
    b = [
        torch.randn(n, r, device=device, dtype=dtype) / math.sqrt(r)
        for n, r in zip(sizes, ranks, strict=True)
    ]
    bias_t = torch.randn(sum(sizes), device=device, dtype=dtype) if bias else None
    return x, w, a, b, bias_t


def run(fn, x, w, a, b, bias, upstream, x_grad=True):
    """Outputs (q, k, v) and grads (dx, dA_*, dB_*) of `fn` for the upstream gradients."""
    x = x.detach().clone().requires_grad_(x_grad)
    a = [t.detach().clone().requires_grad_() for t in a]
    b = [t.detach().clone().requires_grad_() for t in b]
    outs = fn(x, w, a, b, bias)
    torch.autograd.backward(outs, [u.to(o.dtype) for u, o in zip(upstream, outs, strict=True)])
    return [o.detach() for o in outs] + [x.grad] + [t.grad for t in a + b]


def check_against_reference(lead, k, sizes, ranks, dtype, bias, p, keep_fn, seed=77):
    """lora_qkv vs the fp64 reference (same mask), within plain torch's error in `dtype`."""
    x, w, a, b, bias_t = make_inputs(lead, k, sizes, ranks, dtype, bias)
    scales = (2.0, 0.5, 1.5)
    keep = keep_fn((x.numel() // k, k), p, seed, x.dtype).reshape(x.shape) if p > 0 else None
    upstream = [torch.randn(*lead, n, device=x.device, dtype=torch.float64) for n in sizes]

    def ref(x_, w_, a_, b_, bias_):
        keep_ = None if keep is None else keep.to(x_.dtype)
        return MODULE.lora_qkv_reference(x_, w_, *a_, *b_, scales, bias_, p, keep=keep_)

    def as64(t):
        return None if t is None else t.double()

    got = run(lambda x_, w_, a_, b_, bias_: MODULE.lora_qkv(
        x_, w_, *a_, *b_, scales, bias_, p, seed), x, w, a, b, bias_t, upstream)  # fmt: skip
    want = run(ref, as64(x), as64(w), [as64(t) for t in a], [as64(t) for t in b], as64(bias_t),
               upstream)  # fmt: skip
    base = run(ref, x, w, a, b, bias_t, upstream)
    assert_all_within_torch_error(NAMES, got, want, base, dtype)


# (leading dims, K, (Nq, Nk, Nv), (r_q, r_k, r_v), bias, dropout): sizes that are no multiple
# of any block, q/k/v boundaries inside a tile, ranks 1..128 and different per member.
KERNEL_CASES = [
    ((2, 19), 70, (48, 20, 20), (1, 8, 16), True, 0.0),
    ((37,), 40, (36, 12, 12), (64, 128, 3), False, 0.0),
    ((3, 11), 33, (24, 8, 8), (16, 8, 5), True, 0.15),
    # R = 200 > 128: the thin GEMM walks the rank columns in several blocks.
    ((17,), 36, (20, 12, 12), (150, 2, 48), False, 0.1),
]


@triton_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(("lead", "k", "sizes", "ranks", "bias", "p"), KERNEL_CASES)
def test_triton_matches_reference(lead, k, sizes, ranks, bias, p, dtype):
    check_against_reference(lead, k, sizes, ranks, dtype, bias, p, triton_keep)


TORCH_CASES = [
    *KERNEL_CASES,
    ((5, 7), 64, (64, 16, 16), (128, 128, 128), True, 0.05),
    ((29,), 50, (30, 10, 10), (8, 1, 64), False, 0.3),
]


@pytest.mark.parametrize(("lead", "k", "sizes", "ranks", "bias", "p"), TORCH_CASES)
def test_torch_path_matches_reference(torch_path, lead, k, sizes, ranks, bias, p):
    check_against_reference(lead, k, sizes, ranks, torch.float32, bias, p, torch_keep)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_gradcheck_torch_path_fp64(torch_path, p):
    """The hand-written backward of the torch path is the true derivative (bias, dropout)."""
    x, w, a, b, bias = make_inputs((2, 3), 6, (5, 3, 4), (2, 3, 1), torch.float64, True, "cpu")
    inputs = [t.requires_grad_() for t in (x, *a, *b)]

    def fn(x_, *ab):
        return MODULE.lora_qkv(x_, w, *ab[:3], *ab[3:], (1.5, 0.5, 2.0), bias, p, seed=11)

    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_reference_fp64():
    """The oracle itself differentiates to the true derivative."""
    x, w, a, b, bias = make_inputs((4,), 5, (3, 2, 2), (2, 1, 3), torch.float64, True, "cpu")
    keep = torch_keep_mask(x.shape, 0.5, 3, x.device).to(x.dtype)
    inputs = [t.requires_grad_() for t in (x, *a, *b)]

    def fn(x_, *ab):
        return MODULE.lora_qkv_reference(x_, w, *ab[:3], *ab[3:], 0.7, bias, 0.5, keep=keep)

    assert torch.autograd.gradcheck(fn, inputs)


@triton_only
def test_dropout_mask_shared_and_redrawn():
    """One keep-mask for q, k and v: with identity adapters and W = 0, each output is
    m / (1-p) ⊙ x. Same seed → same mask, another seed → another; keep rate ≈ 1 - p."""
    k, p, m = 32, 0.25, 80
    x = torch.ones(m, k, device=DEVICE)
    w = torch.zeros(3 * k, k, device=DEVICE)
    eye = torch.eye(k, device=DEVICE)
    q, kk, v = MODULE.lora_qkv(x, w, eye, eye, eye, eye, eye, eye, 1.0, dropout_p=p, seed=5)
    keep = triton_keep_mask((m, k), p, 5, torch.device(DEVICE))
    torch.testing.assert_close(q, keep / (1 - p))
    assert torch.equal(q, kk) and torch.equal(q, v)
    again = MODULE.lora_qkv(x, w, eye, eye, eye, eye, eye, eye, 1.0, dropout_p=p, seed=5)[0]
    other = MODULE.lora_qkv(x, w, eye, eye, eye, eye, eye, eye, 1.0, dropout_p=p, seed=6)[0]
    assert torch.equal(q, again) and not torch.equal(q, other)
    n = keep.numel()
    assert abs(keep.mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)


def test_seed_none_reproducible_under_manual_seed(torch_path):
    x, w, a, b, _ = make_inputs((8,), 16, (8, 4, 4), (4, 4, 4), torch.float32, False, "cpu")
    torch.manual_seed(3)
    first = MODULE.lora_qkv(x, w, *a, *b, 1.0, dropout_p=0.5)
    torch.manual_seed(3)
    second = MODULE.lora_qkv(x, w, *a, *b, 1.0, dropout_p=0.5)
    third = MODULE.lora_qkv(x, w, *a, *b, 1.0, dropout_p=0.5)
    assert all(torch.equal(s, f) for s, f in zip(second, first, strict=True))
    assert not torch.equal(third[0], first[0])


@pytest.mark.parametrize("path", ["triton", "torch"])
def test_dx_skipped_when_x_needs_no_grad(monkeypatch, path):
    """The lowest adapted layer's input comes from frozen blocks: the dx GEMM (M,N)·(N,K) is
    never run when x needs no grad, and the adapter grads are unchanged."""
    if path == "triton" and DEVICE == "cpu" and not INTERPRET:
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    m, k, sizes = 18, 24, (16, 8, 8)
    n = sum(sizes)
    x, w, a, b, _ = make_inputs((2, 9), k, sizes, (4, 2, 8), torch.float32, False)
    upstream = [torch.randn(2, 9, s, device=DEVICE) for s in sizes]
    # dx is one GEMM over the fused weight, (M,N)·(N,K).
    dx_gemms = spy_dx_gemms(monkeypatch, path, ((m, n), (n, k)))

    def op(x_, w_, a_, b_, bias_):
        return MODULE.lora_qkv(x_, w_, *a_, *b_, 2.0)

    with_dx = run(op, x, w, a, b, None, upstream)
    ran_with = len(dx_gemms)
    without = run(op, x, w, a, b, None, upstream, x_grad=False)
    monkeypatch.undo()
    assert ran_with == 1 and len(dx_gemms) == 1
    assert with_dx[3] is not None and without[3] is None
    for g_with, g_without in zip(with_dx[4:], without[4:], strict=True):
        torch.testing.assert_close(g_without, g_with)


@pytest.mark.parametrize("force_torch", [True, False], ids=["torch_path", "dispatched"])
def test_autocast_bf16(force_torch, monkeypatch):
    """Under CPU autocast the op computes in bf16 and returns fp32 adapter grads, as close to
    the fp64 reference as autocast torch gets. "dispatched" keeps the op's own path choice:
    under the interpreter its backward must still stay off the (bf16-incapable) kernels."""
    if force_torch:
        force_torch_path(monkeypatch)
    x, w, a, b, bias = make_inputs((4, 13), 48, (32, 16, 16), (8, 16, 4), torch.float32, True)
    w, bias = w.bfloat16(), bias.bfloat16()
    upstream = [torch.randn(4, 13, n, device=DEVICE, dtype=torch.float64) for n in (32, 16, 16)]

    def op(*t):
        return MODULE.lora_qkv(t[0], t[1], *t[2], *t[3], 2.0, t[4])

    def ref(*t):
        return MODULE.lora_qkv_reference(t[0], t[1], *t[2], *t[3], 2.0, t[4])

    got = run(bf16_forward(op), x, w, a, b, bias, upstream)
    base = run(bf16_forward(ref), x, w, a, b, bias, upstream)
    want = run(ref, x.double(), w.double(), [t.double() for t in a], [t.double() for t in b],
               bias.double(), upstream)  # fmt: skip
    assert [g.dtype for g in got[:3]] == [torch.bfloat16] * 3
    assert all(g.dtype == torch.float32 for g in got[3:])
    assert_all_within_torch_error(NAMES, got, want, base)


def test_outputs_are_views_of_one_buffer(torch_path):
    x, w, a, b, _ = make_inputs((3, 5), 16, (8, 4, 4), (2, 2, 2), torch.float32, False)
    q, k, v = MODULE.lora_qkv(x, w, *a, *b, 1.0)
    assert q.shape == (3, 5, 8) and k.shape == v.shape == (3, 5, 4)
    assert q.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()


def test_rejects_bad_arguments():
    x, w, a, b, _ = make_inputs((4,), 8, (4, 2, 2), (2, 2, 2), torch.float32, False, "cpu")
    with pytest.raises(ValueError, match="weight_qkv"):
        MODULE.lora_qkv(x, w[:-1], *a, *b, 1.0)
    with pytest.raises(ValueError, match="adapter shapes"):
        MODULE.lora_qkv(x, w, a[0][:, :4], a[1], a[2], *b, 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        MODULE.lora_qkv(x, w, *a, *b, 1.0, dropout_p=1.0)
    with pytest.raises(ValueError, match="scales"):
        MODULE.lora_qkv(x, w, *a, *b, (1.0, 2.0))


@pytest.mark.gpu
@pytest.mark.parametrize("r", [16, 64])
@pytest.mark.parametrize("p", [0.0, 0.05])
def test_cuda_bf16_smollm2_shapes(r, p):
    """SmolLM2 attention shapes (M = 4096 tokens, K = 576, q 576, k/v 192) in bf16 autocast
    with fp32 adapters, the production GPU setting."""
    k, sizes = 576, (576, 192, 192)
    x, w, a, b, _ = make_inputs((2, 2048), k, sizes, (r, r, r), torch.float32, False)
    w = w.bfloat16()
    x = x.bfloat16()
    scales = 128 / r
    keep = triton_keep_mask((4096, k), p, 9, x.device).reshape(x.shape) if p else None
    upstream = [torch.randn(2, 2048, n, device=DEVICE, dtype=torch.float64) for n in sizes]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = run(lambda *t: MODULE.lora_qkv(t[0], t[1], *t[2], *t[3], scales, None, p, 9),
                  x, w, a, b, None, upstream)  # fmt: skip
        base = run(lambda *t: MODULE.lora_qkv_reference(
            t[0], t[1], *t[2], *t[3], scales, None, p, keep=keep),
            x, w, a, b, None, upstream)  # fmt: skip
    want = run(lambda *t: MODULE.lora_qkv_reference(
        t[0], t[1], *t[2], *t[3], scales, None, p, keep=None if keep is None else keep.double()),
        x.double(), w.double(), [t.double() for t in a], [t.double() for t in b], None,
        upstream)  # fmt: skip
    assert_all_within_torch_error(NAMES, got, want, base)


@triton_only
def test_triton_many_row_tiles():
    """More row tiles than GROUP_M (8) with a partial last group: every tile is computed once."""
    check_against_reference((293,), 16, (16, 8, 9), (2, 3, 2), torch.float32, True, 0.0, None)


def test_saves_only_x_and_xa(torch_path):
    """Backward state is x, xa (M, r_q+r_k+r_v) and the parameters: no (M,N) tensor."""
    x, w, a, b, bias = make_inputs((24,), 16, (8, 4, 4), (2, 3, 4), torch.float32, True)
    params = [t.requires_grad_() for t in (*a, *b)]
    q, _, _ = MODULE.lora_qkv(x.requires_grad_(), w, *params, 1.0, bias)
    own = saved_by_op(q, (x, w, *params))
    assert [tuple(t.shape) for t in own] == [(24, 9)]
