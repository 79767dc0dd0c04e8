"""The one tolerance rule for fused-kernel results (tests and `fastmid selfcheck`).

A kernel result in some dtype is compared with an fp64 reference. Its error may be at most
`FACTOR` times the error plain torch makes on the same math in the same dtype (the baseline),
plus a small absolute slack of a few units in the last place of the largest reference value
(so two exact-but-differently-ordered results never fail on rounding noise alone).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FACTOR = 2.0
ULPS = 4.0


def max_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute difference, computed in fp64."""
    return (actual.double() - reference.double()).abs().max().item()


@dataclass(frozen=True)
class Check:
    """One result against the rule: its error, plain torch's error, and the bound."""

    name: str
    error: float
    torch_error: float
    bound: float
    finite: bool

    @property
    def ok(self) -> bool:
        return self.finite and self.error <= self.bound

    def message(self) -> str:
        return (
            f"{self.name}: max error {self.error:.3e} vs bound {self.bound:.3e} "
            f"({FACTOR}x torch's {self.torch_error:.3e} + {ULPS} ulps)"
        )


def check(
    name: str, actual: torch.Tensor, reference64: torch.Tensor, baseline: torch.Tensor
) -> Check:
    """Measure `actual` against the fp64 `reference64` and the plain-torch `baseline` (same
    math, same dtype as `actual`)."""
    if actual.shape != reference64.shape:
        raise ValueError(f"{name}: shape {tuple(actual.shape)} vs {tuple(reference64.shape)}")
    eps = torch.finfo(actual.dtype).eps
    atol = ULPS * eps * max(reference64.abs().max().item(), 1e-3)
    torch_error = max_error(baseline, reference64)
    return Check(
        name=name,
        error=max_error(actual, reference64),
        torch_error=torch_error,
        bound=FACTOR * torch_error + atol,
        finite=bool(torch.isfinite(actual).all()),
    )
