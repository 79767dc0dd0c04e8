"""Layer-wise comparison metrics: pure functions on tensors.

Notation: ``x`` and ``y`` are ``(N, D)`` matrices of pooled hidden states of the *same* N inputs,
from the base and the tuned model; ``z`` is one model's ``(N, D)`` matrix. Everything is computed
in float64 so that identities such as CKA(X, X) = 1 hold to ~1e-12 whatever the input dtype.

- linear CKA: ``<K_c, L_c>_F / (||K_c||_F ||L_c||_F)`` with ``K = XXᵀ``, ``L = YYᵀ`` double-centred;
  invariant to orthogonal transforms and isotropic scaling of either side.
- cosine similarity: ``mean_i cos(x_i, y_i)``.
- mean shift: ``||mean(Y) - mean(X)||_2``.
- effective rank: ``exp(H(p))`` with ``p_i = σ_i² / Σσ²`` of the uncentred ``z``, optionally divided
  by ``min(N, D)`` (so it lies in (0, 1]).
- matrix entropy (α = 1, "dataset entropy"): rows L2-normalised; eigenvalues of ``ZZᵀ/D + 1e-6·I``
  when ``N <= D``, else ``σ²(Z)``; Shannon entropy of the normalised spectrum divided by
  ``log(min(N, D))`` (so it lies in [0, 1]).
- weight change: ``||W_tuned - W_base||_F / ||W_base||_F``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "cosine_similarity",
    "effective_rank",
    "linear_cka",
    "matrix_entropy",
    "mean_shift",
    "relative_change",
    "spectral_entropy",
]


def _as_pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        shapes = f"{tuple(x.shape)} and {tuple(y.shape)}"
        raise ValueError(f"expected (N, D) matrices with equal N, got {shapes}")
    return x.double(), y.double()


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA between two representations of the same N inputs (1 = same geometry)."""
    x, y = _as_pair(x, y)
    # Column-centring the features is the same as double-centring the Gram matrices. Work in
    # whichever space is smaller: N x N Grams when N is small, D x D cross-covariances otherwise.
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    if x.shape[0] <= max(x.shape[1], y.shape[1]):
        k, l_ = x @ x.T, y @ y.T
        num = (k * l_).sum()
        den = k.norm() * l_.norm()
    else:
        num = (y.T @ x).square().sum()
        den = (x.T @ x).norm() * (y.T @ y).norm()
    if den == 0:
        return float("nan")
    return float(num / den)


def cosine_similarity(x: Tensor, y: Tensor) -> float:
    """Mean over inputs of the cosine between the base and tuned state of that input."""
    x, y = _as_pair(x, y)
    return float(torch.nn.functional.cosine_similarity(x, y, dim=1, eps=1e-12).mean())


def mean_shift(x: Tensor, y: Tensor) -> float:
    """L2 distance between the dataset means of the two representations."""
    x, y = _as_pair(x, y)
    return float((y.mean(0) - x.mean(0)).norm())


def spectral_entropy(weights: Tensor) -> float:
    """Shannon entropy (nats) of a non-negative spectrum normalised to sum to one."""
    p = weights.double().clamp_min(0)
    total = p.sum()
    if total <= 0:
        return 0.0
    p = p / total
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def effective_rank(z: Tensor, normalized: bool = True) -> float:
    """Effective rank ``exp(H(σ²/Σσ²))`` of the uncentred ``(N, D)`` matrix; over ``min(N, D)``
    when ``normalized``."""
    if z.dim() != 2:
        raise ValueError(f"expected an (N, D) matrix, got {tuple(z.shape)}")
    sigma = torch.linalg.svdvals(z.double())
    erank = math.exp(spectral_entropy(sigma.square()))
    return erank / min(z.shape) if normalized else erank


def matrix_entropy(z: Tensor) -> float:
    """Normalised matrix entropy (α = 1) of the row-normalised ``(N, D)`` states, in [0, 1]."""
    if z.dim() != 2:
        raise ValueError(f"expected an (N, D) matrix, got {tuple(z.shape)}")
    n, d = z.shape
    if min(n, d) < 2:
        return 0.0
    zn = torch.nn.functional.normalize(z.double(), dim=1, eps=1e-12)
    if n > d:
        lam = torch.linalg.svdvals(zn).square()
    else:
        gram = zn @ zn.T / d + 1e-6 * torch.eye(n, dtype=zn.dtype, device=zn.device)
        lam = torch.linalg.eigvalsh(gram)
    return spectral_entropy(lam) / math.log(min(n, d))


def relative_change(base: list[Tensor], tuned: list[Tensor]) -> float:
    """``||W_tuned - W_base||_F / ||W_base||_F`` over a group of matrices taken together (e.g. the
    q/k/v/o projections of one layer: the norms are of the stacked group)."""
    if len(base) != len(tuned) or not base:
        raise ValueError("need the same, non-zero number of base and tuned matrices")
    pairs = zip(base, tuned, strict=True)
    num = sum(float((t.double() - b.double()).square().sum()) for b, t in pairs)
    den = sum(float(b.double().square().sum()) for b in base)
    return math.sqrt(num / den) if den > 0 else float("nan")
