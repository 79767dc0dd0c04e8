"""The three Triton kernels (the dropout-masked products of the LoRA ops) launched directly,
against fp64 references with the kernels' own keep-mask: odd shapes, ranks 1..128, fp32 and
fp16, dropout on and off, the seed offset, and the mask shared between them."""

from __future__ import annotations

import math

import pytest
import torch
from fastmid.kernels import _gemm
from fastmid.kernels._common import INTERPRET, triton_keep_mask

from ._tolerance import DEVICE, assert_within_torch_error

pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not INTERPRET, reason="Triton needs CUDA or TRITON_INTERPRET=1"
)

# (M, K, ranks of the members, dtype, dropout): sizes no multiple of any block, each rank of
# the spec, one to three members.
CASES = [
    (37, 45, (1,), torch.float32, 0.1),
    (41, 70, (8,), torch.float16, 0.0),
    (29, 33, (16,), torch.float16, 0.3),
    (23, 50, (64,), torch.float32, 0.0),
    (19, 36, (128,), torch.float32, 0.05),
    (33, 40, (16, 8, 5), torch.float32, 0.2),
    (17, 24, (64, 1), torch.float16, 0.5),
]
IDS = [f"M{m}-K{k}-r{'+'.join(map(str, r))}-{str(dt)[6:]}-p{p}" for m, k, r, dt, p in CASES]
SEED, OFFSET = 1234, 7


def _inputs(m, k, ranks, dtype):
    torch.manual_seed(0)
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    a = torch.randn(sum(ranks), k, device=DEVICE, dtype=dtype) / math.sqrt(k)
    g = torch.randn(m, sum(ranks), device=DEVICE, dtype=dtype)
    return x, a, g


def _keep(m, k, p, offset=OFFSET):
    return triton_keep_mask((m, k), p, SEED, torch.device(DEVICE), offset)


def _seed():
    return torch.tensor(SEED, device=DEVICE)


@pytest.mark.parametrize(("m", "k", "ranks", "dtype", "p"), CASES, ids=IDS)
def test_thin_masked_product(m, k, ranks, dtype, p):
    """xa = (m ⊙ x)·Aᵀ with each member's columns times its scale."""
    x, a, _ = _inputs(m, k, ranks, dtype)
    scales = [2.0, 0.5, 1.5][: len(ranks)]
    col_scale = torch.cat([torch.full((r,), s) for r, s in zip(ranks, scales, strict=True)])
    keep = _keep(m, k, p)

    def ref(x_, a_):
        return (x_ * keep.to(x_.dtype)) @ a_.t() * col_scale.to(x_.device, x_.dtype)

    got = _gemm.launch_thin(x, a, scales, ranks, p, _seed(), OFFSET)
    assert got.dtype == dtype
    assert_within_torch_error("xa", got, ref(x.double(), a.double()), ref(x, a))


@pytest.mark.parametrize(("m", "k", "ranks", "dtype", "p"), CASES, ids=IDS)
def test_tn_masked_product(m, k, ranks, dtype, p):
    """dA = gᵀ·(m ⊙ x), in fp32."""
    x, _, g = _inputs(m, k, ranks, dtype)
    keep = _keep(m, k, p)

    def ref(g_, x_):
        return g_.t() @ (x_ * keep.to(x_.dtype))

    got = _gemm.launch_tn(g, x, p, _seed(), OFFSET)
    assert got.dtype == torch.float32
    assert_within_torch_error("dA", got, ref(g.double(), x.double()), ref(g, x))


@pytest.mark.parametrize(("m", "k", "ranks", "dtype", "p"), CASES, ids=IDS)
def test_masked_add_into_dx(m, k, ranks, dtype, p):
    """dx += m ⊙ (g·A) in place: the same buffer comes back."""
    x, a, g = _inputs(m, k, ranks, dtype)
    keep = _keep(m, k, p)

    def ref(dx_, g_, a_):
        return dx_ + keep.to(dx_.dtype) * (g_ @ a_)

    want = ref(x.double(), g.double(), a.double())
    base = ref(x, g, a)
    dx = x.clone()
    out = _gemm.launch_masked_add(dx, g, a, p, _seed(), OFFSET)
    assert out.data_ptr() == dx.data_ptr()
    assert_within_torch_error("dx", dx, want, base)


def test_one_mask_across_the_three_kernels():
    """With all-ones operands each kernel's output exposes its mask: the thin product's row
    sums, dA's column sums and the dx update are the same keep-mask (the forward's, redrawn by
    the backward kernels), the same seed and offset give it again and another offset another."""
    m, k, p = 40, 48, 0.3
    ones_x = torch.ones(m, k, device=DEVICE)
    seed = _seed()
    keep = _keep(m, k, p)
    # xa with one rank column and A = e_j picks column j of the mask.
    for j in (0, 17, k - 1):
        a = torch.zeros(1, k, device=DEVICE)
        a[0, j] = 1.0
        xa = _gemm.launch_thin(ones_x, a, [1.0], [1], p, seed, OFFSET)
        assert torch.equal(xa[:, 0], keep[:, j])
    # dA with g = e_i (one rank row) is mask row i.
    for i in (0, 23, m - 1):
        g = torch.zeros(m, 1, device=DEVICE)
        g[i, 0] = 1.0
        assert torch.equal(_gemm.launch_tn(g, ones_x, p, seed, OFFSET)[0], keep[i])
    # dx update with g = 1, A = 1 (rank 1) adds exactly the mask.
    dx = torch.zeros(m, k, device=DEVICE)
    ones = torch.ones(m, 1, device=DEVICE), torch.ones(1, k, device=DEVICE)
    _gemm.launch_masked_add(dx, *ones, p, seed, OFFSET)
    assert torch.equal(dx, keep)
    again = _gemm.launch_masked_add(torch.zeros(m, k, device=DEVICE), *ones, p, seed, OFFSET)
    assert torch.equal(again, keep)
    other = _gemm.launch_masked_add(torch.zeros(m, k, device=DEVICE), *ones, p, seed, OFFSET + 1)
    assert 0.2 < (other != keep).float().mean().item() < 0.6  # independent masks: 2pq = 0.42
    assert torch.equal(other, _keep(m, k, p, OFFSET + 1))


# --- CUDA only: bf16 (the interpreter cannot run bf16 tl.dot) at training shapes, through the
# autotuned shipped configs ---


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("m", "k", "ranks", "p"),
    [(4096, 576, (106,), 0.05), (4096, 576, (64, 64, 64), 0.05), (2047, 2048, (128,), 0.1)],
)
def test_cuda_bf16_kernels(m, k, ranks, p):
    test_thin_masked_product(m, k, ranks, torch.bfloat16, p)
    test_tn_masked_product(m, k, ranks, torch.bfloat16, p)
    test_masked_add_into_dx(m, k, ranks, torch.bfloat16, p)
