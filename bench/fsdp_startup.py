"""Host memory per rank when FSDP starts: built on meta and read shard by shard, or loaded whole.

    python -m bench.fsdp_startup [--layers 20] [--hidden 1536] [--nproc 2] [--out bench/results]

A random-initialised Llama (small vocabulary, so the decoder blocks hold nearly all the weights)
is saved once as an fp32 safetensors directory. Then, for each way of starting, ``--nproc`` CPU
processes (gloo, one thread each) set the model up as ``fastmid train --parallel fsdp`` does —
load, Mid-Block patch (unfused), ``fully_shard`` — and stop before the first step:

- ``meta``: :func:`fastmid.recipe.train.load_base_model` (the model built on the meta device,
  every rank reading only its own rows of each block weight from the safetensors file);
- ``whole``: every rank loads the whole model first (``models.load_model``), as before.

Each rank reports its peak RSS (``VmHWM``) and its RSS before the model was touched (imports and
the process group); both are set against the bytes of one full fp32 copy of the weights. Then it
runs one training forward and backward on a 64-token micro-batch and reports the peak again:
a step gathers each block (its all-gather buffer and its gathered weights) on top of the shards.
Writes ``fsdp_startup.json`` and ``fsdp_startup.md`` into ``--out`` with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

MODES = ("meta", "whole")
STEP_TOKENS = 64  # the micro-batch of the one training step measured after start-up


def save_model(path: Path, layers: int, hidden: int) -> int:
    """A random Llama with ``layers`` blocks of width ``hidden`` saved at ``path``; its bytes."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fastmid.engine import models

    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    # A tokenizer makes the directory loadable as a model; the embedded model's will do.
    AutoTokenizer.from_pretrained(models.default_model_dir()).save_pretrained(path)
    (path / "bytes.txt").write_text(str(sum(p.numel() * 4 for p in model.parameters())))
    return int((path / "bytes.txt").read_text())


def worker(mode: str, model_dir: str, out: str) -> None:
    """One rank: set the model up for FSDP the chosen way, then record its memory."""
    import torch

    from fastmid.engine import models
    from fastmid.engine.loss import IGNORE_INDEX, forward_loss
    from fastmid.engine.midblock import MidBlockConfig, apply_midblock
    from fastmid.memory import peak_rss_bytes, rss_bytes
    from fastmid.recipe import distributed
    from fastmid.recipe.config import build_config
    from fastmid.recipe.data import Example, collate_packed
    from fastmid.recipe.train import Runtime, load_base_model

    env = distributed.init_distributed(torch.device("cpu"))
    before = rss_bytes()
    rt = Runtime(torch.device("cpu"), env.world_size, "fp32")
    if mode == "meta":
        cfg = build_config(None, {"model": model_dir, "parallel": "fsdp"})
        model, _, _, parallel, files, _ = load_base_model(cfg, rt)
        assert parallel == "fsdp" and files, "the meta path was not taken"
    else:
        model, _, _ = models.load_model(model_dir)
        files = []
    apply_midblock(model, MidBlockConfig(fuse_groups=False))
    dp = distributed.ParallelStep(model, "fsdp", forward_loss, rt.device, files)
    row = dict(
        mode=mode,
        rank=env.rank,
        rss_before_load=before,
        peak_rss=peak_rss_bytes(),
        rss_after_shard=rss_bytes(),
        loaded_bytes=dp.loaded_bytes,
    )
    ids = torch.randint(3, 4096, (STEP_TOKENS,), generator=torch.Generator().manual_seed(0))
    model.train()
    targets = [*ids[1:].tolist(), IGNORE_INDEX]
    loss, _ = dp.forward_loss(collate_packed([Example(ids.tolist(), targets)]))
    loss.backward()
    row["peak_rss_step"] = peak_rss_bytes()
    Path(out, f"{mode}_rank{env.rank}.json").write_text(json.dumps(row))
    distributed.shutdown()


def run(mode: str, model_dir: Path, nproc: int, tmp: Path) -> list[dict[str, Any]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={nproc}", "-m", "bench.fsdp_startup", "--worker", mode]
    cmd += [str(model_dir), str(tmp)]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return [json.loads((tmp / f"{mode}_rank{r}.json").read_text()) for r in range(nproc)]


def report(rows: list[dict[str, Any]], full: int, load: str, nproc: int, params: int) -> str:
    gib = 2**30
    lines = [
        f"# FSDP start-up host memory per rank ({nproc} CPU processes, gloo)",
        "",
        f"Random Llama, {params / 1e6:.0f}M params, one full fp32 copy = {full / gib:.2f} GiB. "
        f"Peak RSS (VmHWM) after `fully_shard`, before the first step; 'above start' subtracts "
        f"the RSS the rank had before loading (Python, torch, transformers, the process group); "
        f"'after 1 step' is the peak once one training forward and backward on {STEP_TOKENS} "
        f"tokens has run. "
        f"Machine: 2 shared cores, load average {load}.",
        "",
        "| start-up | rank | peak RSS GiB | × full copy | above start GiB | × full copy | "
        "weights read GiB | peak after 1 step GiB | × full copy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        above = r["peak_rss"] - r["rss_before_load"]
        step = r["peak_rss_step"]
        lines.append(
            f"| {r['mode']} | {r['rank']} | {r['peak_rss'] / gib:.2f} | {r['peak_rss'] / full:.2f} "
            f"| {above / gib:.2f} | {above / full:.2f} | {r['loaded_bytes'] / gib:.2f} "
            f"| {step / gib:.2f} | {step / full:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--worker", nargs=3, metavar=("MODE", "MODEL_DIR", "OUT"))
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    with tempfile.TemporaryDirectory(prefix="fastmid-fsdp-") as tmp:
        model_dir = Path(tmp) / "model"
        full = save_model(model_dir, args.layers, args.hidden)
        rows = [row for mode in MODES for row in run(mode, model_dir, args.nproc, Path(tmp))]
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    load = load.split("load average:")[-1].strip()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"full_copy_bytes": full, "nproc": args.nproc, "load_average": load, "ranks": rows}
    (out / "fsdp_startup.json").write_text(json.dumps(result, indent=1) + "\n")
    text = report(rows, full, load, args.nproc, full // 4)
    (out / "fsdp_startup.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
