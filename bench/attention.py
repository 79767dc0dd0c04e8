"""Attention for packed rows: fastmid's per-example SDPA against batching padded buckets.

fastmid's varlen path (``fastmid.engine.attention``) runs causal SDPA once per example, batching
only examples of equal length. The alternative measured here right-pads every example to a bucket
length (a multiple of ``bucket``, or the longest example with ``bucket=0``) and runs one causal
SDPA per bucket: fewer, larger calls, paid for with attention over pad positions. Causal masking
keeps the real rows exact (a real query never sees the pads after it).

``python -m bench.attention`` times forward + backward of each variant on the packing bins of
the bundled data with SmolLM2-135M's attention shape, interleaved, and prints the table.
"""

from __future__ import annotations

import argparse
import itertools
import time
from typing import Any

import torch
import torch.nn.functional as F

from fastmid.engine.attention import varlen_attention_forward

# SmolLM2-135M: 9 query heads, 3 key/value heads, head dim 64.
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def bucketed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    segments: list[tuple[int, int]],
    bucket: int,
) -> torch.Tensor:
    """Causal attention of each ``(start, end)`` segment of a (1, H, T, D) packed row, examples
    right-padded to a multiple of ``bucket`` (0: to the longest) and batched per padded length.
    Returns (1, H, T, D)."""
    longest = max(end - start for start, end in segments)
    groups: dict[int, list[tuple[int, int]]] = {}
    for start, end in segments:
        length = -(-(end - start) // bucket) * bucket if bucket else longest
        groups.setdefault(length, []).append((start, end))
    gqa = query.shape[1] != key.shape[1]
    out = query.new_empty(query.shape)
    for length, members in groups.items():

        def stack(x: torch.Tensor, members=members, length=length) -> torch.Tensor:
            buf = x.new_zeros(len(members), x.shape[1], length, x.shape[3])
            for i, (start, end) in enumerate(members):
                buf[i, :, : end - start] = x[0, :, start:end]
            return buf

        o = F.scaled_dot_product_attention(
            stack(query), stack(key), stack(value), is_causal=True, enable_gqa=gqa
        )
        for i, (start, end) in enumerate(members):
            out[0, :, start:end] = o[i, :, : end - start]
    return out


def per_example_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segments: list[tuple[int, int]]
) -> torch.Tensor:
    """fastmid's own varlen path on the same inputs, as (1, H, T, D)."""
    t = query.shape[2]
    bounds = torch.zeros(t, dtype=torch.long)
    for start, end in segments:
        bounds[start:end] = torch.arange(end - start)
    out, _ = varlen_attention_forward(None, query, key, value, None, position_ids=bounds[None])
    return out.transpose(1, 2)


VARIANTS = {
    "per_example": lambda q, k, v, s: per_example_attention(q, k, v, s),
    "bucket32": lambda q, k, v, s: bucketed_attention(q, k, v, s, 32),
    "bucket64": lambda q, k, v, s: bucketed_attention(q, k, v, s, 64),
    "pad_to_longest": lambda q, k, v, s: bucketed_attention(q, k, v, s, 0),
}


def time_variants(
    lengths: list[list[int]], dtype: torch.dtype, rounds: int = 3
) -> dict[str, list[float]]:
    """Seconds of forward + backward per packed row for every variant, interleaved."""
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(rounds):
        for i, lens in enumerate(lengths):
            bounds = [0]
            for n in lens:
                bounds.append(bounds[-1] + n)
            segments = list(itertools.pairwise(bounds))
            gen = torch.Generator().manual_seed(i)
            shapes = ((1, HEADS, bounds[-1], HEAD_DIM), (1, KV_HEADS, bounds[-1], HEAD_DIM))
            q0 = torch.randn(shapes[0], generator=gen).to(dtype)
            k0, v0 = (torch.randn(shapes[1], generator=gen).to(dtype) for _ in range(2))
            names = list(VARIANTS)
            for name in names[r % len(names) :] + names[: r % len(names)]:
                q, k, v = (x.clone().requires_grad_(True) for x in (q0, k0, v0))
                t0 = time.perf_counter()
                VARIANTS[name](q, k, v, segments).sum().backward()
                times[name].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    """Time the variants on the bundled data's packing bins and print a table."""
    from transformers import AutoTokenizer

    from bench.providers import make_workload
    from fastmid.engine.models import default_model_dir

    parser = argparse.ArgumentParser(prog="python -m bench.attention")
    parser.add_argument("--steps", type=int, default=4, help="packing bins (rows) timed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir()))
    workload = make_workload(tokenizer, num_steps=args.steps, batch_tokens=1024)
    lengths = [[len(e) for e in workload.step_examples(i)] for i in range(args.steps)]
    print("| dtype | " + " | ".join(VARIANTS) + " |  (ms per packed row: best / median)")
    print("|---" * (len(VARIANTS) + 1) + "|")
    for dtype in (torch.float32, torch.bfloat16):
        times = time_variants(lengths, dtype, args.rounds)
        cells: list[Any] = []
        for t in times.values():
            t = sorted(t)
            cells.append(f"{1e3 * t[0]:.1f} / {1e3 * t[len(t) // 2]:.1f}")
        print(f"| {str(dtype).removeprefix('torch.')} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
