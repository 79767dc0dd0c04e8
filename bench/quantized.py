"""Quantized frozen base (NF4 / int8) against the bf16 base: bytes, memory, speed, quality.

    python -m bench.quantized [--skip-estimates] [--runs DIR ...] [--out bench/results]

- exact frozen-weight bytes of the embedded SmolLM2-135M patched with the paper's defaults,
  per storage (and a check that NF4's 64-value blocks divide every decoder linear);
- CPU peak RSS and seconds per training step (fwd + bwd of one packed batch), each method in
  a fresh process (``--worker METHOD``); the steps of the methods are not interleaved, so the
  ratio is only as good as the machine's load was steady;
- ESTIMATED CUDA peak of a bf16-mixed training step with activation checkpointing for
  OLMo2-1B/7B/13B and Llama-3-8B (``bench.estimate``'s FakeTensor trace, with and without
  ``quantize``);
- the loss curves of ``fastmid train`` runs given with ``--runs`` (their metrics.jsonl).

Writes ``quantized.json`` and ``quantized.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

GIB = 2**30
MIB = 2**20
METHODS = ("none", "nf4", "int8")
ESTIMATE_MODELS = ("OLMo2-1B", "OLMo2-7B", "OLMo2-13B", "Llama-3-8B")


def embedded_weight_bytes() -> dict[str, Any]:
    """Frozen-weight bytes of the embedded model per method, and NF4's divisibility check."""
    import torch

    from fastmid.engine.blocks import find_decoder_layers
    from fastmid.engine.midblock import MidBlockConfig, apply_midblock
    from fastmid.engine.models import load_model
    from fastmid.engine.quantize import NF4_BLOCK, frozen_weight_bytes

    out: dict[str, Any] = {}
    for method in METHODS:
        model = load_model(dtype=torch.bfloat16)[0]
        if method == "none":
            widths = {
                m.in_features
                for m in find_decoder_layers(model).modules()
                if isinstance(m, torch.nn.Linear)
            }
            out["linear_input_widths"] = sorted(widths)
            out["nf4_block_divides_all"] = all(w % NF4_BLOCK == 0 for w in widths)
        apply_midblock(model, MidBlockConfig(quantize=method))
        counts = frozen_weight_bytes(model)
        out[method] = {**counts, "stored": counts["quantized"] + counts["plain"]}
        del model
    return out


def worker(method: str, steps: int, batch_tokens: int) -> dict[str, Any]:
    """One process: load, patch + quantize, train ``steps`` steps; peak RSS and step seconds."""
    os.environ.pop("TRITON_INTERPRET", None)
    import torch

    from fastmid.engine.midblock import MidBlockConfig, adapter_parameters, apply_midblock
    from fastmid.engine.models import load_model
    from fastmid.memory import peak_rss_bytes

    torch.manual_seed(0)
    model, tokenizer, _ = load_model(dtype=torch.bfloat16)
    apply_midblock(model, MidBlockConfig(quantize=method))
    model.train()
    setup_rss = peak_rss_bytes()
    optimizer = torch.optim.AdamW(adapter_parameters(model), lr=1e-4)
    ids = torch.randint(10, tokenizer.vocab_size, (1, batch_tokens))
    seconds = []
    for _ in range(steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t0)
    return {
        "method": method,
        "setup_rss_bytes": setup_rss,
        "peak_rss_bytes": peak_rss_bytes(),
        "step_seconds": seconds,
        "batch_tokens": batch_tokens,
        "threads": torch.get_num_threads(),
    }


def run_workers(steps: int, batch_tokens: int) -> list[dict[str, Any]]:
    rows = []
    for method in METHODS:
        cmd = [
            sys.executable,
            "-m",
            "bench.quantized",
            "--worker",
            method,
            "--steps",
            str(steps),
            "--batch-tokens",
            str(batch_tokens),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


def estimates(models: list[str], batch: int, seq: int) -> list[dict[str, Any]]:
    """Estimated CUDA peaks (fastmid with checkpointing) per model and method."""
    from bench.estimate import estimate_peak, real_configs

    rows = []
    for name in models:
        for method in METHODS:
            est = estimate_peak(real_configs()[name], "fastmid_gc", batch, seq, quantize=method)
            rows.append(
                {
                    "model": name,
                    "method": method,
                    "batch": f"{batch}x{seq}",
                    "weights_bytes": est.weights,
                    "peak_bytes": est.peak,
                    "step_peak_bytes": est.peak_step,
                    "optimizer_bytes": est.optimizer,
                }
            )
    return rows


def loss_curve(run_dir: Path) -> dict[str, Any]:
    """Loss per logged step and the summary of one ``fastmid train`` output directory."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line) for line in lines if line.strip()]
    summary = json.loads((run_dir / "summary.json").read_text())
    config = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").exists() else ""
    quantize = next(
        (ln.split(":", 1)[1].strip() for ln in config.splitlines() if ln.startswith("quantize:")),
        "none",
    )
    return {
        "run": str(run_dir),
        "quantize": quantize,
        "loss": [s["loss"] for s in steps if "loss" in s],
        "summary": {k: summary.get(k) for k in ("tokens_per_second", "wall_seconds", "eval")},
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [f"Quantized frozen base vs bf16 (commit {result['commit']}, {result['machine']})", ""]
    wb = result["weight_bytes"]
    lines += [
        "Frozen decoder-linear weights of the embedded SmolLM2-135M, paper defaults (exact bytes)",
        "",
        f"NF4 block 64 divides every decoder linear input width {wb['linear_input_widths']}: "
        f"{wb['nf4_block_divides_all']}",
        "",
        "| method | stored MiB | bf16 MiB | ratio |",
        "|---|---|---|---|",
    ]
    for m in METHODS:
        c = wb[m]
        lines.append(
            f"| {m} | {c['stored'] / MIB:.1f} | {c['bf16'] / MIB:.1f} | "
            f"{c['stored'] / c['bf16']:.3f} |"
        )
    if result.get("workers"):
        lines += [
            "",
            f"CPU training step, bf16 autocast, {result['workers'][0]['batch_tokens']} "
            "tokens, fresh process per method, NOT interleaved; the machine was shared "
            f"and loaded ({result['load']})",
            "",
            "| method | peak RSS MiB | after set-up MiB | median s/step | vs none |",
            "|---|---|---|---|---|",
        ]
        med = {
            w["method"]: sorted(w["step_seconds"])[len(w["step_seconds"]) // 2]
            for w in result["workers"]
        }
        for w in result["workers"]:
            lines.append(
                f"| {w['method']} | {w['peak_rss_bytes'] / MIB:.0f} | "
                f"{w['setup_rss_bytes'] / MIB:.0f} | {med[w['method']]:.2f} | "
                f"{med[w['method']] / med['none']:.2f}x |"
            )
    if result.get("estimates"):
        lines += [
            "",
            "ESTIMATED CUDA peak, bf16 mixed precision, fastmid + checkpointing "
            "(FakeTensor trace; GiB)",
            "",
            "| model | method | batch | weights | peak | saved vs none |",
            "|---|---|---|---|---|---|",
        ]
        base = {r["model"]: r for r in result["estimates"] if r["method"] == "none"}
        for r in result["estimates"]:
            saved = (base[r["model"]]["peak_bytes"] - r["peak_bytes"]) / GIB
            lines.append(
                f"| {r['model']} | {r['method']} | {r['batch']} | "
                f"{r['weights_bytes'] / GIB:.2f} | {r['peak_bytes'] / GIB:.2f} | "
                f"{saved:.2f} |"
            )
    for run in result.get("runs", []):
        losses = ", ".join(f"{x:.3f}" for x in run["loss"])
        lines += ["", f"`fastmid train` loss per step, quantize={run['quantize']}: {losses}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quantized")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3, help="training steps per method")
    parser.add_argument("--batch-tokens", type=int, default=512)
    parser.add_argument("--skip-steps", action="store_true", help="no RSS / step-time runs")
    parser.add_argument("--skip-estimates", action="store_true", help="no FakeTensor estimates")
    parser.add_argument("--estimate-shape", default="8x1024", help="batch x sequence length")
    parser.add_argument(
        "--estimate-models", nargs="+", default=list(ESTIMATE_MODELS), choices=ESTIMATE_MODELS
    )
    parser.add_argument("--runs", nargs="*", default=[], help="fastmid train output dirs")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    if args.worker:
        json.dump(worker(args.worker, args.steps, args.batch_tokens), sys.stdout)
        sys.stdout.write("\n")
        return 0

    from bench.machine import machine_info
    from fastmid.fileio import write_text_atomic

    info = machine_info()
    result: dict[str, Any] = {
        "commit": info.get("commit"),
        "machine": info.get("cpu"),
        "load": "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "weight_bytes": embedded_weight_bytes(),
    }
    if not args.skip_steps:
        result["workers"] = run_workers(args.steps, args.batch_tokens)
    if not args.skip_estimates:
        batch, seq = (int(x) for x in args.estimate_shape.split("x"))
        result["estimates"] = estimates(args.estimate_models, batch, seq)
    result["runs"] = [loss_curve(Path(r)) for r in args.runs]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "quantized.json", json.dumps(result, indent=1) + "\n")
    write_text_atomic(out / "quantized.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
