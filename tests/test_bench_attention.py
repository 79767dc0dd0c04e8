"""The bucketed-padding attention measured against fastmid's per-example path computes the
same thing, so timing them compares like with like."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from bench.attention import bucketed_attention, per_example_attention


@pytest.mark.parametrize("bucket", [0, 4, 16])
def test_bucketed_attention_equals_per_example_attention(bucket):
    gen = torch.Generator().manual_seed(2)
    lengths = [5, 9, 5, 13, 2]
    t = sum(lengths)
    q = torch.randn(1, 4, t, 8, generator=gen)
    k, v = (torch.randn(1, 2, t, 8, generator=gen) for _ in range(2))
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    segments = list(itertools.pairwise(bounds))
    got = bucketed_attention(q, k, v, segments, bucket)
    want = per_example_attention(q, k, v, segments)
    torch.testing.assert_close(got, want)
    # Each example alone, as plain causal SDPA sees it.
    s, e = segments[3]
    alone = F.scaled_dot_product_attention(
        q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True, enable_gqa=True
    )
    torch.testing.assert_close(got[:, :, s:e], alone)
