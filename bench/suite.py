"""The whole benchmark as one run: every workload, providers interleaved, one results dict.

``run_suite(options)`` returns plain JSON-ready data; :mod:`bench.report` turns it into a
printed table, JSON, CSV and PNG files. Workloads:

- ``throughput``  end-to-end training steps on identical batches, real (non-pad) tokens/s,
  estimated time per epoch, ratios against ``peft_all`` and ``peft_mid``;
- ``flops``       FLOPs per step (FlopCounterMode), useful vs executed, MFU against this
  machine's matmul peak measured in the same run;
- ``memory``      peak training memory of a fresh process per provider, plus the exact bytes of
  saved activations, gradients and optimizer state;
- ``estimate``    estimated CUDA peak memory for real model shapes (FakeTensor tracing);
- ``bands``       fastmid throughput with the band at the bottom, middle, top, or everywhere;
- ``profile``     one profiled step per provider, time grouped by kind of work (bench.profile);
- ``engine``      ``model(input_ids, labels)`` on padded batches, providers interleaved;
- ``kernels``     fused vs unfused kernel microbenchmarks (``bench/test_kernels_*.py``, CUDA).
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.machine import REPO_ROOT, machine_info, machine_label
from bench.providers import (
    BANDS,
    DESCRIPTIONS,
    DTYPES,
    PROVIDERS,
    USEFUL_TWIN,
    Provider,
    Workload,
    build_provider,
    device,
    load_base,
    make_workload,
)

WORKLOADS = ("throughput", "flops", "memory", "estimate", "bands", "profile", "engine", "kernels")


@dataclass
class SuiteOptions:
    """What to run; ``quick`` shrinks everything so the machinery runs in about a minute."""

    quick: bool = False
    workloads: tuple[str, ...] = WORKLOADS
    providers: tuple[str, ...] = PROVIDERS
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    # Warm-up rounds (discarded) and timed rounds; each round runs every provider once.
    warmup: int = 1
    steps: int = 3
    # Token budget of one step (the trainer's packing bin; PEFT pads the same examples).
    batch_tokens: int = 1024
    # Estimated-memory shapes: sequences per step and tokens per sequence.
    estimate_models: tuple[str, ...] = ("OLMo2-1B", "OLMo2-7B", "OLMo2-13B", "Llama-3-8B")
    estimate_batch: int = 8
    estimate_seq: int = 1024
    # Precision of the band sweep (the trainer's choice on bf16-capable hardware).
    band_dtype: str = "bf16"
    log: Any = field(default=print, repr=False)

    @classmethod
    def quick_defaults(cls, **overrides: Any) -> SuiteOptions:
        base = dict(
            quick=True,
            warmup=1,
            steps=1,
            batch_tokens=256,
            estimate_models=("OLMo2-1B",),
            estimate_batch=1,
            estimate_seq=128,
        )
        base.update(overrides)
        return cls(**base)


def _stamp(row: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """Every result row names its machine and commit."""
    return {**row, "machine": machine_label(info), "commit": info["commit"]}


def _shape(provider: Provider, workload: Workload, step: int) -> str:
    if provider.name == "fastmid":
        return f"1x{workload.real_tokens(step)}"
    b, t = workload.padded_shape(step)
    return f"{b}x{t}"


def _executed_tokens(provider: Provider, workload: Workload, step: int) -> int:
    if provider.name == "fastmid":
        return workload.real_tokens(step)
    b, t = workload.padded_shape(step)
    return b * t


def _free(*objs: Any) -> None:
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Workloads


def _throughput_and_state(
    opts: SuiteOptions, base: Any, workload: Workload, dtype: str, info: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Interleaved timing of every provider in ``dtype``, then each one's exact state bytes."""
    from bench.measure import state_bytes, time_interleaved

    providers = [build_provider(n, base, dtype) for n in opts.providers]
    opts.log(f"[throughput] {dtype}: {', '.join(opts.providers)} x {opts.steps} steps")
    times = time_interleaved(providers, workload, opts.warmup, opts.steps)
    timed = range(opts.warmup, opts.warmup + opts.steps)
    real = sum(workload.real_tokens(i) for i in timed)
    rows, state_rows = [], []
    for p in providers:
        t = times[p.name]
        tok_s = real / sum(t)
        rows.append(
            {
                "workload": "throughput",
                "provider": p.name,
                "dtype": dtype,
                "model": workload.extra["model"],
                "shape": " ".join(_shape(p, workload, i) for i in timed),
                "layers": f"{p.layers[0]}-{p.layers[-1]}" if p.layers else "",
                "rank": p.rank,
                "steps": len(t),
                "real_tokens": real,
                "executed_tokens": sum(_executed_tokens(p, workload, i) for i in timed),
                "step_s_median": statistics.median(t),
                "step_s_min": min(t),
                "tokens_per_s": tok_s,
                "epoch_s_est": workload.epoch_tokens / tok_s,
            }
        )
        batch = p.batch(workload.step_examples(0), workload.pad_id)
        state = state_bytes(p, batch)
        state_rows.append(
            {"provider": p.name, "dtype": dtype, "shape": _shape(p, workload, 0), **state}
        )
    _free(providers)
    by = {r["provider"]: r["tokens_per_s"] for r in rows}
    for r in rows:
        for ref in ("peft_all", "peft_mid"):
            if ref in by:
                r[f"vs_{ref}"] = r["tokens_per_s"] / by[ref]
    return [_stamp(r, info) for r in rows], state_rows


def _flops(
    opts: SuiteOptions,
    base: Any,
    workload: Workload,
    throughput: list[dict[str, Any]],
    peaks: dict[str, float],
    info: dict[str, Any],
) -> list[dict[str, Any]]:
    """FLOPs of step 0 per provider (fp32 on CPU: precision does not change the count)."""
    from bench.measure import count_flops, useful_flops

    counts: dict[str, dict[str, int]] = {}
    for name in opts.providers:
        opts.log(f"[flops] {name}")
        p = build_provider(name, base, "fp32", on="cpu")
        executed = count_flops(p, p.batch(workload.step_examples(0), workload.pad_id))
        twin = USEFUL_TWIN.get(name)
        useful = counts[twin]["useful"] if twin in counts else useful_flops(p, workload, 0)
        counts[name] = {"executed": executed, "useful": useful}
        _free(p)
    real0 = workload.real_tokens(0)
    rows = []
    for r in throughput:
        c = counts.get(r["provider"])
        if c is None:
            continue
        per_token = c["useful"] / real0
        achieved = per_token * r["tokens_per_s"]
        rows.append(
            {
                "workload": "flops",
                "provider": r["provider"],
                "dtype": r["dtype"],
                "model": r["model"],
                "shape": _shape_step0(r["provider"], workload),
                "useful_flops_step0": c["useful"],
                "executed_flops_step0": c["executed"],
                "executed_over_useful": c["executed"] / c["useful"],
                "useful_flops_per_token": per_token,
                "useful_flop_s": achieved,
                "matmul_peak_flop_s": peaks[r["dtype"]],
                "mfu": achieved / peaks[r["dtype"]],
            }
        )
    return [_stamp(r, info) for r in rows]


def _shape_step0(name: str, workload: Workload) -> str:
    if name == "fastmid":
        return f"1x{workload.real_tokens(0)}"
    b, t = workload.padded_shape(0)
    return f"{b}x{t}"


def _memory(
    opts: SuiteOptions, workload: Workload, state_rows: list[dict[str, Any]], info: dict[str, Any]
) -> list[dict[str, Any]]:
    """Peak memory of each provider in a fresh process, joined with its exact state bytes."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    names = opts.providers
    if opts.quick:
        names = [n for n in names if n in ("peft_all", "fastmid")]
    dtypes = opts.dtypes if not opts.quick else opts.dtypes[:1]
    rows = []
    for dtype in dtypes:
        for name in names:
            opts.log(f"[memory] {name} {dtype} (fresh process)")
            cmd = [
                sys.executable,
                "-m",
                "bench.memworker",
                "--provider",
                name,
                "--dtype",
                dtype,
                "--steps",
                "2",
                "--batch-tokens",
                str(opts.batch_tokens),
            ]
            if opts.quick:
                cmd.append("--quick")
            res = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
            if res.returncode != 0:
                tail = res.stderr.strip().splitlines()[-1:] or ["no output"]
                raise RuntimeError(f"memory worker for {name} {dtype} failed: {tail[0]}")
            mem = json.loads(res.stdout.strip().splitlines()[-1])
            state = next(
                (s for s in state_rows if s["provider"] == name and s["dtype"] == dtype), {}
            )
            rows.append(
                {
                    "workload": "memory",
                    "provider": name,
                    "dtype": dtype,
                    "model": mem["model"],
                    "shape": " ".join(f"{b}x{t}" for b, t in mem["padded_shapes"])
                    if name != "fastmid"
                    else " ".join(f"1x{n}" for n in mem["real_tokens"]),
                    "kind": mem["kind"],
                    "peak_bytes": mem["peak"],
                    "setup_bytes": mem["setup"],
                    "train_bytes": mem["train"],
                    "saved_activation_bytes": state.get("saved"),
                    "grad_bytes": state.get("grads"),
                    "optimizer_bytes": state.get("optimizer"),
                }
            )
    for dtype in dtypes:
        ref = next((r for r in rows if r["provider"] == "peft_all" and r["dtype"] == dtype), None)
        for r in rows:
            if ref is None or r["dtype"] != dtype:
                continue
            r["peak_vs_peft_all"] = r["peak_bytes"] / ref["peak_bytes"]
            r["train_vs_peft_all"] = r["train_bytes"] / max(ref["train_bytes"], 1)
            if r["saved_activation_bytes"] is not None and ref["saved_activation_bytes"]:
                exact = sum(
                    r[k] for k in ("saved_activation_bytes", "grad_bytes", "optimizer_bytes")
                )
                ref_exact = sum(
                    ref[k] for k in ("saved_activation_bytes", "grad_bytes", "optimizer_bytes")
                )
                r["state_vs_peft_all"] = exact / ref_exact
    return [_stamp(r, info) for r in rows]


def _estimate(opts: SuiteOptions, info: dict[str, Any]) -> list[dict[str, Any]]:
    """Estimated CUDA peak memory (bf16 mixed) for real model shapes, fastmid vs PEFT."""
    from bench.estimate import estimate_peak, real_configs

    configs = real_configs()
    names = [n for n in ("peft_all", "peft_all_gc", "peft_mid", "fastmid") if n in opts.providers]
    if opts.quick:
        names = [n for n in names if n in ("peft_all", "fastmid")]
    elif "fastmid" in names:
        # fastmid with its own checkpointing: what the band gives when memory is the goal.
        names.append("fastmid_gc")
    rows = []
    for model in opts.estimate_models:
        for name in names:
            opts.log(f"[estimate] {model} {name}")
            est = estimate_peak(
                configs[model], name, batch_size=opts.estimate_batch, seq_len=opts.estimate_seq
            )
            rows.append(
                {
                    "workload": "estimate",
                    "provider": name,
                    "dtype": "bf16-mixed",
                    "model": model,
                    "shape": (
                        f"1x{opts.estimate_batch * opts.estimate_seq}"
                        if name == "fastmid"
                        else f"{opts.estimate_batch}x{opts.estimate_seq}"
                    ),
                    "estimate": True,
                    "weights_bytes": est.weights,
                    "optimizer_bytes": est.optimizer,
                    "step_peak_bytes": est.peak_step,
                    "peak_bytes": est.peak,
                    "trainable_params": est.trainable_params,
                    "trace_s": est.seconds,
                }
            )
            gc.collect()
    for r in rows:
        ref = next(x for x in rows if x["model"] == r["model"] and x["provider"] == names[0])
        r[f"vs_{names[0]}"] = r["peak_bytes"] / ref["peak_bytes"]
    return [_stamp(r, info) for r in rows]


def _bands(
    opts: SuiteOptions, base: Any, workload: Workload, info: dict[str, Any]
) -> list[dict[str, Any]]:
    """fastmid throughput with the band at each placement, the placements interleaved."""
    from bench.measure import time_interleaved

    dtype = opts.band_dtype if opts.band_dtype in opts.dtypes else opts.dtypes[0]
    providers = []
    for label, band in BANDS.items():
        p = build_provider("fastmid", base, dtype, band=band)
        p.name = f"fastmid[{label}]"
        providers.append(p)
    opts.log(f"[bands] {dtype}: {', '.join(BANDS)}")
    times = time_interleaved(providers, workload, opts.warmup, max(opts.steps - 1, 1))
    timed = range(opts.warmup, opts.warmup + max(opts.steps - 1, 1))
    real = sum(workload.real_tokens(i) for i in timed)
    rows = []
    for (label, band), p in zip(BANDS.items(), providers, strict=True):
        tok_s = real / sum(times[p.name])
        rows.append(
            {
                "workload": "bands",
                "provider": "fastmid",
                "band": label,
                "band_spec": str(band),
                "layers": f"{p.layers[0]}-{p.layers[-1]}",
                "rank": p.rank,
                "dtype": dtype,
                "model": workload.extra["model"],
                "shape": " ".join(f"1x{workload.real_tokens(i)}" for i in timed),
                "tokens_per_s": tok_s,
                "step_s_median": statistics.median(times[p.name]),
            }
        )
    _free(providers)
    mid = next(r["tokens_per_s"] for r in rows if r["band"] == "middle")
    for r in rows:
        r["vs_middle"] = r["tokens_per_s"] / mid
    return [_stamp(r, info) for r in rows]


def _kernels(opts: SuiteOptions, out_dir: Path) -> dict[str, Any]:
    """Per-kernel microbenchmarks (CUDA only): pytest-benchmark's JSON, or why they were skipped."""
    files = sorted(
        str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "bench").glob("test_kernels_*.py")
    )
    if not torch.cuda.is_available():
        return {
            "skipped": "no CUDA device: fused-kernel microbenchmarks need a GPU",
            "files": files,
        }
    if not files:
        return {"skipped": "no bench/test_kernels_*.py files", "files": files}
    out = out_dir / "kernels.json"
    opts.log(f"[kernels] {' '.join(files)}")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            *files,
            "--benchmark-only",
            f"--benchmark-json={out}",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    return {"returncode": res.returncode, "json": out.name, "files": files}


# --------------------------------------------------------------------------------------------


def run_suite(
    opts: SuiteOptions, out_dir: Path, on_partial: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Run the selected workloads and return the results.

    ``on_partial`` is called with the results so far after each workload (the command writes
    reports then, so a long run that is stopped keeps what it measured, marked partial).
    """

    def done() -> None:
        results["wall_s"] = time.perf_counter() - t_start
        if on_partial is not None:
            on_partial({**results, "partial": True})

    from bench.measure import matmul_peak

    t_start = time.perf_counter()
    info = machine_info()
    results: dict[str, Any] = {
        "machine": info,
        "options": {k: v for k, v in asdict(opts).items() if k != "log"},
        "device": str(device()),
        "providers": {n: DESCRIPTIONS[n] for n in opts.providers},
    }
    needs_model = {"throughput", "flops", "memory", "bands", "profile", "engine"} & set(
        opts.workloads
    )
    if needs_model:
        base, tokenizer, model_name = load_base(opts.quick)
        num_steps = opts.warmup + opts.steps
        workload = make_workload(tokenizer, num_steps=num_steps, batch_tokens=opts.batch_tokens)
        workload.extra["model"] = model_name
        results["data"] = {
            "model": model_name,
            "epoch_tokens": workload.epoch_tokens,
            "examples": len(workload.examples),
            "max_length": workload.max_length,
            "loss_on_fastmid": workload.loss_on,
            "loss_on_peft": "all",
            "batch_tokens": workload.batch_tokens,
            "steps": [
                {"real_tokens": workload.real_tokens(i), "padded": list(workload.padded_shape(i))}
                for i in range(num_steps)
            ],
        }
        peaks: dict[str, float] = {}

        def measure_peak(dtype: str) -> None:
            # Best of the measurements around the timed steps: on a shared machine the peak
            # seen once may be a slowed-down one, which would flatter the MFU.
            peak = matmul_peak(DTYPES[dtype], n=1024 if opts.quick else 2048)
            peaks[dtype] = max(peaks.get(dtype, 0.0), peak)
            opts.log(f"[peak] {dtype} matmul {peak / 1e9:.0f} GFLOP/s")

        for dtype in opts.dtypes:
            measure_peak(dtype)
        results["matmul_peak_flop_s"] = peaks
    throughput: list[dict[str, Any]] = []
    state_rows: list[dict[str, Any]] = []
    if {"throughput", "flops", "memory"} & set(opts.workloads):
        for dtype in opts.dtypes:
            rows, states = _throughput_and_state(opts, base, workload, dtype, info)
            measure_peak(dtype)
            throughput += rows
            state_rows += states
        results["throughput"] = throughput
        done()
    if "flops" in opts.workloads:
        results["flops"] = _flops(opts, base, workload, throughput, peaks, info)
        done()
    if "bands" in opts.workloads:
        results["bands"] = _bands(opts, base, workload, info)
        done()
    if {"profile", "engine"} & set(opts.workloads):
        from bench import profile

        names = tuple(n for n in profile.PROFILED if n in opts.providers)
        if "profile" in opts.workloads:
            rows = profile.run_profile(base, workload, opts.dtypes, names, log=opts.log)
            results["profile"] = [_stamp(r, info) for r in rows]
            done()
        if "engine" in opts.workloads:
            rows = profile.run_engine(
                base, workload, opts.dtypes, names, opts.warmup, opts.steps, log=opts.log
            )
            results["engine"] = [_stamp(r, info) for r in rows]
            done()
    if needs_model:
        _free(base)
    if "memory" in opts.workloads:
        results["memory"] = _memory(opts, workload, state_rows, info)
        done()
    if "estimate" in opts.workloads:
        results["estimate"] = _estimate(opts, info)
        done()
    if "kernels" in opts.workloads:
        results["kernels"] = _kernels(opts, out_dir)
        done()
    results["wall_s"] = time.perf_counter() - t_start
    return results
