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
    PROVIDERS,
    REFERENCE,
    SPECS,
    Workload,
    build_provider,
    device,
    load_base,
    make_workload,
)
from fastmid.engine.midblock import PAPER_DROPOUT
from fastmid.engine.models import DTYPES


@dataclass
class SuiteOptions:
    """What to run; ``quick`` shrinks everything so the machinery runs in about a minute."""

    quick: bool = False
    # Default: every workload of WORKLOAD_REGISTRY (defined below, read when built).
    workloads: tuple[str, ...] = field(default_factory=lambda: WORKLOADS)
    providers: tuple[str, ...] = PROVIDERS
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    # Warm-up rounds (discarded) and timed rounds; each round runs every provider once.
    warmup: int = 1
    steps: int = 3
    # Token budget of one step (the trainer's packing bin; PEFT pads the same examples).
    batch_tokens: int = 1024
    # fastmid's loss positions (the trainer's --loss-on; None = its default). The PEFT
    # providers always take the loss on every non-pad token, as HF's collator labels them.
    loss_on: str | None = None
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


def add_ratio(
    rows: list[dict[str, Any]],
    key: str,
    out: str,
    is_ref: Callable[[dict[str, Any]], bool],
    group: Callable[[dict[str, Any]], Any] = lambda r: r["dtype"],
) -> None:
    """``row[out] = row[key] / ref[key]`` where ``ref`` is the row of the same group (dtype by
    default) for which ``is_ref`` holds; rows without a reference or a value get no ratio."""
    refs = {group(r): r for r in rows if is_ref(r)}
    for r in rows:
        ref = refs.get(group(r))
        if ref is not None and r.get(key) is not None and ref.get(key):
            r[out] = r[key] / ref[key]


@dataclass
class Context:
    """What the workloads share: options, machine, and (loaded on first use) the base model,
    the identical data, the matmul peaks and the throughput rows."""

    opts: SuiteOptions
    info: dict[str, Any]
    out_dir: Path
    results: dict[str, Any]
    peaks: dict[str, float] = field(default_factory=dict)
    state_rows: list[dict[str, Any]] = field(default_factory=list)
    _model: tuple[Any, Workload] | None = None

    def model(self) -> tuple[Any, Workload]:
        """(base model, workload), loaded once; records the data and matmul peaks."""
        if self._model is None:
            opts = self.opts
            base, tokenizer, model_name = load_base(opts.quick)
            num_steps = opts.warmup + opts.steps
            workload = make_workload(
                tokenizer, num_steps=num_steps, batch_tokens=opts.batch_tokens, loss_on=opts.loss_on
            )
            workload.extra["model"] = model_name
            self.results["data"] = {
                "model": model_name,
                "epoch_tokens": workload.epoch_tokens,
                "examples": len(workload.examples),
                "max_length": workload.max_length,
                "loss_on_fastmid": workload.loss_on,
                "loss_on_peft": "all",
                "batch_tokens": workload.batch_tokens,
                "steps": [
                    {
                        "real_tokens": workload.real_tokens(i),
                        "padded": list(workload.padded_shape(i)),
                    }
                    for i in range(num_steps)
                ],
            }
            self._model = (base, workload)
            for dtype in opts.dtypes:
                self.measure_peak(dtype)
            self.results["matmul_peak_flop_s"] = self.peaks
        return self._model

    def measure_peak(self, dtype: str) -> None:
        """Best of the measurements around the timed steps: on a shared machine the peak seen
        once may be a slowed-down one, which would flatter the MFU."""
        from bench.measure import matmul_peak

        peak = matmul_peak(DTYPES[dtype], n=1024 if self.opts.quick else 2048)
        self.peaks[dtype] = max(self.peaks.get(dtype, 0.0), peak)
        self.opts.log(f"[peak] {dtype} matmul {peak / 1e9:.0f} GFLOP/s")

    def stamp(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every result row names its machine and commit."""
        label = machine_label(self.info)
        return [{**r, "machine": label, "commit": self.info["commit"]} for r in rows]


# --------------------------------------------------------------------------------------------
# Workloads


def _throughput(ctx: Context) -> list[dict[str, Any]]:
    """Interleaved timing of every provider, one dtype at a time; also each provider's exact
    state bytes (``ctx.state_rows``, for the memory workload)."""
    from bench.measure import state_bytes, time_interleaved

    opts = ctx.opts
    base, workload = ctx.model()
    timed = range(opts.warmup, opts.warmup + opts.steps)
    real = sum(workload.real_tokens(i) for i in timed)
    rows = []
    for dtype in opts.dtypes:
        providers = [build_provider(n, base, dtype) for n in opts.providers]
        opts.log(f"[throughput] {dtype}: {', '.join(opts.providers)} x {opts.steps} steps")
        times = time_interleaved(providers, workload, opts.warmup, opts.steps)
        for p in providers:
            t = times[p.name]
            tok_s = real / sum(t)
            rows.append(
                {
                    "workload": "throughput",
                    "provider": p.name,
                    "dtype": dtype,
                    "model": workload.extra["model"],
                    "shape": " ".join(p.shape(workload, i) for i in timed),
                    "layers": f"{p.layers[0]}-{p.layers[-1]}" if p.layers else "",
                    "rank": p.rank,
                    "steps": len(t),
                    "real_tokens": real,
                    "executed_tokens": sum(p.spec.executed_tokens(workload, i) for i in timed),
                    "step_s_median": statistics.median(t),
                    "step_s_min": min(t),
                    "tokens_per_s": tok_s,
                    "epoch_s_est": workload.epoch_tokens / tok_s,
                }
            )
            state = state_bytes(p, p.batch(workload.step_examples(0), workload.pad_id))
            ctx.state_rows.append(
                {"provider": p.name, "dtype": dtype, "shape": p.shape(workload, 0), **state}
            )
        del providers  # before the next dtype's copies of the model
        ctx.measure_peak(dtype)
    for ref in (REFERENCE, "peft_mid"):
        add_ratio(rows, "tokens_per_s", f"vs_{ref}", lambda r, ref=ref: r["provider"] == ref)
    return ctx.stamp(rows)


def _flops(ctx: Context) -> list[dict[str, Any]]:
    """FLOPs of step 0 per provider (fp32 on CPU: precision does not change the count)."""
    from bench.measure import count_flops, useful_flops

    opts = ctx.opts
    base, workload = ctx.model()
    counts: dict[str, dict[str, int]] = {}
    for name in opts.providers:
        opts.log(f"[flops] {name}")
        p = build_provider(name, base, "fp32", on="cpu")
        executed = count_flops(p, p.batch(workload.step_examples(0), workload.pad_id))
        twin = SPECS[name].useful_twin
        useful = counts[twin]["useful"] if twin in counts else useful_flops(p, workload, 0)
        counts[name] = {"executed": executed, "useful": useful}
    real0 = workload.real_tokens(0)
    rows = []
    for r in ctx.results["throughput"]:
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
                "shape": SPECS[r["provider"]].shape(workload, 0),
                "useful_flops_step0": c["useful"],
                "executed_flops_step0": c["executed"],
                "executed_over_useful": c["executed"] / c["useful"],
                "useful_flops_per_token": per_token,
                "useful_flop_s": achieved,
                "matmul_peak_flop_s": ctx.peaks[r["dtype"]],
                "mfu": achieved / ctx.peaks[r["dtype"]],
            }
        )
    return ctx.stamp(rows)


def _memory(ctx: Context) -> list[dict[str, Any]]:
    """Peak memory of each provider in a fresh process, joined with its exact state bytes."""
    opts = ctx.opts
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    names = opts.providers
    if opts.quick:
        names = [n for n in names if n == REFERENCE or SPECS[n].packed]
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
            if opts.loss_on:
                cmd += ["--loss-on", opts.loss_on]
            if opts.quick:
                cmd.append("--quick")
            res = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
            if res.returncode != 0:
                tail = res.stderr.strip().splitlines()[-1:] or ["no output"]
                raise RuntimeError(f"memory worker for {name} {dtype} failed: {tail[0]}")
            mem = json.loads(res.stdout.strip().splitlines()[-1])
            state = next(
                (s for s in ctx.state_rows if s["provider"] == name and s["dtype"] == dtype), {}
            )
            if SPECS[name].packed:
                shapes = [(1, n) for n in mem["real_tokens"]]
            else:
                shapes = mem["padded_shapes"]
            rows.append(
                {
                    "workload": "memory",
                    "provider": name,
                    "dtype": dtype,
                    "model": mem["model"],
                    "shape": " ".join(f"{b}x{t}" for b, t in shapes),
                    "kind": mem["kind"],
                    "peak_bytes": mem["peak"],
                    "setup_bytes": mem["setup"],
                    "train_bytes": mem["train"],
                    "saved_activation_bytes": state.get("saved"),
                    "grad_bytes": state.get("grads"),
                    "optimizer_bytes": state.get("optimizer"),
                }
            )
    state_keys = ("saved_activation_bytes", "grad_bytes", "optimizer_bytes")
    for r in rows:
        if all(r[k] is not None for k in state_keys):
            r["state_bytes"] = sum(r[k] for k in state_keys)
    is_ref = lambda r: r["provider"] == REFERENCE
    for key, out in (("peak_bytes", "peak"), ("train_bytes", "train"), ("state_bytes", "state")):
        add_ratio(rows, key, f"{out}_vs_{REFERENCE}", is_ref)
    return ctx.stamp(rows)


def _estimate(ctx: Context) -> list[dict[str, Any]]:
    """Estimated CUDA peak memory (bf16 mixed) for real model shapes, fastmid vs PEFT."""
    from bench.estimate import FASTMID_GC, estimate_peak, real_configs, spec

    opts = ctx.opts
    configs = real_configs()
    names = list(opts.providers)
    if opts.quick:
        names = [n for n in names if n == REFERENCE or SPECS[n].packed]
    elif any(SPECS[n].packed for n in names):
        names.append(FASTMID_GC.name)
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
                    "shape": "{}x{}".format(
                        *spec(name).step_shape(opts.estimate_batch, opts.estimate_seq)
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
    is_first = lambda r: r["provider"] == names[0]
    add_ratio(rows, "peak_bytes", f"vs_{names[0]}", is_first, group=lambda r: r["model"])
    return ctx.stamp(rows)


def _time_variants(
    ctx: Context, name: str, what: str, variants: dict[str, dict[str, Any]], warmup: int, steps: int
) -> tuple[str, Any, dict[str, tuple[Any, float, float]], range]:
    """fastmid built once per variant (``build_provider`` keyword arguments under a label),
    the variants timed interleaved on the model workload (logged as ``[name] dtype: what``).
    Returns the dtype, the workload, ``{label: (provider, tokens/s, median step s)}`` and the
    timed step indices."""
    from bench.measure import time_interleaved

    opts = ctx.opts
    base, workload = ctx.model()
    dtype = opts.band_dtype if opts.band_dtype in opts.dtypes else opts.dtypes[0]
    providers = {}
    for label, kwargs in variants.items():
        p = build_provider("fastmid", base, dtype, **kwargs)
        p.name = f"fastmid[{label}]"
        providers[label] = p
    opts.log(f"[{name}] {dtype}: {what}")
    times = time_interleaved(list(providers.values()), workload, warmup, steps)
    timed = range(warmup, warmup + steps)
    real = sum(workload.real_tokens(i) for i in timed)
    measured = {
        label: (p, real / sum(times[p.name]), statistics.median(times[p.name]))
        for label, p in providers.items()
    }
    return dtype, workload, measured, timed


def _bands(ctx: Context) -> list[dict[str, Any]]:
    """fastmid throughput with the band at each placement, the placements interleaved."""
    opts = ctx.opts
    variants = {label: {"band": band} for label, band in BANDS.items()}
    steps = max(opts.steps - 1, 1)
    dtype, workload, measured, timed = _time_variants(
        ctx, "bands", ", ".join(BANDS), variants, opts.warmup, steps
    )
    rows = []
    for label, band in BANDS.items():
        p, tok_s, median = measured[label]
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
                "shape": " ".join(p.shape(workload, i) for i in timed),
                "tokens_per_s": tok_s,
                "step_s_median": median,
            }
        )
    add_ratio(rows, "tokens_per_s", "vs_middle", lambda r: r["band"] == "middle")
    return ctx.stamp(rows)


def _compile(ctx: Context) -> list[dict[str, Any]]:
    """fastmid with eager and with compiled decoder blocks (``--compile off|on``), interleaved:
    the measurement behind ``--compile auto``. Three warm-up rounds at least, since a compiled
    block also compiles its backward and the first new shapes on their first steps."""
    from fastmid.engine.compile import CompileTimer

    opts = ctx.opts
    warmup = max(opts.warmup, 3)
    timer = CompileTimer()
    variants = {f"compile={mode}": {"compile": mode} for mode in ("off", "on")}
    what = f"eager and compiled blocks, {warmup} warm-up rounds"
    dtype, workload, measured, _ = _time_variants(
        ctx, "compile", what, variants, warmup, opts.steps
    )
    compile_s = timer.seconds()
    rows = [
        {
            "workload": "compile",
            "provider": "fastmid",
            "compile": label.removeprefix("compile="),
            "dtype": dtype,
            "dropout": PAPER_DROPOUT,
            "model": workload.extra["model"],
            "tokens_per_s": tok_s,
            "step_s_median": median,
            "compile_s": compile_s if label == "compile=on" else 0.0,
        }
        for label, (_, tok_s, median) in measured.items()
    ]
    add_ratio(rows, "tokens_per_s", "vs_eager", lambda r: r["compile"] == "off")
    return ctx.stamp(rows)


def _kernels(ctx: Context) -> dict[str, Any]:
    """Per-kernel microbenchmarks (CUDA only): pytest-benchmark's JSON, or why they were skipped."""
    opts, out_dir = ctx.opts, ctx.out_dir
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


def _profile_cases(ctx: Context) -> tuple[Any, tuple[str, ...], tuple[str, ...]]:
    from bench import profile

    opts = ctx.opts
    names = tuple(n for n in profile.PROFILED if n in opts.providers)
    # --quick proves the machinery: one precision, the profile of the engine case only.
    dtypes = opts.dtypes[:1] if opts.quick else opts.dtypes
    return profile, names, dtypes


def _profile(ctx: Context) -> list[dict[str, Any]]:
    """One profiled step per provider, self-CPU time grouped by kind of work."""
    profile, names, dtypes = _profile_cases(ctx)
    base, workload = ctx.model()
    cases = ("engine",) if ctx.opts.quick else ("trainer", "engine")
    return ctx.stamp(profile.run_profile(base, workload, dtypes, names, cases, log=ctx.opts.log))


def _engine(ctx: Context) -> list[dict[str, Any]]:
    """model(input_ids, labels) on padded half-prompt batches, providers interleaved."""
    profile, names, dtypes = _profile_cases(ctx)
    base, workload = ctx.model()
    opts = ctx.opts
    rows = profile.run_engine(base, workload, dtypes, names, opts.warmup, opts.steps, log=opts.log)
    return ctx.stamp(rows)


# --------------------------------------------------------------------------------------------


# name -> (workload, workloads whose results it reads). Run in this order.
WORKLOAD_REGISTRY: dict[str, tuple[Callable[[Context], Any], tuple[str, ...]]] = {
    "throughput": (_throughput, ()),
    "flops": (_flops, ("throughput",)),
    "memory": (_memory, ("throughput",)),
    "estimate": (_estimate, ()),
    "bands": (_bands, ()),
    "compile": (_compile, ()),
    "profile": (_profile, ()),
    "engine": (_engine, ()),
    "kernels": (_kernels, ()),
}
WORKLOADS = tuple(WORKLOAD_REGISTRY)


def run_suite(
    opts: SuiteOptions, out_dir: Path, on_partial: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Run the selected workloads (and those they read) and return the results.

    ``on_partial`` is called with the results so far after each workload (the command writes
    reports then, so a long run that is stopped keeps what it measured, marked partial).
    """
    t_start = time.perf_counter()
    info = machine_info()
    results: dict[str, Any] = {
        "machine": info,
        "options": {k: v for k, v in asdict(opts).items() if k != "log"},
        "device": str(device()),
        "providers": {n: SPECS[n].description for n in opts.providers},
    }
    ctx = Context(opts, info, out_dir, results)
    selected = set(opts.workloads)
    selected |= {need for name in opts.workloads for need in WORKLOAD_REGISTRY[name][1]}
    for name, (workload, _) in WORKLOAD_REGISTRY.items():
        if name not in selected:
            continue
        results[name] = workload(ctx)
        results["wall_s"] = time.perf_counter() - t_start
        if on_partial is not None:
            on_partial({**results, "partial": True})
    results["wall_s"] = time.perf_counter() - t_start
    return results


def options_from_cli(quick: bool, **given: Any) -> SuiteOptions:
    """SuiteOptions from ``fastmid bench``'s flags (None = not given); UserError on a bad one."""
    from fastmid.errors import UserError

    overrides: dict[str, Any] = {}
    for name, known in (("workloads", WORKLOADS), ("providers", PROVIDERS), ("dtypes", DTYPES)):
        value = given.get(name)
        if value is None:
            continue
        bad = [v for v in value if v not in known]
        if bad or not value:
            raise UserError(
                f"--{name}: unknown {bad[0] if bad else 'empty list'}; expected "
                f"a comma list of {','.join(known)}"
            )
        overrides[name] = tuple(value)
    for name in ("steps", "warmup", "batch_tokens"):
        value = given.get(name)
        if value is None:
            continue
        if value < (0 if name == "warmup" else 1):
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
        overrides[name] = value
    loss_on = given.get("loss_on")
    if loss_on is not None:
        from fastmid.recipe.config import LOSS_ON

        if loss_on not in LOSS_ON:
            raise UserError(f"--loss-on must be one of {'|'.join(LOSS_ON)}, got {loss_on!r}")
        overrides["loss_on"] = loss_on
    if "providers" in overrides and REFERENCE not in overrides["providers"]:
        raise UserError(f"--providers must include {REFERENCE}: every ratio is against it")
    return SuiteOptions.quick_defaults(**overrides) if quick else SuiteOptions(**overrides)


def command(options: SuiteOptions, out_dir: Path) -> int:
    """``fastmid bench`` once its flags are checked: run, print the tables, write reports."""
    from bench import report

    results = run_suite(options, out_dir, on_partial=lambda r: report.write_reports(r, out_dir))
    written = report.write_reports(results, out_dir)
    print(report.summary_tables(results))
    print(f"wrote {len(written)} files to {out_dir} in {results['wall_s']:.0f} s")
    return 0
