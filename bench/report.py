"""Reports of a suite run: a printed table, ``results.json``, one CSV per workload, PNG plots.

Every file is written atomically (temp file + rename), so an interrupted run never leaves a
half-written report that looks complete.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from bench.tables import csv_bytes, markdown_table
from fastmid.fileio import write_bytes_atomic

CSV_WORKLOADS = ("throughput", "flops", "memory", "estimate", "bands", "compile")
PLOTS = {
    "throughput": "throughput.png",
    "flops": "mfu.png",
    "memory": "memory.png",
    "estimate": "estimate.png",
    "bands": "bands.png",
}
GB = 1024**3
MB = 1024**2


# --------------------------------------------------------------------------------------------
# Text tables


def _fmt_ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}x"


def summary_tables(results: dict[str, Any]) -> str:
    """Markdown tables of every workload present in ``results``."""
    parts = []
    flops = {(r["provider"], r["dtype"]): r for r in results.get("flops", [])}
    if results.get("throughput"):
        rows = []
        for r in results["throughput"]:
            f = flops.get((r["provider"], r["dtype"]))
            rows.append(
                [
                    r["provider"],
                    r["dtype"],
                    f"{r['tokens_per_s']:.0f}",
                    _fmt_ratio(r.get("vs_peft_all")),
                    _fmt_ratio(r.get("vs_peft_mid")),
                    f"{r['epoch_s_est'] / 60:.1f}",
                    "" if f is None else f"{f['useful_flops_per_token'] / 1e9:.2f}",
                    "" if f is None else f"{f['executed_over_useful']:.2f}",
                    "" if f is None else f"{100 * f['mfu']:.0f}%",
                ]
            )
        parts.append(
            "Training throughput (real tokens/s, identical batches, providers interleaved)\n\n"
            + markdown_table(
                [
                    "provider",
                    "precision",
                    "tokens/s",
                    "vs peft_all",
                    "vs peft_mid",
                    "epoch (min, est.)",
                    "useful GFLOP/token",
                    "executed/useful",
                    "MFU",
                ],
                rows,
            )
        )
    if results.get("memory"):
        rows = []
        for r in results["memory"]:
            state = [r.get(k) for k in ("saved_activation_bytes", "grad_bytes", "optimizer_bytes")]
            rows.append(
                [
                    r["provider"],
                    r["dtype"],
                    f"{r['peak_bytes'] / MB:.0f}",
                    _fmt_ratio(r.get("peak_vs_peft_all")),
                    f"{r['train_bytes'] / MB:.0f}",
                    _fmt_ratio(r.get("train_vs_peft_all")),
                    "/".join("" if s is None else f"{s / MB:.0f}" for s in state),
                    _fmt_ratio(r.get("state_vs_peft_all")),
                ]
            )
        kind = results["memory"][0]["kind"]
        parts.append(
            f"Peak training memory ({kind}, fresh process per provider; MiB)\n\n"
            + markdown_table(
                [
                    "provider",
                    "precision",
                    "peak",
                    "vs peft_all",
                    "above set-up",
                    "vs peft_all",
                    "saved/grads/optim (exact)",
                    "vs peft_all",
                ],
                rows,
            )
        )
    if results.get("estimate"):
        ref = next(k for k in results["estimate"][0] if k.startswith("vs_"))
        rows = [
            [
                r["model"],
                r["provider"],
                r["shape"],
                f"{r['weights_bytes'] / GB:.1f}",
                f"{(r['step_peak_bytes'] + r['optimizer_bytes']) / GB:.1f}",
                f"{r['peak_bytes'] / GB:.1f}",
                _fmt_ratio(r[ref]),
            ]
            for r in results["estimate"]
        ]
        parts.append(
            "ESTIMATED CUDA peak memory, bf16 mixed precision (FakeTensor trace; GiB)\n\n"
            + markdown_table(
                [
                    "model",
                    "provider",
                    "batch",
                    "weights",
                    "activations+grads+optim",
                    "peak",
                    ref.replace("_", " "),
                ],
                rows,
            )
        )
    if results.get("bands"):
        rows = [
            [
                r["band"],
                r["layers"],
                str(r["rank"]),
                r["dtype"],
                f"{r['tokens_per_s']:.0f}",
                _fmt_ratio(r["vs_middle"]),
            ]
            for r in results["bands"]
        ]
        parts.append(
            "fastmid band placement (throughput)\n\n"
            + markdown_table(["band", "layers", "rank", "precision", "tokens/s", "vs middle"], rows)
        )
    if results.get("compile"):
        rows = [
            [
                r["compile"],
                r["dtype"],
                f"{r['dropout']:g}",
                f"{r['tokens_per_s']:.0f}",
                _fmt_ratio(r["vs_eager"]),
                f"{r['compile_s']:.0f}",
            ]
            for r in results["compile"]
        ]
        parts.append(
            "fastmid with compiled decoder blocks (--compile; providers interleaved)\n\n"
            + markdown_table(
                ["compile", "precision", "dropout", "tokens/s", "vs eager", "compile s"], rows
            )
        )
    if results.get("engine") or results.get("profile"):
        from bench.profile import engine_table, profile_table

        if results.get("engine"):
            parts.append(
                "Engine: model(input_ids, labels) on padded 4x256 batches, half prompt "
                "(best step, providers interleaved)\n\n" + engine_table(results["engine"])
            )
        if results.get("profile"):
            parts.append(
                "Where a step goes (ms of self CPU time, one profiled step)\n\n"
                + profile_table(results["profile"])
            )
    if results.get("matmul_peak_flop_s"):
        peaks = ", ".join(
            f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in results["matmul_peak_flop_s"].items()
        )
        parts.append(f"Measured matmul peak in this run: {peaks}")
    info = results["machine"]
    parts.append(
        f"Machine: {info['cpu']} ({info['cpu_cores']} cores, {info['torch_threads']} torch "
        f"threads), GPU: {info['gpu'] or 'none'}; torch {info['torch']}, transformers "
        f"{info['transformers']}, peft {info['peft']}; commit {info['commit']}"
        f"{' (with local changes)' if info['dirty'] else ''}"
    )
    return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------
# Plots


def _bars(ax: Any, groups: list[str], series: dict[str, list[float]], ylabel: str) -> None:
    width = 0.8 / max(len(series), 1)
    for k, (label, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
        bars = ax.bar(xs, values, width, label=label)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)


def _plot(results: dict[str, Any], workload: str) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results.get(workload) or []
    if not rows or workload not in PLOTS:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4))
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    if workload in ("throughput", "flops", "memory"):
        providers = list(dict.fromkeys(r["provider"] for r in rows))
        key, scale, ylabel, title = {
            "throughput": ("tokens_per_s", 1, "real tokens / s", "Training throughput"),
            "flops": ("mfu", 100, "MFU (% of measured matmul peak)", "Useful-FLOP utilisation"),
            "memory": ("peak_bytes", 1 / MB, "MiB", "Peak training memory"),
        }[workload]
        if workload == "memory":
            title += f" ({rows[0]['kind']})"
        series = {
            d: [
                next((r[key] * scale for r in rows if r["provider"] == p and r["dtype"] == d), 0.0)
                for p in providers
            ]
            for d in dtypes
        }
        _bars(ax, providers, series, ylabel)
    elif workload == "estimate":
        models = list(dict.fromkeys(r["model"] for r in rows))
        providers = list(dict.fromkeys(r["provider"] for r in rows))
        series = {
            p: [
                next(r["peak_bytes"] / GB for r in rows if r["model"] == m and r["provider"] == p)
                for m in models
            ]
            for p in providers
        }
        _bars(ax, models, series, "GiB (estimate)")
        title = f"ESTIMATED CUDA peak memory, bf16 mixed, batch {rows[0]['shape']}"
    else:  # bands
        series = {dtypes[0]: [r["tokens_per_s"] for r in rows]}
        _bars(
            ax,
            [f"{r['band']}\n{r['layers']} r={r['rank']}" for r in rows],
            series,
            "real tokens / s",
        )
        title = "fastmid band placement"
    model = rows[0].get("model", "")
    sub = "" if workload == "estimate" else f" — {model}"
    ax.set_title(f"{title}{sub}\n{rows[0]['machine']}", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_reports(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write results.json, <workload>.csv, <plot>.png and summary.md into ``out_dir``."""
    written = []
    for workload in CSV_WORKLOADS:
        if results.get(workload):
            path = out_dir / f"{workload}.csv"
            write_bytes_atomic(path, csv_bytes(results[workload]))
            written.append(path)
        png = _plot(results, workload)
        if png is not None:
            path = out_dir / PLOTS[workload]
            write_bytes_atomic(path, png)
            written.append(path)
    from bench.profile import write_reports as write_profile_reports

    written += write_profile_reports(results, out_dir)
    path = out_dir / "summary.md"
    write_bytes_atomic(path, summary_tables(results).encode())
    written.append(path)
    # results.json last: its presence marks a complete report.
    path = out_dir / "results.json"
    write_bytes_atomic(path, (json.dumps(results, indent=1, default=str) + "\n").encode())
    written.append(path)
    return written
