"""lora_gate_up: Triton kernels (interpreter on CPU, real on CUDA) and the torch path against the
fp64 reference silu(gate)·up of two LoRA linears; recompute instead of saved pre-activations."""

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
MODULE = importlib.import_module("fastmid.kernels.lora_gate_up")
NAMES = ("h", "dx", "dA_g", "dA_u", "dB_g", "dB_u")


@pytest.fixture
def torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the torch execution path even where Triton would run."""
    force_torch_path(monkeypatch)


def make_inputs(lead, k, inter, ranks, dtype, device=DEVICE):
    """x (*lead,K), w = cat(Wg, Wu) (2I,K), a_g/a_u (r,K), b_g/b_u (I,r), unit-scale outputs."""
    x = torch.randn(*lead, k, device=device, dtype=dtype)
    w = torch.randn(2 * inter, k, device=device, dtype=dtype) / math.sqrt(k)
    a = [torch.randn(r, k, device=device, dtype=dtype) / math.sqrt(k) for r in ranks]
    b = [torch.randn(inter, r, device=device, dtype=dtype) / math.sqrt(r) for r in ranks]
    return x, w, a, b


def run(fn, x, w, a, b, upstream, x_grad=True):
    """Output h and grads (dx, dA_g, dA_u, dB_g, dB_u) of `fn` for the upstream gradient."""
    x = x.detach().clone().requires_grad_(x_grad)
    a = [t.detach().clone().requires_grad_() for t in a]
    b = [t.detach().clone().requires_grad_() for t in b]
    h = fn(x, w, a, b)
    h.backward(upstream.to(h.dtype))
    return [h.detach(), x.grad] + [t.grad for t in a + b]


def op(scales, p=0.0, seed=None):
    return lambda x, w, a, b: MODULE.lora_gate_up(x, w, *a, *b, scales, p, seed)


def ref(scales, p=0.0, keep=None):
    def fn(x, w, a, b):
        keep_ = None if keep is None else keep.to(x.dtype)
        return MODULE.lora_gate_up_reference(x, w, *a, *b, scales, p, keep=keep_)

    return fn


def as64(x, w, a, b):
    return x.double(), w.double(), [t.double() for t in a], [t.double() for t in b]


def check_against_reference(lead, k, inter, ranks, dtype, p, keep_fn, seed=41):
    """lora_gate_up vs the fp64 reference (same mask), within plain torch's error in `dtype`."""
    x, w, a, b = make_inputs(lead, k, inter, ranks, dtype)
    scales = (2.0, 0.75)
    keep = keep_fn((x.numel() // k, k), p, seed, x.dtype).reshape(x.shape) if p > 0 else None
    upstream = torch.randn(*lead, inter, device=x.device, dtype=torch.float64)
    got = run(op(scales, p, seed), x, w, a, b, upstream)
    want = run(ref(scales, p, keep), *as64(x, w, a, b), upstream)
    base = run(ref(scales, p, keep), x, w, a, b, upstream)
    assert_all_within_torch_error(NAMES, got, want, base, dtype)


# (leading dims, K, I, (r_g, r_u), dropout): sizes that are no multiple of any block, ranks
# 1..128 and different for gate and up.
KERNEL_CASES = [
    ((2, 19), 70, 45, (1, 16), 0.0),
    ((37,), 40, 33, (128, 8), 0.0),
    ((3, 11), 33, 20, (64, 5), 0.2),
    # Ranks over 128 (R = 180): several rank blocks in the thin GEMM and the epilogues.
    ((17,), 36, 24, (144, 36), 0.1),
]


@triton_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(("lead", "k", "inter", "ranks", "p"), KERNEL_CASES)
def test_triton_matches_reference(lead, k, inter, ranks, p, dtype):
    check_against_reference(lead, k, inter, ranks, dtype, p, triton_keep)


TORCH_CASES = [*KERNEL_CASES, ((5, 7), 64, 96, (128, 128), 0.05), ((29,), 50, 30, (8, 64), 0.3)]


@pytest.mark.parametrize(("lead", "k", "inter", "ranks", "p"), TORCH_CASES)
def test_torch_path_matches_reference(torch_path, lead, k, inter, ranks, p):
    check_against_reference(lead, k, inter, ranks, torch.float32, p, torch_keep)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_gradcheck_torch_path_fp64(torch_path, p):
    """The hand-written backward (recomputed gate/up, in-place dg/du) is the true derivative."""
    x, w, a, b = make_inputs((2, 3), 6, 5, (2, 3), torch.float64, "cpu")
    inputs = [t.requires_grad_() for t in (x, *a, *b)]

    def fn(x_, a_g, a_u, b_g, b_u):
        return MODULE.lora_gate_up(x_, w, a_g, a_u, b_g, b_u, (1.5, 0.5), p, seed=11)

    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_reference_fp64():
    x, w, a, b = make_inputs((4,), 5, 3, (2, 1), torch.float64, "cpu")
    keep = torch_keep_mask(x.shape, 0.5, 3, x.device).to(x.dtype)
    inputs = [t.requires_grad_() for t in (x, *a, *b)]

    def fn(x_, a_g, a_u, b_g, b_u):
        return MODULE.lora_gate_up_reference(x_, w, a_g, a_u, b_g, b_u, 0.7, 0.5, keep=keep)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("recompute", [False, True], ids=["default", "recompute"])
@pytest.mark.parametrize("path", ["triton", "torch"])
def test_saved_state(monkeypatch, path, recompute):
    """Backward state besides x and the parameters: xa (M, r_g+r_u), plus [g | u] (M, 2I) by
    default, fewer values than the unfused MLP's g, u and silu(g) (3·M·I); in the memory mode
    (`recompute`) xa alone, nothing of size M×I."""
    if path == "torch":
        force_torch_path(monkeypatch)
    elif DEVICE == "cpu" and not INTERPRET:
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    m, k, inter, ranks = 24, 16, 40, (4, 8)
    x, w, a, b = make_inputs((m,), k, inter, ranks, torch.float32)
    params = [t.requires_grad_() for t in (*a, *b)]
    x.requires_grad_()
    h = MODULE.lora_gate_up(x, w, *params, 1.0, 0.1, 3, recompute=recompute)
    own = saved_by_op(h, (x, w, *params))
    shapes = [tuple(t.shape) for t in own if t.dim() > 0]  # the 0-dim dropout seed aside
    if recompute:
        assert shapes == [(m, sum(ranks))]
    else:
        assert shapes == [(m, sum(ranks)), (m, 2 * inter)]
        assert sum(math.prod(s) for s in shapes) < 3 * m * inter


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_recompute_mode_gives_the_same_results(torch_path, p):
    """The memory mode changes what is kept, not what is computed."""
    x, w, a, b = make_inputs((3, 11), 33, 20, (8, 5), torch.float32)
    upstream = torch.randn(3, 11, 20, device=DEVICE, dtype=torch.float64)
    saved = run(op(1.5, p, 4), x, w, a, b, upstream)
    recomputed = run(
        lambda *t: MODULE.lora_gate_up(t[0], t[1], *t[2], *t[3], 1.5, p, 4, recompute=True),
        x, w, a, b, upstream,
    )  # fmt: skip
    for got, want in zip(recomputed, saved, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", ["triton", "torch"])
def test_dx_skipped_when_x_needs_no_grad(monkeypatch, path):
    """No dx product when x needs no grad; the adapter grads do not change."""
    if path == "triton" and DEVICE == "cpu" and not INTERPRET:
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    k, inter = 24, 20
    x, w, a, b = make_inputs((2, 9), k, inter, (4, 8), torch.float32)
    upstream = torch.randn(2, 9, inter, device=DEVICE)
    m = 2 * 9
    dx_gemms = spy_dx_gemms(monkeypatch, path, ((m, 2 * inter), (2 * inter, k)))
    with_dx = run(op(1.5), x, w, a, b, upstream)
    ran_with = len(dx_gemms)
    without = run(op(1.5), x, w, a, b, upstream, x_grad=False)
    monkeypatch.undo()
    assert ran_with == 1 and len(dx_gemms) == 1
    assert with_dx[1] is not None and without[1] is None
    for g_with, g_without in zip(with_dx[2:], without[2:], strict=True):
        torch.testing.assert_close(g_without, g_with)


@triton_only
def test_dropout_mask_shared_and_redrawn():
    """Gate and up see one mask: with W = 0 and identity adapters, g = u = m/(1-p) ⊙ x, so
    h = silu(g)·g. Same seed → same h; another seed → another."""
    k, p, m = 32, 0.3, 80
    x = torch.ones(m, k, device=DEVICE)
    w = torch.zeros(2 * k, k, device=DEVICE)
    eye = torch.eye(k, device=DEVICE)
    h = MODULE.lora_gate_up(x, w, eye, eye, eye, eye, 1.0, dropout_p=p, seed=8)
    g = triton_keep_mask((m, k), p, 8, torch.device(DEVICE)) / (1 - p)
    torch.testing.assert_close(h, torch.nn.functional.silu(g) * g)
    again = MODULE.lora_gate_up(x, w, eye, eye, eye, eye, 1.0, dropout_p=p, seed=8)
    other = MODULE.lora_gate_up(x, w, eye, eye, eye, eye, 1.0, dropout_p=p, seed=9)
    assert torch.equal(h, again) and not torch.equal(h, other)


@pytest.mark.parametrize("force_torch", [True, False], ids=["torch_path", "dispatched"])
def test_autocast_bf16(force_torch, monkeypatch):
    """CPU autocast: bf16 compute, bf16 h, fp32 adapter grads, within autocast torch's error.
    "dispatched" keeps the op's own path choice: under the interpreter its backward must still
    stay off the (bf16-incapable) kernels."""
    if force_torch:
        force_torch_path(monkeypatch)
    x, w, a, b = make_inputs((4, 13), 48, 40, (8, 16), torch.float32)
    w = w.bfloat16()
    upstream = torch.randn(4, 13, 40, device=DEVICE, dtype=torch.float64)
    got = run(bf16_forward(op(2.0)), x, w, a, b, upstream)
    base = run(bf16_forward(ref(2.0)), x, w, a, b, upstream)
    want = run(ref(2.0), *as64(x, w, a, b), upstream)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in got[2:])
    assert_all_within_torch_error(NAMES, got, want, base)


def test_rejects_bad_arguments():
    x, w, a, b = make_inputs((4,), 8, 6, (2, 2), torch.float32, "cpu")
    with pytest.raises(ValueError, match="weight_gate_up"):
        MODULE.lora_gate_up(x, w[:-2], *a, *b, 1.0)
    with pytest.raises(ValueError, match="adapter shapes"):
        MODULE.lora_gate_up(x, w, a[0][:, :4], a[1], *b, 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        MODULE.lora_gate_up(x, w, *a, *b, 1.0, dropout_p=-0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("recompute", [False, True], ids=["default", "recompute"])
@pytest.mark.parametrize("r", [16, 64])
@pytest.mark.parametrize("p", [0.0, 0.05])
def test_cuda_bf16_smollm2_shapes(r, p, recompute):
    """SmolLM2 MLP shapes (M = 4096, K = 576, I = 1536) in bf16 autocast, fp32 adapters, in
    both memory modes."""
    k, inter = 576, 1536
    x, w, a, b = make_inputs((2, 2048), k, inter, (r, r), torch.float32)
    x, w = x.bfloat16(), w.bfloat16()
    keep = triton_keep_mask((4096, k), p, 9, x.device).reshape(x.shape) if p else None
    upstream = torch.randn(2, 2048, inter, device=DEVICE, dtype=torch.float64)
    fused = lambda *t: MODULE.lora_gate_up(t[0], t[1], *t[2], *t[3], 128 / r, p, 9,
                                           recompute=recompute)  # fmt: skip
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = run(fused, x, w, a, b, upstream)
        base = run(ref(128 / r, p, keep), x, w, a, b, upstream)
    want = run(ref(128 / r, p, keep), *as64(x, w, a, b), upstream)
    assert_all_within_torch_error(NAMES, got, want, base)


@triton_only
def test_triton_many_row_tiles():
    """More row tiles than GROUP_M (8) with a partial last group: every tile is computed once."""
    check_against_reference((293,), 16, 20, (2, 3), torch.float32, 0.0, None)
