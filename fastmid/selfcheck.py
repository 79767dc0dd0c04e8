"""``fastmid selfcheck``: prove the kernels' execution path on this machine in one command.

On a CUDA machine (one GPU: a few minutes) it runs, in order:
- the CUDA-marked tests (``pytest -m gpu``, when the source checkout's tests are present; any
  skipped one makes the section "not checked");
- every op in bf16 and fp16 against an fp64 reference at real layer shapes (hidden 576 to
  5120, ranks 16-128, up to 16k tokens), forward and every gradient, with dropout on, under
  the kernel tests' tolerance rule (`fastmid.kernels.tolerance`);
- microbenchmarks (`triton.testing.do_bench`) of each fused op against the unfused torch
  composition (PEFT-style), forward + backward, at 1B / 7B / 8B layer shapes: ms, TFLOP/s, %
  of the device's bf16 peak, speed-up;
- a 30-step ``fastmid train`` of the embedded model, its peak memory next to the FakeTensor
  estimate of `fastmid.recipe.estimate` (and the micro-batch `--batch-tokens auto` chose);
- with two or more GPUs, a 2-process DDP step against one process;
- the ahead-of-time compile report (`fastmid.kernels.cubin_report`) for sm_80 and sm_90.

Without CUDA it runs the interpreter numerics (fp32 and fp16, small shapes) and the compile
report, and marks every GPU-only section "not checked" with the reason. One JSON report is
written (atomically) and a table printed; the exit status is 1 when any section failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fastmid.fileio import write_text_atomic

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Section:
    """One part of the check: "pass", "fail" or "not checked", why, and its measurements."""

    name: str
    status: str
    detail: str
    seconds: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Numerics: every op against the fp64 reference, forward and every gradient
# --------------------------------------------------------------------------------------------


def _op_cases(cuda: bool, quick: bool) -> list[dict[str, Any]]:
    """(op, M, K, N or (Nq, Nk, Nv) or I, rank) cases: real layer shapes on CUDA, small odd
    shapes under the interpreter."""
    if cuda:
        cases = [
            ("lora_linear", 4096, 576, 576, 16),
            ("lora_linear", 16384, 2048, 2048, 64),
            ("lora_linear", 8192, 4096, 4096, 128),
            ("lora_linear", 4096, 5120, 5120, 32),
            ("lora_qkv", 4096, 576, (576, 192, 192), 64),
            ("lora_qkv", 8192, 4096, (4096, 1024, 1024), 16),
            ("lora_qkv", 4096, 5120, (5120, 1024, 1024), 128),
            ("lora_gate_up", 4096, 576, 1536, 64),
            ("lora_gate_up", 16384, 2048, 8192, 128),
            ("lora_gate_up", 4096, 4096, 14336, 16),
        ]
        dtypes = ("bfloat16", "float16")
    else:
        cases = [
            ("lora_linear", 67, 48, 40, 16),
            ("lora_qkv", 53, 40, (32, 16, 16), 16),
            ("lora_gate_up", 45, 40, 36, 16),
        ]
        if not quick:
            cases += [
                ("lora_linear", 150, 96, 80, 128),
                ("lora_qkv", 70, 64, (64, 32, 32), 64),
                ("lora_gate_up", 90, 64, 72, 64),
            ]
        dtypes = ("float32",) if quick else ("float32", "float16")
    return [
        {"op": op, "m": m, "k": k, "n": n, "rank": r, "dtype": dt, "dropout": 0.05}
        for op, m, k, n, r in cases
        for dt in dtypes
    ]


def _check_op(case: dict[str, Any], device: str) -> dict[str, Any]:
    """Run one op case: its results vs the fp64 reference and plain torch in the same dtype."""
    import torch

    from fastmid import kernels
    from fastmid.kernels._common import triton_keep_mask
    from fastmid.kernels.tolerance import check

    torch.manual_seed(0)
    dtype = getattr(torch, case["dtype"])
    op, m, k, r, p, seed = case["op"], case["m"], case["k"], case["rank"], case["dropout"], 17
    # Output sizes of the members: one linear, q/k/v, or gate and up (I each).
    if op == "lora_qkv":
        sizes = list(case["n"])
    else:
        sizes = [case["n"]] * (2 if op == "lora_gate_up" else 1)
    x = torch.randn(m, k, device=device, dtype=dtype)
    w = (torch.randn(sum(sizes), k, device=device) / math.sqrt(k)).to(dtype)
    a_list = [torch.randn(r, k, device=device, dtype=dtype) / math.sqrt(k) for _ in sizes]
    b_list = [torch.randn(n, r, device=device, dtype=dtype) / math.sqrt(r) for n in sizes]
    scale = 2.0
    keep = triton_keep_mask((m, k), p, seed, torch.device(device))

    def fused(x_, w_, a_, b_):
        if op == "lora_linear":
            return (kernels.lora_linear(x_, w_, a_[0], b_[0], scale, None, p, seed),)
        if op == "lora_qkv":
            return kernels.lora_qkv(x_, w_, *a_, *b_, scale, None, p, seed)
        return (kernels.lora_gate_up(x_, w_, *a_, *b_, scale, p, seed),)

    def reference(x_, w_, a_, b_):
        kp = keep.to(x_.dtype)
        if op == "lora_linear":
            return (kernels.lora_linear_reference(x_, w_, a_[0], b_[0], scale, None, p, keep=kp),)
        if op == "lora_qkv":
            return kernels.lora_qkv_reference(x_, w_, *a_, *b_, scale, None, p, keep=kp)
        return (kernels.lora_gate_up_reference(x_, w_, *a_, *b_, scale, p, keep=kp),)

    upstream = [torch.randn(m, n, device=device, dtype=torch.float64) for n in sizes]
    if op == "lora_gate_up":
        upstream = upstream[:1]

    def run(fn, dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in (x, *a_list, *b_list)]
        xs, rest = leaves[0], leaves[1:]
        outs = fn(xs, w.to(dt), rest[: len(a_list)], rest[len(a_list) :])
        loss = sum((o.double() * u).sum() for o, u in zip(outs, upstream, strict=True))
        loss.backward()
        return [o.detach() for o in outs] + [t.grad for t in leaves]

    got = run(fused, dtype)
    want = run(reference, torch.float64)
    base = run(reference, dtype)
    names = [f"out{i}" for i in range(len(upstream))] + ["dx"]
    names += [f"dA{i}" for i in range(len(a_list))] + [f"dB{i}" for i in range(len(b_list))]
    checks = [check(n, g, w64, b) for n, g, w64, b in zip(names, got, want, base, strict=True)]
    worst = max(checks, key=lambda c: c.error / max(c.bound, 1e-30))
    n = case["n"] if not isinstance(case["n"], tuple) else "+".join(map(str, case["n"]))
    return {
        "op": op,
        "dtype": case["dtype"],
        "shape": f"M={m} K={k} N={n} r={r}",
        "ok": all(c.ok for c in checks),
        "worst": worst.message(),
        "failures": [c.message() for c in checks if not c.ok],
    }


def numerics_worker(quick: bool) -> list[dict[str, Any]]:
    """Every numerics case on this process's device (run with TRITON_INTERPRET=1 on a CPU)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return [_check_op(case, device) for case in _op_cases(device == "cuda", quick)]


def check_numerics(cuda: bool, quick: bool) -> Section:
    # A child process: without CUDA the kernels must be decorated under the interpreter, which
    # is read when they are first imported.
    env = dict(os.environ)
    if not cuda:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "fastmid.selfcheck", "--numerics-worker"]
    proc = subprocess.run(
        cmd + (["--quick"] if quick else []), env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        return Section("numerics", "fail", _tail(proc.stderr))
    rows = json.loads(proc.stdout)
    failed = [r for r in rows if not r["ok"]]
    where = "CUDA kernels, bf16 and fp16" if cuda else "Triton interpreter on CPU, fp32/fp16"
    detail = f"{len(rows) - len(failed)}/{len(rows)} op cases within torch's error ({where})"
    if failed:
        detail += "; first failure: " + failed[0]["op"] + " " + failed[0]["failures"][0]
    return Section("numerics", "fail" if failed else "pass", detail, rows=rows)


# --------------------------------------------------------------------------------------------
# CUDA-only sections
# --------------------------------------------------------------------------------------------


def check_gpu_tests(tests: Path = REPO_ROOT / "tests") -> Section:
    """``pytest -m gpu`` over ``tests``: a pass only when every GPU test ran and passed. A
    skipped test (a missing package such as liger_kernel) checked nothing, so any skip makes
    the section "not checked", with the reasons."""
    import xml.etree.ElementTree as ET

    if not tests.is_dir():
        return Section("gpu tests", "not checked", "the source checkout's tests/ is not present")
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "gpu-tests.xml"
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-m", "gpu", f"--junitxml={junit}", str(tests)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        cases = ET.parse(junit).getroot().iter("testcase") if junit.exists() else iter(())
        outcomes = [(c.find("failure"), c.find("error"), c.find("skipped")) for c in cases]
    failed = sum(f is not None or e is not None for f, e, _ in outcomes)
    skips = [s for f, e, s in outcomes if s is not None and f is None and e is None]
    passed = len(outcomes) - failed - len(skips)
    if failed or proc.returncode not in (0, 5):  # 5: nothing collected
        lines = (proc.stdout.strip() or proc.stderr.strip() or "no output").splitlines()
        return Section("gpu tests", "fail", f"{failed} failed, {passed} passed: {lines[-1]}")
    if not outcomes:
        return Section("gpu tests", "not checked", "no GPU test was collected")
    if skips:
        reasons = sorted({s.get("message", "").strip() for s in skips})
        detail = f"{passed} passed, {len(skips)} skipped: {'; '.join(reasons)}"
        return Section("gpu tests", "not checked", detail)
    return Section("gpu tests", "pass", f"{passed} passed")


# (model, hidden, (q, k, v) sizes, intermediate) of the benchmarked layers.
LAYER_SHAPES = {
    "OLMo2-1B": (2048, (2048, 2048, 2048), 8192),
    "OLMo2-7B": (4096, (4096, 4096, 4096), 11008),
    "Llama-3-8B": (4096, (4096, 1024, 1024), 14336),
}


def _device_peak_tflops() -> float | None:
    import torch

    from bench.machine import bf16_peak_tflops

    return bf16_peak_tflops(torch.cuda.get_device_name())


def _bench_layer(model: str, shapes: tuple, tokens: int, rank: int, peak: float | None):
    """Rows of fused vs unfused forward + backward (bf16, dropout on) for one model's layer."""
    import torch
    import torch.nn.functional as F
    import triton

    from fastmid import kernels

    hidden, qkv, inter = shapes
    dt, p, s = torch.bfloat16, 0.05, 2.0
    x = torch.randn(tokens, hidden, device="cuda", dtype=dt, requires_grad=True)

    def lora(n):
        a = (torch.randn(rank, hidden, device="cuda") / hidden**0.5).requires_grad_()
        b = (torch.randn(n, rank, device="cuda") / rank**0.5).requires_grad_()
        return a, b

    def frozen(n):
        return torch.randn(n, hidden, device="cuda", dtype=dt) / hidden**0.5

    def unfused(w, a, b):
        # The PEFT composition: base linear, dropout on x, two adapter matmuls, add.
        return F.linear(x, w) + s * F.linear(F.linear(F.dropout(x, p), a.to(dt)), b.to(dt))

    w_o, ab_o = frozen(hidden), lora(hidden)
    w_qkv, ab_qkv = frozen(sum(qkv)), [lora(n) for n in qkv]
    a_qkv, b_qkv = [a for a, _ in ab_qkv], [b for _, b in ab_qkv]
    w_gu, (ab_g, ab_u) = frozen(2 * inter), (lora(inter), lora(inter))
    w_g, w_u = w_gu.split(inter)
    cases = [
        ("lora_linear (o)", hidden * hidden,
         lambda: kernels.lora_linear(x, w_o, *ab_o, s, dropout_p=p),
         lambda: unfused(w_o, *ab_o)),
        ("lora_qkv", hidden * sum(qkv),
         lambda: kernels.lora_qkv(x, w_qkv, *a_qkv, *b_qkv, s, dropout_p=p),
         lambda: [unfused(w, *ab) for w, ab in zip(w_qkv.split(list(qkv)), ab_qkv, strict=True)]),
        ("lora_gate_up", hidden * 2 * inter,
         lambda: kernels.lora_gate_up(x, w_gu, ab_g[0], ab_u[0], ab_g[1], ab_u[1], s, p),
         lambda: F.silu(unfused(w_g, *ab_g)) * unfused(w_u, *ab_u)),
    ]  # fmt: skip

    def step(fn):
        out = fn()
        outs = out if isinstance(out, (list, tuple)) else [out]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    rows = []
    for name, weight_elems, fused_fn, unfused_fn in cases:
        # Forward + backward of the frozen base: y and dx (no dW), 2 GEMMs of 2·M·K·N each.
        flops = 4 * tokens * weight_elems
        ms_fused = triton.testing.do_bench(lambda f=fused_fn: step(f), grad_to_none=[x])
        ms_unfused = triton.testing.do_bench(lambda f=unfused_fn: step(f), grad_to_none=[x])
        tflops = flops / ms_fused / 1e9
        rows.append({
            "model": model, "op": name, "tokens": tokens, "rank": rank,
            "ms_fused": round(ms_fused, 3), "ms_unfused": round(ms_unfused, 3),
            "tflops_fused": round(tflops, 1),
            "pct_bf16_peak": None if peak is None else round(100 * tflops / peak, 1),
            "speedup": round(ms_unfused / ms_fused, 2),
        })  # fmt: skip
    return rows


def check_microbench(tokens: int = 8192, rank: int = 64) -> Section:
    """Fused op vs the unfused torch composition, forward + backward, bf16."""
    peak = _device_peak_tflops()
    rows = [
        row
        for model, shapes in LAYER_SHAPES.items()
        for row in _bench_layer(model, shapes, tokens, rank, peak)
    ]
    slowest = min(rows, key=lambda r: r["speedup"])
    detail = (
        f"{len(rows)} op x shape pairs, speed-up {slowest['speedup']}x (lowest: "
        f"{slowest['model']} {slowest['op']}) to {max(r['speedup'] for r in rows)}x"
    )
    return Section("microbench", "pass", detail, rows=rows)


def check_train(model: str | None = None, steps: int = 30) -> Section:
    """A short `fastmid train` of `model` (default: the embedded model); peak memory vs the
    FakeTensor estimate."""
    import torch

    from fastmid.recipe.config import TrainConfig
    from fastmid.recipe.train import train

    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(model=model, output_dir=out, max_steps=steps, eval=False, log_every=10)
        summary = train(cfg)
    peak = torch.cuda.max_memory_allocated() / 2**30
    row: dict[str, Any] = {
        "steps": summary["steps"],
        "loss_first": summary["loss_first"],
        "loss_last": summary["loss_last"],
        "tokens_per_s": round(summary["tokens_per_s"]),
        "peak_gib": round(peak, 3),
        "flash_attn": _installed("flash_attn"),
        "liger_kernel": _installed("liger_kernel"),
    }
    estimate = _fake_estimate(cfg, summary["resolved"]["batch_tokens"])
    row["estimate_gib"] = round(estimate, 3)
    ok = summary["steps"] == steps and math.isfinite(summary["loss_last"])
    detail = f"{summary['steps']} steps, loss {summary['loss_first']:.3f} → "
    detail += f"{summary['loss_last']:.3f}, peak {peak:.2f} GiB"
    detail += f" (FakeTensor estimate {estimate:.2f} GiB)"
    return Section("train", "pass" if ok else "fail", detail, rows=[row])


def _fake_estimate(cfg: Any, batch_tokens: int) -> float:
    """The FakeTensor estimate of one step of this run (micro-batches of ``batch_tokens``)."""
    from transformers import AutoConfig

    from fastmid.engine.models import default_model_dir
    from fastmid.recipe.estimate import FastmidStepTracer

    config = AutoConfig.from_pretrained(cfg.model or default_model_dir())
    return FastmidStepTracer(config, cfg.midblock)(batch_tokens, cfg.max_length).peak / 2**30


def check_ddp() -> Section:
    """Two processes (nccl) against one: the same losses after two steps."""
    losses = {}
    for nproc in (1, 2):
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "fastmid", "train", "--max-steps", "2", "--nproc",
                   str(nproc), "--output-dir", out, "--no-eval", "--dropout", "0.0"]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                return Section("ddp", "fail", f"nproc={nproc}: {_tail(proc.stderr)}")
            losses[nproc] = json.loads((Path(out) / "summary.json").read_text())["loss_last"]
    ok = math.isclose(losses[1], losses[2], rel_tol=1e-3)
    detail = f"loss after 2 steps: 1 process {losses[1]:.5f}, 2 processes {losses[2]:.5f}"
    return Section("ddp", "pass" if ok else "fail", detail)


# --------------------------------------------------------------------------------------------
# Compile report (no GPU needed)
# --------------------------------------------------------------------------------------------


def check_cubins(quick: bool, jobs: int) -> Section:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    rows = []
    for arch in (80, 90):
        cmd = [sys.executable, "-m", "fastmid.kernels.cubin_report", "--arch", str(arch),
               "--json", "--summary", "--jobs", str(jobs)]  # fmt: skip
        if quick:
            cmd += ["--kernel", "lora_linear_fwd_xa"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if not proc.stdout.strip():
            return Section("cubin report", "fail", f"sm_{arch}: {_tail(proc.stderr)}")
        rows += json.loads(proc.stdout)
    bad = [r for r in rows if not r["ok"]]
    scope = "the thin GEMM only" if quick else "every kernel x shipped config"
    detail = f"{len(rows) - len(bad)}/{len(rows)} kernels ok for sm_80 and sm_90 ({scope})"
    if bad:
        detail += "; failing: " + ", ".join(f"{r['kernel']} sm_{r['arch']}" for r in bad)
    return Section("cubin report", "fail" if bad else "pass", detail, rows=rows)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


def _timed(name: str, fn: Callable[[], Section]) -> Section:
    start = time.perf_counter()
    try:
        section = fn()
    except Exception as err:  # a crashing section is a failed check, not a crashed command
        section = Section(name, "fail", f"{type(err).__name__}: {err}")
    section.seconds = round(time.perf_counter() - start, 1)
    return section


def selfcheck(
    quick: bool = False,
    jobs: int = 2,
    model: str | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run every section this machine allows; returns the report. `progress` receives the
    report so far after each section (a timed-out run still leaves what it finished)."""
    import torch
    import triton

    cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    no_cuda = "needs a CUDA device (none found)"
    report: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "gpus": gpus,
        },
        "quick": quick,
        "model": model or "embedded",
        "ok": True,
        "sections": [],
    }

    def add(section: Section) -> None:
        report["sections"].append(asdict(section))
        report["ok"] = report["ok"] and section.status != "fail"
        if progress is not None:
            progress(report)

    def ddp() -> Section:
        if gpus < 2:
            return Section("ddp", "not checked", f"needs 2 GPUs, found {gpus}")
        return check_ddp()

    plan: list[tuple[str, Callable[[], Section] | None]] = [
        ("gpu tests", check_gpu_tests if cuda else None),
        ("numerics", lambda: check_numerics(cuda, quick)),
        ("microbench", check_microbench if cuda else None),
        ("train", (lambda: check_train(model)) if cuda else None),
        ("ddp", ddp if cuda else None),
        ("cubin report", lambda: check_cubins(quick, jobs)),
    ]
    for name, step in plan:
        add(_timed(name, step) if step is not None else Section(name, "not checked", no_cuda))
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as a table: one line per section, then the measured rows of some."""
    lines = [f"{'section':<14} {'status':<12} {'secs':>6}  detail", "-" * 72]
    for s in report["sections"]:
        lines.append(f"{s['name']:<14} {s['status']:<12} {s['seconds']:>6}  {s['detail']}")
    for s in report["sections"]:
        if s["name"] == "microbench" and s["rows"]:
            lines += ["", "model        op               ms fused  ms torch  TFLOP/s  %peak  x"]
            for r in s["rows"]:
                pct = "-" if r["pct_bf16_peak"] is None else r["pct_bf16_peak"]
                lines.append(
                    f"{r['model']:<12} {r['op']:<16} {r['ms_fused']:>8} {r['ms_unfused']:>9} "
                    f"{r['tflops_fused']:>8} {pct:>6} {r['speedup']:>4}"
                )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="selfcheck.json", help="where the JSON report goes")
    parser.add_argument(
        "--quick", action="store_true", help="a reduced subset (CPU numerics, one compile)"
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    parser.add_argument(
        "--model", default=None, help="model of the train section (default: the embedded model)"
    )


def run(args: argparse.Namespace) -> int:
    def save(report: dict[str, Any]) -> None:
        write_text_atomic(args.output, json.dumps(report, indent=1) + "\n")

    report = selfcheck(quick=args.quick, jobs=args.jobs, model=args.model, progress=save)
    print(format_report(report))
    print(f"\nreport: {args.output}")
    return 0 if report["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m fastmid.selfcheck``; ``--numerics-worker`` is the numerics child process."""
    argv = sys.argv[1:] if argv is None else argv
    if "--numerics-worker" in argv:
        print(json.dumps(numerics_worker(quick="--quick" in argv)))
        return 0
    parser = argparse.ArgumentParser(prog="fastmid selfcheck", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
