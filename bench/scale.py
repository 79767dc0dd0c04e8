"""Data at scale: packing time, host memory per token and the tokenization cache.

    python -m bench.scale [--sizes 100000 1000000] [--jsonl-records 20000] [--out bench/results]

- packing: synthetic examples (lengths drawn to average ~300 tokens, clipped to 16-1024) stored
  as :class:`fastmid.recipe.data.TokenizedExamples` built straight from arrays; seconds for one
  epoch's :func:`fastmid.recipe.data.pack_batches` (budget 8192 tokens) and for two more epochs;
- memory: bytes per token the data holds above its raw int32 ids (the label flags and
  offsets) and the peak that packing one epoch adds, both from ``tracemalloc`` (numpy reports
  its buffers to it), and the process's RSS growth over the raw ids;
- cache: a synthetic JSONL of question/answer records tokenized with the embedded model's
  tokenizer, cold (records parsed, batched tokenization, written to the cache) and warm (the
  file only hashed, the arrays memory-mapped from the cache); the warm figure is the data part
  of a second run's time to its first step;
- second run: a ``--second-run-records`` JSONL (default 1M) with its tokens cached, timed from
  the process start to the first training step of ``fastmid train`` on the embedded model
  (see :func:`measure_second_run`).

Writes ``scale.json`` and ``scale.md`` into ``--out`` with the machine's load (``uptime``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

from fastmid.memory import rss_bytes
from fastmid.recipe.data import (
    TokenizedExamples,
    load_records,
    pack_batches,
    tokenize_records,
    tokenized_key,
)

MEAN_TOKENS = 300
BATCH_TOKENS = 8192
WORDS = [
    "apples",
    "pens",
    "marbles",
    "trains",
    "boxes",
    "coins",
    "cookies",
    "books",
    "shells",
    "stamps",
]


def synthetic_lengths(count: int, seed: int = 0) -> np.ndarray:
    """Example lengths of a chat-like set: log-normal around ``MEAN_TOKENS``, 16-1024 tokens."""
    rng = np.random.default_rng(seed)
    raw = rng.lognormal(mean=np.log(MEAN_TOKENS) - 0.18, sigma=0.6, size=count)
    return np.clip(raw.round(), 16, 1024).astype(np.int64)


def synthetic_examples(lengths: np.ndarray, seed: int = 0) -> TokenizedExamples:
    """Flat examples of ``lengths`` with random ids and the last half of each labelled."""
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    total = int(offsets[-1])
    ids = np.random.default_rng(seed).integers(0, 49152, size=total, dtype=np.int32)
    position = np.arange(total) - np.repeat(offsets[:-1], lengths)
    labelled = position >= np.repeat(lengths // 2, lengths)
    labelled[offsets[1:] - 1] = False
    return TokenizedExamples(ids, labelled, offsets)


def measure_packing(count: int) -> dict[str, Any]:
    """Packing time and memory for ``count`` synthetic examples."""
    lengths = synthetic_lengths(count)
    gc.collect()
    rss_before = rss_bytes()
    examples = synthetic_examples(lengths)
    rss_data = rss_bytes() - rss_before
    tokens = examples.num_tokens
    raw_ids = examples.ids.nbytes
    held = examples.labelled.nbytes + examples.offsets.nbytes
    started = time.perf_counter()
    bins = pack_batches(examples, BATCH_TOKENS, seed=0, epoch=0)
    first = time.perf_counter() - started
    started = time.perf_counter()
    for epoch in (1, 2):
        pack_batches(examples, BATCH_TOKENS, seed=0, epoch=epoch)
    later = (time.perf_counter() - started) / 2
    fill = tokens / (len(bins) * BATCH_TOKENS)
    del bins
    gc.collect()
    tracemalloc.start()
    bins = pack_batches(examples, BATCH_TOKENS, seed=0, epoch=3)
    _, pack_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_packed = rss_bytes() - rss_before
    return {
        "examples": count,
        "tokens": tokens,
        "mean_tokens": tokens / count,
        "batch_tokens": BATCH_TOKENS,
        "batches": len(bins),
        "fill": fill,
        "pack_first_epoch_s": first,
        "pack_later_epoch_s": later,
        "bytes_per_token_held_above_ids": held / tokens,
        "bytes_per_token_packing_peak": pack_peak / tokens,
        "bytes_per_token_above_ids_total": (held + pack_peak) / tokens,
        "rss_bytes_per_token_above_ids": (max(rss_data, rss_packed) - raw_ids) / tokens,
    }


def synthetic_jsonl(path: Path, count: int, seed: int = 0) -> None:
    """``count`` question/answer records of about ``MEAN_TOKENS`` tokens each."""
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for i in range(count):
            words = rng.choice(WORDS, size=int(rng.integers(60, 160)))
            question = f"Problem {i}: " + " ".join(words) + ". How many are left?"
            steps = " ".join(f"{a} + {b} = {a + b}." for a, b in rng.integers(1, 99, (20, 2)))
            f.write(json.dumps({"question": question, "answer": f"{steps}\n#### {i}"}) + "\n")


def measure_cache(count: int) -> dict[str, Any]:
    """Cold (tokenize + write) and warm (memory-mapped) data loads of a synthetic JSONL."""
    from transformers import AutoTokenizer

    from fastmid.engine.models import default_model_dir, prepare_tokenizer

    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(str(default_model_dir())))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.jsonl"
        synthetic_jsonl(path, count)
        cache = Path(tmp) / "cache"
        runs = []
        for _ in ("cold", "warm"):
            started = time.perf_counter()
            records = load_records(path, cache_dir=cache)
            read = time.perf_counter() - started
            examples = tokenize_records(records, tokenizer, max_length=1024, cache_dir=cache)
            tokenized = time.perf_counter() - started - read
            pack_batches(examples, BATCH_TOKENS, seed=0)
            runs.append(
                {"read_s": read, "tokenize_s": tokenized, "total_s": time.perf_counter() - started}
            )
        size = path.stat().st_size
    return {
        "records": count,
        "examples": len(examples),
        "tokens": examples.num_tokens,
        "file_bytes": size,
        "cold": runs[0],
        "warm": runs[1],
    }


# A second run as a user starts it: the first training step ends the process, after printing
# the seconds since the process was launched (argv[6], the launcher's clock) and those the
# model load took.
_SECOND_RUN = """
import sys, time
from fastmid.engine import models
from fastmid.recipe import train as train_mod
from fastmid.recipe.config import build_config
load_model = models.load_model
def timed_load(*args, **kwargs):
    started = time.perf_counter()
    out = load_model(*args, **kwargs)
    print("model_load_s", time.perf_counter() - started, flush=True)
    return out
def first_step(*args, **kwargs):
    print("first_step_s", time.time() - float(sys.argv[6]), flush=True)
    sys.exit(0)
models.load_model = timed_load
train_mod.train_step = first_step
train_mod.train(build_config(None, dict(model=sys.argv[1], data=sys.argv[2],
    output_dir=sys.argv[3], max_length=int(sys.argv[4]), batch_tokens=int(sys.argv[5]),
    eval=False, max_steps=1, overwrite=True)))
"""


def repeated_jsonl(path: Path, block: list[str], repeats: int) -> None:
    """``block`` (JSON lines) written ``repeats`` times."""
    chunk = "".join(line + "\n" for line in block)
    with path.open("w") as f:
        for _ in range(repeats):
            f.write(chunk)


def measure_second_run(count: int, block: int = 1000) -> dict[str, Any]:
    """A second ``fastmid train`` run on a ``count``-record JSONL, its tokens cached.

    The file repeats ``block`` distinct records, so the cache entry a cold run would write is
    the block's tokens tiled (checked against a real tokenization of two blocks) and the cold
    tokenization of all ``count`` records, hours on a busy CPU, is skipped. Measured: the cold
    record parse (what every run paid before the cache was looked up first), the data part of
    the second run in-process (hash, cache note, memory-mapped arrays, packing), and a second
    ``fastmid train`` process from its start to its first training step, with the embedded
    model (its load timed separately).
    """
    from transformers import AutoTokenizer

    from fastmid.engine.models import default_model_dir, prepare_tokenizer

    model_dir = default_model_dir()
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(str(model_dir)))
    max_length = 1024
    settings = {"fmt": "qa", "max_length": max_length, "loss_on": "response"}
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        small = Path(tmp) / "block.jsonl"
        synthetic_jsonl(small, block)
        lines = small.read_text().splitlines()
        path = Path(tmp) / "data.jsonl"
        repeated_jsonl(path, lines, count // block)
        cache = Path(tmp) / "cache" / "tokenized"
        started = time.perf_counter()
        records = load_records(path, cache_dir=cache)
        parse_s = time.perf_counter() - started
        one = tokenize_records(records[:block], tokenizer, **settings)
        two = tokenize_records(records[: 2 * block], tokenizer, **settings)
        reps = len(records) // block
        del records
        gc.collect()
        tiled = TokenizedExamples(
            np.tile(one.ids, reps),
            np.tile(one.labelled, reps),
            np.concatenate(([0], np.cumsum(np.tile(one.lengths, reps)))).astype(np.int64),
        )
        n2 = int(two.offsets[-1])
        assert np.array_equal(tiled.ids[:n2], two.ids), "tiled tokens differ from tokenizing"
        assert np.array_equal(tiled.labelled[:n2], two.labelled)
        fingerprint = load_records(path, cache_dir=cache).fingerprint
        tiled.save(cache / tokenized_key(fingerprint, tokenizer, **settings))
        tokens = tiled.num_tokens
        del tiled, one, two
        gc.collect()
        started = time.perf_counter()
        examples = tokenize_records(
            load_records(path, cache_dir=cache), tokenizer, cache_dir=cache, **settings
        )
        hit_s = time.perf_counter() - started
        pack_batches(examples, BATCH_TOKENS, seed=0)
        data_s = time.perf_counter() - started
        del examples
        env = {**os.environ, "FASTMID_CACHE": str(cache.parent), "OMP_NUM_THREADS": "2"}
        argv = [str(model_dir), str(path), str(Path(tmp) / "run"), str(max_length)]
        started = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", _SECOND_RUN, *argv, str(BATCH_TOKENS), str(time.time())],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        wall = time.perf_counter() - started
        marks = dict(
            line.split()
            for line in out.splitlines()
            if line.startswith(("model_load_s ", "first_step_s "))
        )
        size = path.stat().st_size
    return {
        "records": count,
        "distinct_records": block,
        "file_bytes": size,
        "tokens": tokens,
        "cold_parse_s": parse_s,
        "hit_data_s": hit_s,
        "hit_data_and_pack_s": data_s,
        "model_load_s": float(marks["model_load_s"]),
        "process_to_first_step_s": float(marks["first_step_s"]),
        "process_wall_s": wall,
    }


def uptime() -> str:
    """The machine's load as ``uptime`` prints it."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def render(result: dict[str, Any]) -> str:
    """The markdown table of ``result``."""
    lines = [
        "# Data at scale",
        "",
        f"Machine: {result['cpu_count']} CPUs; load before: `{result['uptime_before']}`; "
        f"after: `{result['uptime_after']}`.",
        "",
        "| examples | tokens | batches | fill | pack 1st epoch s | later epoch s | "
        "held B/tok above ids | packing peak B/tok | RSS B/tok above ids |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["packing"]:
        lines.append(
            f"| {r['examples']:,} | {r['tokens']:,} | {r['batches']:,} | {r['fill']:.3f} | "
            f"{r['pack_first_epoch_s']:.2f} | {r['pack_later_epoch_s']:.2f} | "
            f"{r['bytes_per_token_held_above_ids']:.3f} | "
            f"{r['bytes_per_token_packing_peak']:.3f} | {r['rss_bytes_per_token_above_ids']:.3f} |"
        )
    c = result.get("cache")
    if c:
        lines += [
            "",
            f"Tokenization cache: {c['records']:,} records ({c['file_bytes'] / 2**20:.0f} MiB "
            f"JSONL, {c['tokens']:,} tokens), embedded model's tokenizer.",
            "",
            "| run | read records s | tokenize s | read + tokenize + pack s |",
            "|---|---:|---:|---:|",
        ]
        for name in ("cold", "warm"):
            r = c[name]
            lines.append(
                f"| {name} | {r['read_s']:.2f} | {r['tokenize_s']:.2f} | {r['total_s']:.2f} |"
            )
    r = result.get("second_run")
    if r:
        lines += [
            "",
            f"Second run: {r['records']:,} records ({r['file_bytes'] / 2**20:.0f} MiB JSONL, "
            f"{r['tokens']:,} tokens; {r['distinct_records']:,} distinct records repeated, "
            "their cache entry tiled), embedded model, tokens cached.",
            "",
            "| cold record parse s | data on a hit s | + packing s | model load s | "
            "process start → first step s |",
            "|---:|---:|---:|---:|---:|",
            f"| {r['cold_parse_s']:.2f} | {r['hit_data_s']:.2f} | "
            f"{r['hit_data_and_pack_s']:.2f} | {r['model_load_s']:.2f} | "
            f"{r['process_to_first_step_s']:.2f} |",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--jsonl-records", type=int, default=20_000, help="0 = skip the cache")
    parser.add_argument("--second-run-records", type=int, default=1_000_000, help="0 = skip")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"cpu_count": os.cpu_count(), "uptime_before": uptime()}
    result["packing"] = [measure_packing(n) for n in args.sizes]
    if args.jsonl_records:
        result["cache"] = measure_cache(args.jsonl_records)
    if args.second_run_records:
        result["second_run"] = measure_second_run(args.second_run_records)
    result["uptime_after"] = uptime()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "scale.md").write_text(render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
