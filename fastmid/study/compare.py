"""``fastmid compare``: the same short training at several depth placements, compared fairly.

Every run gets the same data, steps, seed and adapter budget (budget-matched rank); only the
band changes, and the LoRA scale follows one explicit policy:

- ``fixed``: alpha constant (the paper), so the scale alpha/r shrinks as the band narrows;
- ``ratio``: alpha/r held at the all-layer value alpha/rank_budget — "where" without "how
  strongly";
- ``rslora``: alpha/√r.

Placements: ``bottom``, ``middle`` and ``top`` are equal-width bands (``--width`` layers,
default the width of the 20%–80% band, so ``middle`` is the default band) at the bottom, centre
and top of the network; ``all`` is standard LoRA; ``auto`` is the band the chosen criterion
picks on the training data; any other band is given as ``6-23``, or with ``--band`` in every
form ``fastmid train --band`` takes.

Each run trains through :func:`fastmid.recipe.train.train` in its own process (its time and peak
memory are its own), then reloads the base model with the adapter and measures held-out accuracy
(GSM8K protocol), answer NLL per token on the held-out records, perplexity on general text
(forgetting), and reports train time, tokens/s, peak memory and trainable parameters. Results
are cached per run under ``<output-dir>/runs/``: an interrupted compare continues where it
stopped, and adding seeds or placements reuses what is there. Output: ``results.csv``,
``results.json``, ``results.md`` (table + verdict) and ``compare.png``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import multiprocessing
import shutil
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastmid.engine.midblock import parse_band
from fastmid.errors import UserError
from fastmid.fileio import write_text_atomic
from fastmid.options import add_field_arguments
from fastmid.outdir import holds_output_dir, user_entries
from fastmid.recipe.bandgain import AUTO_CRITERIA, AUTO_CRITERION
from fastmid.recipe.config import TrainConfig, build_config, config_fields

PLACEMENTS = ("bottom", "middle", "top", "all", "auto")
ALPHA_POLICIES = ("fixed", "ratio", "rslora")
# What fastmid train ships (alpha fixed, scale alpha/rank): a compare without --alpha-policy
# measures exactly the recipe a train user gets.
DEFAULT_ALPHA_POLICY = "fixed"
# (key, label, lower is better): the quality metrics, then the cost columns.
METRICS: tuple[tuple[str, str, bool], ...] = (
    ("answer_nll", "answer NLL/token", True),
    ("accuracy", "accuracy", False),
    ("general_ppl", "general-text ppl", True),
    ("train_seconds", "train s", True),
    ("tokens_per_s", "tokens/s", False),
    ("peak_mem_gb", "peak mem GB", True),
)
# The verdict and the plot's main panel rank placements by this metric: at small scale answer
# NLL separates placements long before accuracy on a few dozen problems can.
PRIMARY = "answer_nll"
# Fields of TrainConfig that `fastmid compare` passes through to every run unchanged.
PASSTHROUGH = (
    "model",
    "data",
    "format",
    "max_length",
    "loss_on",
    "rank_budget",
    "alpha",
    "dropout",
    "targets",
    "precision",
    "lr",
    "batch_tokens",
    "grad_accum",
    "epochs",
    "max_steps",
    "max_quality_gap",
)


# --------------------------------------------------------------------------------------------
# Placements and scale policies


def placement_band(name: str, num_layers: int, width: int) -> list[int]:
    """Layers of a named placement (bottom/middle/top/all) or a band spec in a ``L``-layer model.

    ``bottom``/``middle``/``top`` are ``width`` contiguous layers at the start, the centre (the
    default 20%–80% band when ``width`` is its width) and the end of depth.
    """
    from fastmid.engine.midblock import PAPER_BAND, resolve_band

    if not 1 <= width <= num_layers:
        raise UserError(f"--width must be between 1 and the model's {num_layers} layers")
    if name == "bottom":
        return list(range(width))
    if name == "top":
        return list(range(num_layers - width, num_layers))
    if name == "middle":
        default = resolve_band(PAPER_BAND, num_layers)
        if len(default) == width:
            return default
        start = (num_layers - width) // 2
        return list(range(start, start + width))
    band = parse_band(name)
    if band == "auto":
        raise ValueError("auto is resolved by a band criterion, not by placement_band")
    return resolve_band(band, num_layers)


def policy_alpha(policy: str, alpha: float, rank: int, rank_budget: int) -> tuple[float, bool]:
    """``(alpha, use_rslora)`` that give a band of LoRA rank ``rank`` the policy's scale.

    fixed: scale alpha/rank; ratio: alpha/rank_budget (the all-layer value, whatever the band);
    rslora: alpha/√rank.
    """
    if policy == "fixed":
        return alpha, False
    if policy == "ratio":
        return alpha * rank / rank_budget, False
    if policy == "rslora":
        return alpha, True
    raise UserError(f"--alpha-policy must be one of {'|'.join(ALPHA_POLICIES)}, got {policy!r}")


def layers_label(layers: Sequence[int]) -> str:
    """``6-23`` for a contiguous band, ``3,5,7`` otherwise."""
    contiguous = list(layers) == list(range(layers[0], layers[-1] + 1))
    return f"{layers[0]}-{layers[-1]}" if contiguous else ",".join(map(str, layers))


# --------------------------------------------------------------------------------------------
# One run: its config, training in a fresh process, evaluation of the adapter


@dataclass
class Plan:
    """One training run of the comparison."""

    placement: str
    layers: list[int]
    policy: str
    seed: int

    @property
    def key(self) -> str:
        """Cache key: what determines the run (placements with equal layers share runs)."""
        band = layers_label(self.layers).replace(",", "_")
        return f"layers{band}-{self.policy}-seed{self.seed}"


@dataclass
class Settings:
    """What every run shares: TrainConfig fields and the evaluation sizes."""

    train: dict[str, Any]
    eval_data: str | None
    eval_limit: int
    nll_limit: int
    ppl_limit: int
    # Depth of the model and the width of its narrowest target, filled in once it is loaded.
    num_layers: int = 0
    max_rank: int = 0


def run_config(
    settings: Settings,
    plan: Plan | None = None,
    output_dir: Path | None = None,
    resume: bool = False,
) -> TrainConfig:
    """The TrainConfig of one run — the one place compare turns its settings into a config.

    Without a plan: the shared settings alone (what every run has in common).
    """
    from fastmid.engine.midblock import resolve_rank

    shared = build_config(None, settings.train)
    if plan is None:
        return shared
    budget = shared.get("rank_budget")
    rank = resolve_rank(None, budget, settings.num_layers, len(plan.layers))
    # The trainer clamps a budget-matched rank wider than a target to the target's width.
    rank = min(rank, settings.max_rank or rank)
    alpha, rslora = policy_alpha(plan.policy, shared.get("alpha"), rank, budget)
    overrides = {
        **settings.train,
        "band": ",".join(map(str, plan.layers)),
        "alpha": alpha,
        "use_rslora": rslora,
        "seed": plan.seed,
        "output_dir": str(output_dir),
        # The adapter is evaluated after training, once, by the same code for every run.
        "eval": False,
        "resume": resume,
        "overwrite": not resume,
    }
    return build_config(None, overrides)


def evaluate_model(model: Any, tokenizer: Any, settings: Settings, precision: str) -> dict:
    """Accuracy, answer NLL/token and general-text perplexity of ``model`` (tuned or base)."""
    import torch

    from fastmid.recipe import data, evaluate
    from fastmid.recipe.heldout import answer_nll

    shared = run_config(settings)
    records = _eval_records(settings)
    examples = data.tokenize_records(
        records[: settings.nll_limit],
        tokenizer,
        fmt=shared.format,
        max_length=shared.max_length,
        loss_on="response",
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    half = precision == "bf16"
    model.eval()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=half):
        nll = answer_nll(model, examples, pad)
        accuracy = None
        if settings.eval_limit > 0:  # greedy generation: the slow part on a CPU
            accuracy, _ = evaluate.gsm_accuracy(model, tokenizer, records[: settings.eval_limit])
        ppl = evaluate.perplexity(
            model,
            tokenizer,
            evaluate.heldout_texts()[: settings.ppl_limit],
            max_length=shared.max_length,
        )
    return {"answer_nll": nll, "accuracy": accuracy, "general_ppl": float(ppl)}


def _eval_records(settings: Settings) -> list[dict]:
    from fastmid.recipe import data

    path = settings.eval_data or str(data.bundled_path("test"))
    return data.load_records(path)


def train_and_evaluate(settings: Settings, plan: Plan, run_dir: Path) -> dict:
    """Train one run (resuming its checkpoint if one is there), evaluate its adapter, write
    ``result.json`` in ``run_dir``; returns the result. An interrupted training returns
    ``{"interrupted": True}`` and writes nothing; a run whose training finished before (its
    evaluation was interrupted) is only evaluated."""
    import torch

    from fastmid.engine import models
    from fastmid.engine.adapters import load_adapter
    from fastmid.recipe import train
    from fastmid.recipe.checkpoint import CHECKPOINT_DIR, find_checkpoint

    out = run_dir / "train"
    resume = find_checkpoint(out / CHECKPOINT_DIR) is not None
    cfg = run_config(settings, plan, out, resume)
    finished = out / "summary.json"  # written only once the adapter is saved
    if finished.exists():
        summary = json.loads(finished.read_text(encoding="utf-8"))
    else:
        # A peak from an earlier run in this process must not count for this one.
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        summary = train.train(cfg)
        if summary["interrupted"]:
            return {"interrupted": True}
    metrics_lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    peak = max(json.loads(line)["mem_gb"] for line in metrics_lines)
    resolved = summary["resolved"]
    precision = resolved["precision"]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model, tokenizer, _ = models.load_model(cfg.model, dtype=dtype)
    if torch.cuda.is_available():
        model.to("cuda")
    load_adapter(model, out / "adapter")
    result = {
        "placement": plan.placement,
        "layers": resolved["layers"],
        "policy": plan.policy,
        "seed": plan.seed,
        "rank": resolved["rank"],
        "scale": resolved["scale"],
        "trainable_params": resolved["adapter_parameters"],
        "train_seconds": summary["train_seconds"],
        "tokens_per_s": summary["tokens_per_s"],
        "peak_mem_gb": peak,
        "loss_first": summary["loss_first"],
        "loss_last": summary["loss_last"],
        **evaluate_model(model, tokenizer, settings, precision),
    }
    write_text_atomic(run_dir / "result.json", json.dumps(result, indent=2) + "\n")
    return result


def _child(settings: Settings, plan: Plan, run_dir: str) -> None:
    """Entry point of a run's own process: output to its log, a UserError to error.txt."""
    path = Path(run_dir)
    streams = sys.stdout, sys.stderr
    with (path / "log.txt").open("a", encoding="utf-8") as log:
        sys.stdout = sys.stderr = log
        try:
            result = train_and_evaluate(settings, plan, path)
        except UserError as err:
            write_text_atomic(path / "error.txt", str(err) + "\n")
            sys.exit(2)
        except Exception:
            # Into the log while it is open: raised past it, the traceback would go to a
            # closed stderr and be lost.
            traceback.print_exc()
            sys.exit(1)
        finally:
            log.flush()
            sys.stdout, sys.stderr = streams
    if result.get("interrupted"):
        sys.exit(130)


def _run_isolated(settings: Settings, plan: Plan, run_dir: Path) -> dict:
    """Run one plan in a fresh process; its result.json, or a UserError/KeyboardInterrupt."""
    (run_dir / "error.txt").unlink(missing_ok=True)
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_child, args=(settings, plan, str(run_dir)))
    proc.start()
    try:
        proc.join()
    except KeyboardInterrupt:
        # Ask the run to stop the way `fastmid train` stops on a signal (checkpoint after the
        # current step), and wait for that, so the next compare resumes it.
        if proc.is_alive():
            proc.terminate()
        proc.join()
        raise
    if proc.exitcode == 130:
        raise KeyboardInterrupt
    if proc.exitcode == 2 and (run_dir / "error.txt").exists():
        message = (run_dir / "error.txt").read_text(encoding="utf-8").strip()
        raise UserError(f"run {plan.key}: {message}")
    if proc.exitcode != 0 or not (run_dir / "result.json").exists():
        raise UserError(
            f"run {plan.key} failed (exit code {proc.exitcode}); see {run_dir / 'log.txt'}"
        )
    return json.loads((run_dir / "result.json").read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# Aggregation, verdict, table, plot


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (std None with a single value: no spread measured;
    both None when the metric was not measured)."""
    if any(v is None for v in values):
        return None, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def aggregate(results: Sequence[dict], order: Sequence[str]) -> list[dict]:
    """One row per placement (in ``order``) and policy: mean and std of every metric."""
    rows = []
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["placement"], r["policy"]), []).append(r)
    for (placement, policy), runs in sorted(
        groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])
    ):
        row: dict[str, Any] = {
            "placement": placement,
            "policy": policy,
            "layers": layers_label(runs[0]["layers"]),
            "rank": runs[0]["rank"],
            "scale": runs[0]["scale"],
            "trainable_params": runs[0]["trainable_params"],
            "seeds": len(runs),
        }
        for key, _, _ in METRICS:
            mean, std = mean_std([r[key] for r in runs])
            row[key], row[key + "_std"] = mean, std
        rows.append(row)
    return rows


def separation(
    rows: Sequence[dict], metric: str = PRIMARY, lower_is_better: bool = True
) -> tuple[dict, list[dict], list[dict]]:
    """The best row by ``metric`` and the other rows split into those worse by more than the
    seed-to-seed spread (the gap exceeds the sum of the two standard deviations, i.e. the
    mean ± std intervals do not overlap) and those within it. Rows without a std (one seed)
    count as within: their spread is unknown."""
    sign = 1.0 if lower_is_better else -1.0
    best = min(rows, key=lambda r: sign * r[metric])
    beyond, within = [], []
    for row in rows:
        if row is best:
            continue
        gap = sign * (row[metric] - best[metric])
        s1, s2 = best[metric + "_std"], row[metric + "_std"]
        if s1 is not None and s2 is not None and gap > s1 + s2:
            beyond.append(row)
        else:
            within.append(row)
    return best, beyond, within


@dataclass
class PairedGap:
    """How much worse one placement is than another, seed by seed (the same seed gives both
    runs the same adapter init and data order, so a seed-wide shift cancels out)."""

    mean: float  # mean over the shared seeds of the per-seed gap (positive: worse)
    std: float | None  # sample std of the per-seed gaps; None with one seed
    worse_in: int  # seeds in which this placement did worse than the other
    seeds: int  # seeds both ran

    @property
    def sign_p(self) -> float:
        """One-sided sign-test p-value of "worse in this many of the seeds" when neither is
        better: the chance that a fair coin comes up worse at least ``worse_in`` times."""
        n = self.seeds
        tail = sum(math.comb(n, k) for k in range(self.worse_in, n + 1))
        return tail / 2**n


def paired_gap(
    results: Sequence[dict], row: dict, best: dict, metric: str = PRIMARY, lower_is_better=True
) -> PairedGap | None:
    """The per-seed gap of ``row``'s placement behind ``best``'s on ``metric``, over the seeds
    both ran (``results``: one dict per run, with placement, policy and seed); None without a
    shared seed."""
    sign = 1.0 if lower_is_better else -1.0

    def by_seed(r: dict) -> dict[int, float]:
        return {
            x["seed"]: x[metric]
            for x in results
            if x["placement"] == r["placement"]
            and x["policy"] == r["policy"]
            and x[metric] is not None
        }

    mine, theirs = by_seed(row), by_seed(best)
    gaps = [sign * (mine[s] - theirs[s]) for s in sorted(mine.keys() & theirs.keys())]
    if not gaps:
        return None
    return PairedGap(
        mean=statistics.fmean(gaps),
        std=statistics.stdev(gaps) if len(gaps) > 1 else None,
        worse_in=sum(g > 0 for g in gaps),
        seeds=len(gaps),
    )


def paired_gaps(
    rows: Sequence[dict], best: dict, results: Sequence[dict]
) -> list[PairedGap | None]:
    """Each row's paired gap behind ``best`` by answer NLL, in row order (None for the best
    itself and for a row without a seed in common with it)."""
    return [None if row is best else paired_gap(results, row, best) for row in rows]


def paired_table(rows: Sequence[dict], results: Sequence[dict]) -> list[dict]:
    """For results.json: every other placement's paired gap behind the best by answer NLL."""
    if not rows:
        return []
    best = separation(rows)[0]
    table = []
    for row, gap in zip(rows, paired_gaps(rows, best, results), strict=True):
        if gap is not None:
            table.append(
                {
                    "placement": row["placement"],
                    "policy": row["policy"],
                    "best": best["placement"],
                    **dataclasses.asdict(gap),
                    "sign_p": gap.sign_p,
                }
            )
    return table


def _name(row: dict) -> str:
    return f"{row['placement']} ({row['layers']}, {row['policy']})"


def _pm(row: dict, key: str, fmt: str = ".3f") -> str:
    std = row[key + "_std"]
    if row[key] is None:
        return "—"
    return f"{row[key]:{fmt}}" + (f" ± {std:{fmt}}" if std is not None else "")


def verdict(rows: Sequence[dict], base: dict | None = None, results: Sequence[dict] = ()) -> str:
    """One paragraph: which placement is best by answer NLL, whether the differences exceed
    the seed-to-seed spread and, from the per-run ``results``, in how many seeds the best beat
    each other placement; then what the placements cost."""
    if not rows:
        return "No runs to compare."
    label = dict((k, v) for k, v, _ in METRICS)[PRIMARY]
    best, beyond, within = separation(rows)
    seeds = min(r["seeds"] for r in rows)
    parts = [
        f"By {label} on the held-out records (lower is better), {_name(best)} is best "
        f"at {_pm(best, PRIMARY)}"
    ]
    if base is not None:
        parts[-1] += f" (base model {base[PRIMARY]:.3f})"
    parts[-1] += "."
    if len(rows) == 1:
        parts.append("There is nothing to compare it with.")
    elif seeds < 2:
        parts.append(
            "With one seed per placement the seed-to-seed spread is unknown, so no difference "
            "here can be told from noise; run with --seeds 2 or more."
        )
    else:
        if beyond:
            names = ", ".join(_name(r) for r in beyond)
            parts.append(
                f"It beats {names} by more than the seed-to-seed spread "
                "(mean ± std intervals do not overlap)."
            )
        if within:
            names = ", ".join(f"{_name(r)} at {_pm(r, PRIMARY)}" for r in within)
            parts.append(
                f"{names} {'is' if len(within) == 1 else 'are'} within the seed-to-seed spread "
                f"of it, so this run cannot tell {'it' if len(within) == 1 else 'them'} apart "
                "from the best."
            )
        if not within:
            parts.append("Every difference from the best exceeds the seed-to-seed spread.")
        paired = _paired_sentence(rows, best, results)
        if paired:
            parts.append(paired)
    if base is not None and base.get("general_ppl") is not None:
        parts.append(_forgetting_sentence(forgetting(rows, base)))
    fastest = min(rows, key=lambda r: r["train_seconds"])
    lightest = min(rows, key=lambda r: r["peak_mem_gb"])
    parts.append(
        f"Cost: {_name(fastest)} trained fastest ({fastest['train_seconds']:.0f} s), "
        f"{_name(lightest)} used the least memory ({lightest['peak_mem_gb']:.2f} GB)."
    )
    return " ".join(parts)


def forgetting(rows: Sequence[dict], base: dict) -> list[dict]:
    """Per placement: the answer-NLL gain over the base model, the general-text perplexity
    change (forgetting) and the gain per point of perplexity added (None when perplexity did
    not rise: a gain without forgetting)."""
    out = []
    for row in rows:
        gain = base[PRIMARY] - row[PRIMARY]
        change = row["general_ppl"] - base["general_ppl"]
        out.append(
            {
                "placement": _name(row),
                "nll_gain": gain,
                "ppl_change": change,
                "gain_per_ppl": gain / change if change > 0 else None,
            }
        )
    return out


def _forgetting_sentence(items: Sequence[dict]) -> str:
    """Gain per unit of forgetting, best first (placements without forgetting lead)."""
    ranked = sorted(
        items, key=lambda x: -math.inf if x["gain_per_ppl"] is None else -x["gain_per_ppl"]
    )
    clauses = [
        f"{x['placement']} {x['nll_gain']:.3f} for {x['ppl_change']:+.2f} ppl"
        + (
            " (no forgetting)"
            if x["gain_per_ppl"] is None
            else f" = {x['gain_per_ppl']:.3f} per ppl point"
        )
        for x in ranked
    ]
    return (
        "Answer-NLL gain per point of general-text perplexity added (forgetting): "
        + "; ".join(clauses)
        + "."
    )


def _paired_sentence(rows: Sequence[dict], best: dict, results: Sequence[dict]) -> str:
    """In how many seeds the best beat each other placement, and by how much (paired)."""
    clauses, same = [], []
    for row, gap in zip(rows, paired_gaps(rows, best, results), strict=True):
        if row is best:
            continue
        if row["layers"] == best["layers"] and row["policy"] == best["policy"]:
            same.append(_name(row))
            continue
        if gap is None or gap.seeds < 2:
            continue
        clauses.append(
            f"{_name(row)} in {gap.worse_in} of {gap.seeds} (by {gap.mean:.3f} ± {gap.std:.3f}, "
            f"sign test p = {gap.sign_p:.2g})"
        )
    if not clauses:
        return ""
    text = (
        "Paired by seed (a seed gives every placement the same adapter init and data order, so "
        "a shift of the whole seed cancels), the best did better than " + "; ".join(clauses) + "."
    )
    if same:
        text += f" {', '.join(same)} trained the same layers as the best: the same runs."
    return text


COLUMNS = ("placement", "policy", "layers", "rank", "scale", "trainable_params", "seeds")


def table_rows(rows: Sequence[dict]) -> list[dict]:
    """Flat records for CSV/JSON: the run description then ``metric`` and ``metric_std``."""
    flat = []
    for row in rows:
        record = {c: row[c] for c in COLUMNS}
        for key, _, _ in METRICS:
            record[key] = row[key]
            record[key + "_std"] = row[key + "_std"]
        flat.append(record)
    return flat


def to_csv(rows: Sequence[dict]) -> str:
    """The table as CSV text (empty std cells where only one seed ran)."""
    flat = table_rows(rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(flat[0]) if flat else list(COLUMNS))
    writer.writeheader()
    writer.writerows(flat)
    return buf.getvalue()


def to_markdown(rows: Sequence[dict], base: dict | None) -> str:
    """The table as Markdown: mean ± std per metric, the base model's quality as a first row."""
    head = ["placement", "layers", "rank", "scale", "params"] + [lab for _, lab, _ in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmts = {"train_seconds": ".0f", "tokens_per_s": ".0f", "peak_mem_gb": ".2f"}
    if base is not None:
        cells = ["base model", "—", "—", "—", "0"]
        cells += [f"{base[k]:.3f}" if base.get(k) is not None else "—" for k, _, _ in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    for row in rows:
        cells = [
            f"{row['placement']} ({row['policy']})",
            row["layers"],
            str(row["rank"]),
            f"{row['scale']:.3g}",
            f"{row['trainable_params']:,}",
        ]
        cells += [_pm(row, k, fmts.get(k, ".3f")) for k, _, _ in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict], base: dict | None, path: Path, results: Sequence[dict] = ()) -> None:
    """One PNG: answer NLL (and accuracy, when measured) per placement with ±std error bars,
    each placement's answer NLL behind the best paired by seed (from the per-run ``results``),
    and the train time and peak memory of each placement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{r['placement']}\n{r['layers']}\n{r['policy']}" for r in rows]
    x = list(range(len(rows)))

    def err(key: str) -> list[float]:
        return [r[key + "_std"] or 0.0 for r in rows]

    # Accuracy gets a panel when it was measured (--eval-limit above 0).
    quality = [("answer_nll", "C0")]
    if all(r["accuracy"] is not None for r in rows):
        quality.append(("accuracy", "C2"))
    fig, axes = plt.subplots(1, len(quality) + 2, figsize=(4.2 * (len(quality) + 2), 4.2))
    for ax, (key, colour) in zip(axes, quality, strict=False):
        ax.errorbar(x, [r[key] for r in rows], yerr=err(key), fmt="o", capsize=5, color=colour)
        if base is not None and base.get(key) is not None:
            ax.axhline(base[key], color="grey", linestyle="--", label="base model")
            ax.legend(loc="best", fontsize=8)
        ax.set_title(dict((k, v) for k, v, _ in METRICS)[key] + " (mean ± std over seeds)")
        ax.set_xticks(x, names, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    ax = axes[-2]
    best = separation(rows)[0]
    gaps = paired_gaps(rows, best, results)
    if all(g is None or g.seeds < 2 for g in gaps):
        ax.text(0.5, 0.5, "needs 2 seeds or more", ha="center", transform=ax.transAxes)
    else:
        means = [0.0 if g is None else g.mean for g in gaps]
        stds = [(g.std or 0.0) if g else 0.0 for g in gaps]
        ax.bar(x, means, yerr=stds, color="C0", capsize=4)
        ax.margins(y=0.12)  # room for the labels above the bars
        for i, (row, g) in enumerate(zip(rows, gaps, strict=True)):
            label = "best" if row is best else f"{g.worse_in}/{g.seeds}" if g else ""
            top = means[i] + stds[i] if means[i] >= 0 else 0.0
            ax.annotate(label, (i, top), textcoords="offset points", xytext=(0, 3),
                        ha="center", va="bottom", fontsize=8)  # fmt: skip
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xticks(x, names, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    ax.set_title("answer NLL behind the best, paired by seed\n(mean ± std; seeds behind / seeds)")
    ax = axes[-1]
    width = 0.38
    ax.bar(
        [i - width / 2 for i in x],
        [r["train_seconds"] for r in rows],
        width,
        yerr=err("train_seconds"),
        color="C1",
        label="train s",
    )
    ax.set_ylabel("train time (s)")
    ax.set_xticks(x, names, fontsize=8)
    twin = ax.twinx()
    twin.bar(
        [i + width / 2 for i in x],
        [r["peak_mem_gb"] for r in rows],
        width,
        yerr=err("peak_mem_gb"),
        color="C4",
        label="peak mem",
    )
    twin.set_ylabel("peak memory (GB)")
    ax.set_title("cost: train time (left), peak memory (right)")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    # On the twin axes: they are drawn after ax, so a legend on ax would sit under their bars.
    twin.legend(handles, ["train s", "peak mem GB"], loc="lower right", fontsize=8, framealpha=1)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    from fastmid.fileio import write_bytes_atomic

    write_bytes_atomic(path, buf.getvalue())


# --------------------------------------------------------------------------------------------
# The whole comparison


def auto_band(
    model: Any, tokenizer: Any, settings: Settings, criterion: str, width: int, policy: str
) -> tuple[list[int], str]:
    """The band ``criterion`` picks on the first training examples (as ``--band auto`` would
    for a ``width``-layer band under the scale ``policy``), and its one-line reason."""
    import torch

    from fastmid.engine.models import resolve_precision
    from fastmid.recipe import data
    from fastmid.recipe.bandgain import AUTO_EXAMPLES, choose_auto_band

    # Every candidate window has the width of the middle band, so its rank and scale.
    middle = placement_band("middle", settings.num_layers, width)
    run = run_config(settings, Plan("auto", middle, policy, 0)).resolved()
    records = data.load_records(run.data or str(data.bundled_path("train")))[:AUTO_EXAMPLES]
    examples = data.tokenize_records(
        records, tokenizer, fmt=run.format, max_length=run.max_length, loss_on=run.loss_on
    )
    device = next(model.parameters()).device
    precision = resolve_precision(run.precision, device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        layers, info = choose_auto_band(
            model,
            tokenizer,
            examples,
            adapter=run.midblock,
            lr=run.lr,
            criterion=criterion,
            width=width,
            max_quality_gap=run.max_quality_gap,
        )
    return layers, str(info["reason"])


def compare(
    settings: Settings,
    placements: Sequence[str],
    policies: Sequence[str],
    seeds: int | Sequence[int],
    output_dir: str | Path,
    *,
    width: int | None = None,
    auto_criterion: str = AUTO_CRITERION,
    overwrite: bool = False,
    isolate: bool = True,
    log: Any = print,
) -> dict[str, Any]:
    """Run (or take from the cache) every placement x policy x seed and write the report.

    ``isolate`` runs each training in a fresh process (its own time and peak memory); tests
    run in-process. Returns ``{"rows", "base", "verdict", "results"}``.
    """
    import torch

    from fastmid.engine import models
    from fastmid.engine.blocks import find_decoder_layers
    from fastmid.engine.midblock import PAPER_BAND, resolve_band
    from fastmid.engine.models import resolve_precision

    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise UserError(f"--seeds needs at least one seed, each once and >= 0, got {seeds}")
    if not placements:
        raise UserError("--placements names no placement")
    for policy in policies:
        policy_alpha(policy, 1.0, 1, 1)
    if auto_criterion not in AUTO_CRITERIA:
        raise UserError(f"auto criterion must be one of {'|'.join(AUTO_CRITERIA)}")
    shared = run_config(settings)
    if shared.data is not None and settings.eval_data is None:
        raise UserError("--data needs --eval-data: held-out records to compare the runs on")
    for name in placements:
        if name not in PLACEMENTS:
            parse_band(name)  # a user band: fail now, not after the first run
    _eval_records(settings)

    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output dir {out} exists and is not a directory")
    fingerprint = {
        "train": settings.train,
        "eval_data": settings.eval_data,
        "eval_limit": settings.eval_limit,
        "nll_limit": settings.nll_limit,
        "ppl_limit": settings.ppl_limit,
    }
    stamp = out / "compare.json"
    if stamp.exists() and not overwrite:
        previous = json.loads(stamp.read_text(encoding="utf-8"))
        if previous != json.loads(json.dumps(fingerprint)):
            raise UserError(
                f"{out} holds a compare with other settings; pass --overwrite to start over "
                "or use another --output-dir"
            )
    elif user_entries(out) and not stamp.exists() and not overwrite:
        raise UserError(f"output dir {out} is not empty; pass --overwrite or use another")
    if overwrite:
        # The auto band was chosen with the old settings (its lr, data, steps): choose again.
        chosen = [p.name for p in out.glob("auto-*.json")] if out.is_dir() else []
        for entry in (
            "runs",
            "base.json",
            "compare.json",
            "results.csv",
            "results.json",
            "results.md",
            "compare.png",
            *chosen,
        ):
            target = out / entry
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(stamp, json.dumps(fingerprint, indent=2) + "\n")

    # The base model: its depth, its quality (cached), and the auto band.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(shared.precision, device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model, tokenizer, model_name = models.load_model(shared.model, dtype=dtype)
    model.to(device)
    blocks = find_decoder_layers(model)
    num_layers = len(blocks)
    settings.num_layers = num_layers
    settings.max_rank = min(
        min(m.in_features, m.out_features)
        for name, m in blocks[0].named_modules()
        if name.rsplit(".", 1)[-1] in shared.get("targets") and hasattr(m, "in_features")
    )
    width = len(resolve_band(PAPER_BAND, num_layers)) if width is None else width
    base_path = out / "base.json"
    if base_path.exists():
        base = json.loads(base_path.read_text(encoding="utf-8"))
    else:
        log(f"evaluating the base model {model_name} ...")
        base = evaluate_model(model, tokenizer, settings, precision)
        write_text_atomic(base_path, json.dumps(base, indent=2) + "\n")
    bands: dict[str, list[int]] = {}
    for name in placements:
        if name == "auto":
            auto_path = out / f"auto-{auto_criterion}-w{width}-{policies[0]}.json"
            if auto_path.exists():
                bands[name] = json.loads(auto_path.read_text(encoding="utf-8"))["layers"]
            else:
                log(f"choosing the auto band ({auto_criterion}) ...")
                layers, reason = auto_band(
                    model, tokenizer, settings, auto_criterion, width, policies[0]
                )
                write_text_atomic(
                    auto_path, json.dumps({"layers": layers, "reason": reason}) + "\n"
                )
                log(f"auto → {reason}")
                bands[name] = layers
        else:
            bands[name] = placement_band(name, num_layers, width)
    del model

    plans = [
        Plan(name, bands[name], policy, seed)
        for seed in seeds
        for name in placements
        for policy in policies
    ]
    results = []
    for i, plan in enumerate(plans, 1):
        run_dir = out / "runs" / plan.key
        cached = run_dir / "result.json"
        if cached.exists():
            result = json.loads(cached.read_text(encoding="utf-8"))
            how = "cached"
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            if isolate:
                result = _run_isolated(settings, plan, run_dir)
            else:
                result = train_and_evaluate(settings, plan, run_dir)
                if result.get("interrupted"):
                    raise KeyboardInterrupt
            how = f"{time.perf_counter() - start:.0f} s"
        # One run can serve several placements with the same layers (e.g. auto = middle).
        result = {**result, "placement": plan.placement}
        results.append(result)
        acc = "—" if result["accuracy"] is None else f"{result['accuracy']:.3f}"
        log(
            f"[{i}/{len(plans)}] {plan.placement} layers {layers_label(plan.layers)} "
            f"{plan.policy} seed {plan.seed}: answer NLL {result['answer_nll']:.4f}, "
            f"accuracy {acc}, ppl {result['general_ppl']:.2f} ({how})"
        )

    rows = aggregate(results, list(placements))
    text = verdict(rows, base, results)
    write_text_atomic(out / "results.csv", to_csv(rows))
    report = {
        "model": model_name,
        "num_layers": num_layers,
        "width": width,
        "settings": fingerprint,
        "base": base,
        "rows": table_rows(rows),
        "paired_vs_best": paired_table(rows, results),
        "forgetting": forgetting(rows, base) if base.get("general_ppl") is not None else [],
        "verdict": text,
    }
    write_text_atomic(out / "results.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out / "results.md", to_markdown(rows, base) + "\n" + text + "\n")
    plot(rows, base, out / "compare.png", results)
    return {"rows": rows, "base": base, "verdict": text, "results": results}


# --------------------------------------------------------------------------------------------
# CLI


def parse_seeds(spec: str) -> list[int]:
    """``--seeds``: ``4`` → seeds 0-3, ``100-103`` → 100..103, ``5,7`` → 5 and 7."""
    try:
        if "," in spec:
            return [int(x) for x in spec.split(",") if x.strip()]
        if "-" in spec:
            lo, hi = (int(x) for x in spec.split("-"))
            if hi < lo:
                raise ValueError
            return list(range(lo, hi + 1))
        count = int(spec)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a count, a range like 100-103 or a list like 5,7, got {spec!r}"
        ) from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"a seed count must be at least 1, got {count}")
    return list(range(count))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fastmid compare``; training flags mean what they mean for ``fastmid train``."""
    parser.add_argument(
        "--placements",
        default="bottom,middle,top,all",
        help="comma-separated: bottom, middle, top (equal-width bands), all, auto, or a layer "
        "range like 6-23 (default: bottom,middle,top,all)",
    )
    parser.add_argument(
        "--band",
        action="append",
        default=[],
        metavar="SPEC",
        help="add a band in any --band form of fastmid train (repeatable), e.g. 0.1,0.5",
    )
    parser.add_argument(
        "--alpha-policy",
        default=DEFAULT_ALPHA_POLICY,
        help="fixed (alpha constant: the paper's, and what fastmid train ships), ratio (alpha/r "
        "at the all-layer value) or rslora (alpha/sqrt(r)); comma-separated to compare several "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--seeds",
        type=parse_seeds,
        default=[0, 1],
        help="seeds per run: a count N (seeds 0..N-1), a range 100-103 or a list 5,7; name "
        "fresh seeds to confirm a choice made on others (default: 2, i.e. 0-1)",
    )
    parser.add_argument(
        "--width",
        type=int,
        default=None,
        help="layers of the bottom/middle/top/auto bands (default: the 20-80%% band's width)",
    )
    parser.add_argument(
        "--auto-criterion",
        default=AUTO_CRITERION,
        choices=AUTO_CRITERIA,
        help="how auto picks its band: short probe runs of about five candidate windows with the "
        "runs' own adapters, lowest held-out loss wins (window, what --band auto does); the "
        "probe's low sensitivity; or a short all-layer probe run: the layers whose adapters "
        "reduced the training loss most (gain), with the most consistent gradients across "
        "micro-batches (snr), or whose updates reduced a held-out loss most (heldout) "
        "(default: %(default)s)",
    )
    parser.add_argument("--output-dir", default="./fastmid-compare", help="results and cache")
    parser.add_argument("--overwrite", action="store_true", help="discard cached runs")
    parser.add_argument(
        "--eval-data",
        default=None,
        help="held-out JSONL records ('#### N' answers); default: bundled test",
    )
    parser.add_argument(
        "--eval-limit",
        type=int,
        default=32,
        help="records for accuracy (greedy generation, slow on a CPU; 0 = skip; default: 32)",
    )
    parser.add_argument(
        "--nll-limit", type=int, default=200, help="records for answer NLL (default: 200)"
    )
    parser.add_argument(
        "--ppl-limit",
        type=int,
        default=32,
        help="general-text paragraphs for perplexity (default: 32)",
    )
    # The training flags are fastmid train's own, generated from the same config fields (and
    # shown under the same groups).
    add_field_arguments(
        parser,
        [f for f in config_fields() if f.name in PASSTHROUGH],
        show=lambda name, value: ",".join(value) if isinstance(value, tuple) else str(value),
    )


@holds_output_dir(lambda args: args.output_dir)
def run(args: argparse.Namespace) -> int:
    """``fastmid compare``: train every placement, evaluate, write the table, plot, verdict."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.eval_limit < 0:
        raise UserError("--eval-limit must be 0 (no accuracy) or positive")
    for name in ("nll_limit", "ppl_limit"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    given = [k for k in PASSTHROUGH if hasattr(args, k)]
    cfg = build_config(None, {k: getattr(args, k) for k in given})
    # Typed values, and the same rule as `fastmid train`: the demo lr and length when no data,
    # length or lr is given.
    train_fields = {k: cfg.get(k) for k in given}
    if cfg.is_demo:
        train_fields.update(lr=cfg.resolved().lr, max_steps=cfg.resolved().max_steps)
    settings = Settings(
        train=train_fields,
        eval_data=args.eval_data,
        eval_limit=args.eval_limit,
        nll_limit=args.nll_limit,
        ppl_limit=args.ppl_limit,
    )
    placements = [p for p in args.placements.replace(" ", "").split(",") if p] + list(args.band)
    policies = [p for p in args.alpha_policy.replace(" ", "").split(",") if p]
    # SIGTERM stops a compare as Ctrl-C does: the running training checkpoints first.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        result = compare(
            settings,
            placements,
            policies,
            args.seeds,
            args.output_dir,
            width=args.width,
            auto_criterion=args.auto_criterion,
            overwrite=args.overwrite,
            log=lambda m: print(m, flush=True),
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    print()
    print(to_markdown(result["rows"], result["base"]))
    print(result["verdict"])
    print(
        f"\nwritten: {Path(args.output_dir) / 'results.md'}, results.csv, results.json, compare.png"
    )
    return 0
