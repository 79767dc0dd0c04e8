"""What the kernel tests share: the tolerance rule as assertions (the rule itself is
`fastmid.kernels.tolerance`), the device, the dropout masks of both execution paths, forcing
the torch path, bf16 autocast and the tensors an op saved."""

from __future__ import annotations

import importlib

import pytest
import torch
from fastmid.kernels._common import torch_keep_mask, triton_keep_mask
from fastmid.kernels.tolerance import check

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def assert_within_torch_error(
    name: str, actual: torch.Tensor, reference64: torch.Tensor, baseline: torch.Tensor
) -> None:
    """Fail unless `actual` is as close to the fp64 `reference64` as the plain-torch `baseline`
    (same math, same dtype as `actual`) is, within the rule's factor plus a few ulps."""
    result = check(name, actual, reference64, baseline)
    assert result.finite, f"{name}: non-finite values"
    assert result.ok, result.message()


def assert_all_within_torch_error(
    names, actual, reference64, baseline, dtype: torch.dtype | None = None
) -> None:
    """`assert_within_torch_error` for each named result; with `dtype`, each result must also
    come back in that dtype."""
    for name, a, r, b in zip(names, actual, reference64, baseline, strict=True):
        if dtype is not None:
            assert a.dtype == dtype, f"{name} dtype {a.dtype}"
        assert_within_torch_error(name, a, r, b)


def triton_keep(shape, p: float, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The Triton kernels' dropout keep-mask for (shape, p, seed), as a `dtype` tensor."""
    return triton_keep_mask(shape, p, seed, torch.device(DEVICE)).to(dtype)


def torch_keep(shape, p: float, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The torch path's dropout keep-mask for (shape, p, seed), as a `dtype` tensor."""
    return torch_keep_mask(shape, p, seed, torch.device(DEVICE)).to(dtype)


def force_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every op take the torch path, even where Triton would run (CUDA, interpreter)."""
    module = importlib.import_module("fastmid.kernels._lora")
    monkeypatch.setattr(module, "use_triton", lambda t, dt=None: False)


def bf16_forward(fn):
    """`fn` with its forward under bf16 autocast on DEVICE; backward then runs outside
    autocast, as in a training step, so the op itself must remember that it computed in bf16."""

    def wrapped(*args):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            return fn(*args)

    return wrapped


def saved_by_op(out: torch.Tensor, inputs) -> list[torch.Tensor]:
    """The tensors the fused op behind `out` saved for backward, other than (views of) the
    `inputs`: walks back from `out` through view nodes to the first node that saved tensors."""
    node = out.grad_fn
    while not getattr(node, "saved_tensors", None):
        node = node.next_functions[0][0]
    storages = {t.untyped_storage().data_ptr() for t in inputs}
    return [
        t
        for t in node.saved_tensors
        if t is not None and t.untyped_storage().data_ptr() not in storages
    ]


def spy_dx_gemms(monkeypatch: pytest.MonkeyPatch, path: str, torch_mm: tuple) -> list[int]:
    """Count the backward's dx GEMMs (a list that grows by one per GEMM), spied on so that
    skipping one is observed, not inferred: on every path dx = dy·W is a ``torch.mm`` of the
    operand shapes ``torch_mm`` (cuBLAS on CUDA). ``path="torch"`` also forces the torch path
    for the dropout-masked products."""
    calls: list[int] = []
    if path == "torch":
        force_torch_path(monkeypatch)
    real_mm = torch.mm

    def mm(lhs, rhs, *args, **kw):
        calls.extend([1] if (lhs.shape, rhs.shape) == torch_mm else [])
        return real_mm(lhs, rhs, *args, **kw)

    monkeypatch.setattr(torch, "mm", mm)
    return calls
