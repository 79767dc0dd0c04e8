"""Identities of the layer-wise metrics on matrices whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch

from fastmid.study import layerstats


def _orthogonal(d: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    return q


@pytest.mark.parametrize("n,d", [(20, 8), (8, 20)])  # both the feature-space and Gram-space paths
def test_cka_identity_and_invariances(n: int, d: int) -> None:
    x = torch.randn(n, d, dtype=torch.float64)
    assert layerstats.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert layerstats.linear_cka(x, x @ _orthogonal(d)) == pytest.approx(1.0, abs=1e-10)
    assert layerstats.linear_cka(x, 7.5 * x) == pytest.approx(1.0, abs=1e-12)
    # Invariant to a constant offset too (features are centred), but not to a general linear map.
    assert layerstats.linear_cka(x, x + 3.0) == pytest.approx(1.0, abs=1e-10)
    skew = torch.diag(torch.linspace(0.01, 10.0, d, dtype=torch.float64))
    assert layerstats.linear_cka(x, x @ skew) < 0.99


def test_cka_both_paths_agree_and_independent_is_low() -> None:
    x, y = torch.randn(30, 12), torch.randn(30, 12)
    gram = layerstats.linear_cka(x, torch.cat([y, torch.zeros(30, 30)], 1))  # N <= D path
    feat = layerstats.linear_cka(x, y)  # N > D path
    assert gram == pytest.approx(feat, rel=1e-9)
    assert feat < 0.6


def test_cka_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError):
        layerstats.linear_cka(torch.randn(4, 3), torch.randn(5, 3))


def test_cosine_and_mean_shift() -> None:
    x = torch.randn(10, 6)
    assert layerstats.cosine_similarity(x, x) == pytest.approx(1.0, abs=1e-12)
    assert layerstats.cosine_similarity(x, -x) == pytest.approx(-1.0, abs=1e-12)
    assert layerstats.cosine_similarity(x, 4 * x) == pytest.approx(1.0, abs=1e-12)
    assert layerstats.mean_shift(x, x) == 0.0
    shift = torch.tensor([3.0, 4.0, 0, 0, 0, 0])
    assert layerstats.mean_shift(x, x + shift) == pytest.approx(5.0, rel=1e-6)


@pytest.mark.parametrize("n", [1, 5, 64])
def test_effective_rank_of_identity(n: int) -> None:
    eye = torch.eye(n)
    assert layerstats.effective_rank(eye, normalized=False) == pytest.approx(n, rel=1e-10)
    assert layerstats.effective_rank(eye) == pytest.approx(1.0, rel=1e-10)


def test_effective_rank_of_rank_one_and_two_equal_directions() -> None:
    u = torch.randn(12, 1)
    assert layerstats.effective_rank(u @ torch.randn(1, 9), normalized=False) == pytest.approx(
        1.0, abs=1e-6
    )
    # Two orthogonal directions of equal energy: erank 2; normalised by min(N, D) = 8.
    z = torch.zeros(8, 10)
    z[:4, 0] = 1.0
    z[4:, 1] = 1.0
    assert layerstats.effective_rank(z, normalized=False) == pytest.approx(2.0, rel=1e-10)
    assert layerstats.effective_rank(z) == pytest.approx(2.0 / 8, rel=1e-10)


@pytest.mark.parametrize("n,d", [(16, 16), (40, 8), (8, 40)])
def test_matrix_entropy_bounds(n: int, d: int) -> None:
    # All rows the same direction: one non-zero eigenvalue, entropy ~0 (only the 1e-6 ridge).
    same = torch.randn(1, d).expand(n, d) * torch.rand(n, 1).add(0.5)
    assert layerstats.matrix_entropy(same) == pytest.approx(0.0, abs=1e-3)
    random = layerstats.matrix_entropy(torch.randn(n, d))
    assert 0.5 < random <= 1.0
    if n == d:  # orthonormal rows: flat spectrum, the maximum
        assert layerstats.matrix_entropy(torch.eye(n)) == pytest.approx(1.0, abs=1e-9)


def test_relative_change() -> None:
    w = [torch.ones(3, 4), torch.zeros(2, 4)]
    tuned = [torch.ones(3, 4), torch.full((2, 4), 0.5)]
    # ||Δ||² = 8·0.25 = 2, ||W||² = 12.
    assert layerstats.relative_change(w, tuned) == pytest.approx(math.sqrt(2 / 12))
    assert layerstats.relative_change(w, w) == 0.0
