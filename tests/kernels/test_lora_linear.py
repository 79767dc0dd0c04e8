"""lora_linear: Triton kernels (interpreter on CPU, real on CUDA) and the torch path against
the fp64 reference, dropout masks, grad plumbing and autocast."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from fastmid.kernels import lora_linear, lora_linear_reference
from fastmid.kernels._common import INTERPRET, torch_keep_mask

from ._tolerance import (
    DEVICE,
    assert_all_within_torch_error,
    assert_within_torch_error,
    force_torch_path,
    spy_dx_gemms,
    torch_keep,
    triton_keep,
)

triton_only = pytest.mark.skipif(
    DEVICE == "cpu" and not INTERPRET, reason="Triton needs CUDA or TRITON_INTERPRET=1"
)
# The package re-exports the function under the module's name, so fetch the module itself.
MODULE = importlib.import_module("fastmid.kernels.lora_linear")


@pytest.fixture
def torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the torch execution path even where Triton would run."""
    force_torch_path(monkeypatch)


def make_inputs(lead, k, n, r, dtype, bias, device=DEVICE):
    """x (*lead, K), w (N, K), a (r, K), b (N, r), bias (N) with unit-scale outputs."""
    x = torch.randn(*lead, k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype) / math.sqrt(k)
    a = torch.randn(r, k, device=device, dtype=dtype) / math.sqrt(k)
    b = torch.randn(n, r, device=device, dtype=dtype) / math.sqrt(r)
    bias_t = torch.randn(n, device=device, dtype=dtype) if bias else None
    return x, w, a, b, bias_t


def grads_of(fn, x, w, a, b, bias, upstream):
    """Output and (dx, dA, dB) of `fn(x, w, a, b, bias)` for the upstream gradient."""
    x, a, b = (t.detach().clone().requires_grad_() for t in (x, a, b))
    y = fn(x, w, a, b, bias)
    y.backward(upstream.to(y.dtype))
    return y.detach(), x.grad, a.grad, b.grad


def check_against_reference(lead, k, n, r, dtype, bias, p, keep_fn, scale=2.0, seed=1234):
    """Run lora_linear and compare y, dx, dA, dB with the fp64 reference (same mask), under
    the tolerance of plain torch in `dtype`."""
    x, w, a, b, bias_t = make_inputs(lead, k, n, r, dtype, bias)
    m = x.numel() // k
    keep = keep_fn((m, k), p, seed, x.dtype).reshape(x.shape) if p > 0 else None
    upstream = torch.randn(*lead, n, device=x.device, dtype=torch.float64)

    def ref(x_, w_, a_, b_, bias_):
        keep_ = None if keep is None else keep.to(x_.dtype)
        return lora_linear_reference(x_, w_, a_, b_, scale, bias_, p, keep=keep_)

    as64 = lambda t: None if t is None else t.double()
    got = grads_of(
        lambda *t: lora_linear(*t[:4], scale, t[4], p, seed), x, w, a, b, bias_t, upstream
    )
    want = grads_of(ref, *(as64(t) for t in (x, w, a, b, bias_t)), upstream)
    base = grads_of(ref, x, w, a, b, bias_t, upstream)
    assert_all_within_torch_error(("y", "dx", "dA", "dB"), got, want, base, dtype)


# (leading dims, K, N, rank, dtype, bias, dropout): odd sizes that are no multiple of any
# block, every rank of the spec, each feature toggled in some row rather than a full product.
CASES = [
    ((37,), 45, 53, 1, torch.float32, True, 0.0),
    ((2, 19), 70, 33, 8, torch.float16, False, 0.0),
    ((41,), 64, 96, 16, torch.float16, True, 0.1),
    ((3, 11), 50, 40, 64, torch.float32, False, 0.2),
    ((29,), 48, 72, 128, torch.float32, True, 0.0),
    ((33,), 40, 36, 128, torch.float16, False, 0.3),
    ((2, 3, 7), 33, 17, 8, torch.float32, True, 0.5),
    # Ranks over 128: the thin GEMM walks the rank in several blocks.
    ((19,), 40, 30, 160, torch.float32, True, 0.1),
    ((23,), 36, 44, 200, torch.float16, False, 0.0),
]


@triton_only
@pytest.mark.parametrize(("lead", "k", "n", "r", "dtype", "bias", "p"), CASES)
def test_triton_matches_reference(lead, k, n, r, dtype, bias, p):
    check_against_reference(lead, k, n, r, dtype, bias, p, triton_keep)


@pytest.mark.parametrize(("lead", "k", "n", "r", "dtype", "bias", "p"), CASES)
def test_torch_path_matches_reference(torch_path, lead, k, n, r, dtype, bias, p):
    check_against_reference(lead, k, n, r, dtype, bias, p, torch_keep)


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_torch_path_gradcheck_fp64(torch_path, p):
    x, w, a, b, bias = make_inputs((2, 5), 12, 9, 3, torch.float64, True, device="cpu")
    x, a, b = (t.requires_grad_() for t in (x, a, b))
    fn = lambda x_, a_, b_: lora_linear(x_, w, a_, b_, 1.5, bias, p, 99)
    assert torch.autograd.gradcheck(fn, (x, a, b))


def test_reference_gradcheck_fp64():
    x, w, a, b, bias = make_inputs((7,), 10, 6, 4, torch.float64, True, device="cpu")
    x, a, b = (t.requires_grad_() for t in (x, a, b))
    fn = lambda x_, a_, b_: lora_linear_reference(x_, w, a_, b_, 0.5, bias, 0.2, seed=5)
    assert torch.autograd.gradcheck(fn, (x, a, b))


@pytest.mark.parametrize("keep_fn", [triton_keep, torch_keep], ids=["triton", "torch"])
def test_keep_mask_rate_and_determinism(keep_fn):
    if keep_fn is triton_keep and DEVICE == "cpu" and not INTERPRET:
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    p, shape = 0.3, (128, 400)
    mask = keep_fn(shape, p, 7, torch.float32)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    n = mask.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(mask.mean().item() - (1 - p)) < 5 * sigma
    # Rows and columns are not all the same: the mask is not a broadcast of a short stream.
    assert mask.mean(0).std() > 0 and mask.mean(1).std() > 0
    assert torch.equal(mask, keep_fn(shape, p, 7, torch.float32))
    assert (mask != keep_fn(shape, p, 8, torch.float32)).float().mean() > 0.2


@pytest.mark.parametrize("x_grad", [True, False], ids=["x_grad", "x_frozen"])
@pytest.mark.parametrize("path", ["triton", "torch"])
def test_dx_gemm_runs_only_when_x_needs_grad(monkeypatch, path, x_grad):
    """The dx GEMM (M,N)·(N,K) runs in backward exactly when x needs a grad (spied on, so
    skipping is observed, not inferred); weight and bias never get a grad."""
    if path == "triton" and DEVICE == "cpu" and not INTERPRET:
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    m, k, n = 20, 24, 40
    dx_gemms = spy_dx_gemms(monkeypatch, path, ((m, n), (n, k)))
    x, w, a, b, bias = make_inputs((m,), k, n, 8, torch.float32, True)
    for t in (x, w, a, b):
        t.requires_grad_(t is not x or x_grad)
    y = lora_linear(x, w, a, b, 2.0, bias)
    assert not dx_gemms  # the forward has no GEMM of dx's shape
    y.square().sum().backward()
    monkeypatch.undo()
    assert len(dx_gemms) == (1 if x_grad else 0)
    assert (x.grad is not None) == x_grad
    assert w.grad is None and a.grad is not None and b.grad is not None
    ref = lora_linear_reference(x.detach(), w.detach(), a.detach(), b.detach(), 2.0, bias)
    assert torch.allclose(y.detach(), ref, atol=1e-5)


def test_seed_none_reproducible_under_manual_seed():
    x, w, a, b, _ = make_inputs((16,), 24, 20, 4, torch.float32, False)
    torch.manual_seed(3)
    y1 = lora_linear(x, w, a, b, 1.0, dropout_p=0.5)
    torch.manual_seed(3)
    y2 = lora_linear(x, w, a, b, 1.0, dropout_p=0.5)
    y3 = lora_linear(x, w, a, b, 1.0, dropout_p=0.5)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)


def test_dropout_one_rejected():
    x, w, a, b, _ = make_inputs((4,), 8, 8, 2, torch.float32, False)
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear(x, w, a, b, 1.0, dropout_p=1.0)


def _autocast_case(dtype, device):
    """fp32 frozen weight and fp32 adapters run under autocast(dtype): output in `dtype`,
    grads in each input's own dtype, values as accurate as plain torch under autocast."""
    x, w, a, b, bias = make_inputs((3, 13), 40, 24, 8, torch.float32, True, device=device)
    upstream = torch.randn(3, 13, 24, device=device, dtype=torch.float64)

    def under_autocast(fn):
        def run(*t):
            with torch.autocast(device, dtype=dtype):
                return fn(*t)

        return run

    got = grads_of(
        under_autocast(lambda *t: lora_linear(*t[:4], 2.0, t[4])), x, w, a, b, bias, upstream
    )
    assert got[0].dtype == dtype
    assert got[1].dtype == got[2].dtype == got[3].dtype == torch.float32
    ref = lambda *t: lora_linear_reference(*t[:4], 2.0, t[4])
    as64 = lambda t: t.double()
    want = grads_of(ref, *(as64(t) for t in (x, w, a, b, bias)), upstream)
    base = grads_of(under_autocast(ref), x, w, a, b, bias, upstream)
    for name, g, w64, b_ in zip(("y", "dx", "dA", "dB"), got, want, base, strict=True):
        # Compare in the autocast dtype's precision: the fp32 grads carry its rounding.
        assert_within_torch_error(name, g.to(dtype), w64, b_.to(dtype))


def test_torch_path_autocast_bf16(torch_path):
    _autocast_case(torch.bfloat16, "cpu")


@triton_only
def test_triton_autocast_fp16():
    _autocast_case(torch.float16, DEVICE)


def test_bf16_autocast_is_correct_on_every_path():
    # No path override: on CUDA this is the Triton kernel, without CUDA the dispatch must
    # avoid the interpreter's bf16 dot (wrong results, no error) and take the torch path.
    _autocast_case(torch.bfloat16, DEVICE)


# --- CUDA only: bf16 (the interpreter cannot run bf16 tl.dot) and training-sized shapes ---


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("m", "k", "n", "r", "p"),
    [(4096, 576, 576, 106, 0.05), (4096, 576, 192, 16, 0.0), (2047, 2048, 5632, 64, 0.1)],
)
def test_cuda_bf16_large(m, k, n, r, p):
    check_against_reference((m,), k, n, r, torch.bfloat16, True, p, triton_keep)


@pytest.mark.gpu
def test_cuda_fp32_adapters_bf16_autocast():
    _autocast_case(torch.bfloat16, "cuda")


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_torch_keep_mask_is_uniform_and_seeded(p):
    """The torch path's counter-based mask behaves like independent Bernoulli draws: keep rate,
    the two elements sharing one 32-bit hash word, row and column rates, neighbouring rows,
    other seeds; and the same seed (int or tensor) gives the same mask."""
    rows, cols = 512, 576
    mask = torch_keep_mask((rows, cols), p, 123).double()
    q = 1 - p
    n = mask.numel()
    assert abs(mask.mean().item() - q) < 5 * math.sqrt(p * q / n)
    both = (mask[:, 0::2] * mask[:, 1::2]).mean().item()  # one hash word per pair
    assert abs(both - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / (n / 2))
    agree = q * q + p * p  # two independent masks agree on this fraction
    next_row = (mask[1:] == mask[:-1]).double().mean().item()
    assert abs(next_row - agree) < 5 * math.sqrt(agree * (1 - agree) / n)
    for spread, length in ((mask.mean(1).std().item(), cols), (mask.mean(0).std().item(), rows)):
        assert 0.8 < spread / math.sqrt(p * q / length) < 1.2
    other = torch_keep_mask((rows, cols), p, 124).double()
    assert abs((mask == other).double().mean().item() - agree) < 5 * math.sqrt(agree / n)
    assert torch.equal(mask, torch_keep_mask((rows, cols), p, torch.tensor(123)).double())
    assert torch_keep_mask((rows, cols), p, 123).dtype == torch.bool


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_eager_calls_skip_the_dispatcher_and_match_the_registered_op(p: float):
    # Plain eager calls run the op's function in an autograd.Function; the registered op (what
    # torch.compile traces) must give the same output and grads.
    torch.manual_seed(0)
    x, w, a, b, _ = make_inputs((2, 9), 24, 20, 4, torch.float32, bias=False)
    seed = torch.tensor(7)
    leaves = [t.clone().requires_grad_() for t in (x, a, b)]
    with torch.profiler.profile() as prof:
        y = lora_linear(leaves[0], w, leaves[1], leaves[2], 1.5, None, p, seed)
        y.square().sum().backward()
    assert not [e.name for e in prof.events() if e.name.startswith("fastmid::")]
    assert y.grad_fn is not None and all(t.grad is not None for t in leaves)

    op_leaves = [t.clone().requires_grad_() for t in (x, a, b)]
    scale = 1.5 / (1.0 - p)
    y_op, _, _ = torch.ops.fastmid.lora_linear(
        op_leaves[0].reshape(-1, 24), w, None, [op_leaves[1]], [op_leaves[2]], [scale], p,
        seed if p else None, 0, torch.float32, False, False,
    )  # fmt: skip
    y_op.square().sum().backward()
    torch.testing.assert_close(y_op.view_as(y), y, rtol=0, atol=0)
    for got, want in zip(op_leaves, leaves, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-6, atol=1e-6)


def test_kernel_path_switch_read_from_the_environment():
    import os
    import subprocess
    import sys

    code = "import torch; from fastmid.kernels import use_triton; print(use_triton(torch.ones(2)))"

    def run(path: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "TRITON_INTERPRET": "1", "FASTMID_KERNEL_PATH": path}
        return subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
        )

    assert run("triton").stdout.strip() == "True"  # the interpreter runs fp32 CPU tensors
    assert run("torch").stdout.strip() == "False"
    bad = run("cuda")
    assert bad.returncode != 0 and "FASTMID_KERNEL_PATH must be one of" in bad.stderr
