"""nf4_matmul: the dequantizing GEMM (interpreter on CPU, real on CUDA) and the torch path
against dequantize-then-matmul in fp64; what the autograd Function saves."""

from __future__ import annotations

import importlib

import pytest
import torch
from fastmid.kernels._common import INTERPRET
from fastmid.kernels.nf4_matmul import (
    NF4Weight,
    nf4_dequantize,
    nf4_linear,
    nf4_linear_reference,
    nf4_matmul,
)

from ._tolerance import DEVICE, assert_within_torch_error

triton_only = pytest.mark.skipif(
    DEVICE == "cpu" and not INTERPRET, reason="Triton needs CUDA or TRITON_INTERPRET=1"
)
MODULE = importlib.import_module("fastmid.kernels.nf4_matmul")
# QLoRA's NF4 codebook (the 16 quantiles of a unit normal, scaled to [-1, 1]).
CODEBOOK = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
            0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]  # fmt: skip


def random_nf4(n: int, k: int, dtype: torch.dtype, qb: int = 64, sb: int = 4) -> NF4Weight:
    """A random weight in the format: every code, scaler and factor drawn at random, so the
    kernel is checked on the format itself, not on one quantizer's output."""
    numel = n * k
    data = torch.randint(0, 256, (numel // 2,), dtype=torch.uint8, device=DEVICE)
    scalers = torch.randint(-128, 128, (numel // qb,), dtype=torch.int8, device=DEVICE)
    factors = (torch.rand(numel // qb // sb, device=DEVICE) * 200 + 100).to(dtype)
    mean = torch.tensor(0.05, device=DEVICE, dtype=dtype)
    codebook = torch.tensor(CODEBOOK, device=DEVICE, dtype=dtype)
    return NF4Weight(data, scalers, factors, mean, codebook, (n, k), qb, sb)


def dequantize_elementwise(w: NF4Weight) -> torch.Tensor:
    """The format's formula element by element, in fp64 (the slow obvious way)."""
    n, k = w.shape
    i = torch.arange(n * k, device=w.data.device)
    byte = w.data.long()[i // 2]
    code = torch.where(i % 2 == 0, byte >> 4, byte & 15)
    scaler = w.scalers.double()[i // w.block_size]
    factor = w.factors.double()[i // (w.block_size * w.scaler_block_size)]
    return (w.codebook.double()[code] * (scaler / factor + w.mean.double())).view(n, k)


def test_dequantize_is_the_format_formula():
    w = random_nf4(48, 128, torch.float32)
    assert_within_torch_error(
        "dequant", nf4_dequantize(w, torch.float32), dequantize_elementwise(w),
        dequantize_elementwise(w).float(),
    )  # fmt: skip


@triton_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("m", "n", "k"), [(37, 72, 128), (5, 24, 192), (64, 130, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_matches_dequantize_then_matmul(dtype, m, n, k, bias):
    w = random_nf4(n, k, dtype, sb=2)
    w64 = dequantize_elementwise(w)
    wd = nf4_dequantize(w, dtype)
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    b = torch.randn(n, device=DEVICE, dtype=dtype) if bias else None
    ref = x.double() @ w64.t() + (b.double() if bias else 0)
    baseline = x @ wd.t() + (b if bias else 0)
    y = nf4_matmul(x, w, transpose=True, bias=b)
    assert y.dtype == dtype
    assert_within_torch_error("y", y, ref, baseline)
    dy = torch.randn(m, n, device=DEVICE, dtype=dtype)
    dx = nf4_matmul(dy, w, transpose=False)
    assert_within_torch_error("dx", dx, dy.double() @ w64, dy @ wd)


@pytest.mark.parametrize("path", ["triton", "torch"])
def test_linear_grad_and_output(path, monkeypatch: pytest.MonkeyPatch):
    if path == "triton" and DEVICE == "cpu" and not INTERPRET:
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    if path == "torch":
        monkeypatch.setattr(MODULE, "use_triton", lambda t: False)
    w = random_nf4(72, 128, torch.float32)
    w64 = dequantize_elementwise(w)
    x = torch.randn(2, 9, 128, device=DEVICE, requires_grad=True)
    b = torch.randn(72, device=DEVICE)
    y = nf4_linear(x, w, b)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref_x = x.detach().double().requires_grad_()
    ref = ref_x @ w64.t() + b.double()
    ref.backward(dy.double())
    base_x = x.detach().clone().requires_grad_()
    base = nf4_linear_reference(base_x, w, b)
    base.backward(dy)
    assert_within_torch_error("y", y, ref, base)
    assert_within_torch_error("dx", x.grad, ref_x.grad, base_x.grad)


def test_backward_keeps_only_the_quantized_weight():
    n, k = 256, 512
    w = random_nf4(n, k, torch.float32)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    x = torch.randn(16, k, device=DEVICE, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = nf4_linear(x, w)
    saved_bytes = sum(t.numel() * t.element_size() for t in saved)
    quantized = sum(t.numel() * t.element_size() for t in w[:5])
    assert saved_bytes == quantized  # codes, scales, codebook: nothing of x, no dequantized W
    assert saved_bytes < n * k  # under 1 byte per weight; a fp32 copy would be 4
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.gpu
def test_bf16_on_cuda():
    w = random_nf4(4096 // 4, 1024, torch.bfloat16)
    x = torch.randn(300, 1024, device=DEVICE, dtype=torch.bfloat16)
    w64 = dequantize_elementwise(w)
    wd = nf4_dequantize(w, torch.bfloat16)
    assert_within_torch_error("y", nf4_matmul(x, w, True), x.double() @ w64.t(), x @ wd.t())
    dy = torch.randn(300, w.shape[0], device=DEVICE, dtype=torch.bfloat16)
    assert_within_torch_error("dx", nf4_matmul(dy, w, False), dy.double() @ w64, dy @ wd)
