"""The one tolerance rule for kernel tests.

A kernel result in some dtype is compared with an fp64 reference. Its error may be at most
`FACTOR` times the error plain torch makes on the same math in the same dtype (the baseline),
plus a small absolute slack of a few units in the last place of the largest reference value
(so two exact-but-differently-ordered results never fail on rounding noise alone).
"""

from __future__ import annotations

import torch

FACTOR = 2.0
ULPS = 4.0


def max_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute difference, computed in fp64."""
    return (actual.double() - reference.double()).abs().max().item()


def assert_within_torch_error(
    name: str, actual: torch.Tensor, reference64: torch.Tensor, baseline: torch.Tensor
) -> None:
    """Fail unless `actual` is as close to the fp64 `reference64` as the plain-torch `baseline`
    (same math, same dtype as `actual`) is, within FACTOR plus a few ulps of slack."""
    assert actual.shape == reference64.shape, f"{name}: shape {actual.shape} vs {reference64.shape}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    eps = torch.finfo(actual.dtype).eps
    atol = ULPS * eps * max(reference64.abs().max().item(), 1e-3)
    err = max_error(actual, reference64)
    err_torch = max_error(baseline, reference64)
    bound = FACTOR * err_torch + atol
    assert err <= bound, (
        f"{name}: max error {err:.3e} > {FACTOR}x torch's {err_torch:.3e} + atol {atol:.1e}"
    )
