"""Where every millisecond of a training step goes, and the engine case (``model(ids, labels)``).

Two workloads of ``fastmid bench`` (also ``python -m bench.profile``):

- ``profile``: one optimizer step per provider under ``torch.profiler``; the self-CPU time of
  every op is put in one of :data:`CATEGORIES`, so the categories add up to the step. Rules, in
  order (the first that matches wins):

  1. anything under ``Optimizer.step``/``Optimizer.zero_grad`` → optimizer;
  2. SDPA / flash-attention ops, and the backward of an op that was one → attention;
  3. random draws (``bernoulli_``, ``rand``, ``uniform_``, ``native_dropout``…) → RNG;
  4. GEMMs (``mm``, ``addmm``, ``bmm``…) by their operand shapes: a vocabulary-sized dimension →
     LM head + loss, the provider's LoRA rank → adapter GEMM, anything else → frozen GEMM;
  5. ops touching a vocabulary-sized tensor (logit casts, log-softmax, the chunked loss), loss
     ops, and the backward of such an op → LM head + loss;
  6. every other ATen compute op → norms/RoPE/activations/elementwise (casts and copies too);
  7. the rest → other: views, allocation, indexing, autograd-engine and Python self time.

  A backward op is matched to the forward op that created its autograd node through the
  profiler's sequence numbers, so e.g. the backward of the logits cast counts as loss.
- ``engine``: the case of a user's loop, HF Trainer or TRL: identical padded batches (4×256,
  the first half of each row masked as prompt) through ``model(input_ids=..., labels=...)``,
  every provider interleaved, best step of ``steps``.

Reports: ``profile.{md,csv,json}`` with a stacked-bar ``profile.png``, and ``engine.{md,csv}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.autograd.profiler_util import FunctionEvent

from bench.providers import PROVIDERS, Provider, Workload, build_provider
from bench.tables import csv_bytes, markdown_table
from fastmid.engine.loss import IGNORE_INDEX
from fastmid.fileio import write_bytes_atomic

CATEGORIES = (
    "frozen_gemm",
    "adapter_gemm",
    "attention",
    "rng",
    "elementwise",
    "head_loss",
    "optimizer",
    "other",
)
LABELS = {
    "frozen_gemm": "frozen GEMMs",
    "adapter_gemm": "adapter GEMMs",
    "attention": "attention",
    "rng": "RNG (dropout masks)",
    "elementwise": "norms/RoPE/act./elementwise",
    "head_loss": "LM head + loss",
    "optimizer": "optimizer",
    "other": "other",
}
# The providers compared by both workloads (the gradient-checkpointing variant adds nothing
# to the attribution that peft_all does not show).
PROFILED = ("peft_all", "peft_mid", "fastmid")
STEP_SCOPE = "bench::train_step"

_GEMM = re.compile(r"^aten::(mm|addmm_?|bmm|baddbmm_?|addbmm_?|_addmm_activation|linear)$")
_RNG = re.compile(
    r"^aten::(bernoulli_?|rand|randn|randint|rand_like|uniform_|normal_|native_dropout)$"
)
_ATTENTION = re.compile(r"scaled_dot_product|flash_attention|ScaledDotProduct|FlashAttention")
_LOSS = re.compile(
    r"log_softmax|nll_loss|cross_entropy|logsumexp|LogSoftmax|NllLoss|CrossEntropy|Logsumexp"
)
# ATen ops that move no data through arithmetic: views, allocation, indexing, host syncs.
_NOT_COMPUTE = re.compile(
    r"^aten::(view|_unsafe_view|reshape|as_strided|t|transpose|permute|expand|squeeze|unsqueeze"
    r"|slice|select|narrow|split|split_with_sizes|chunk|unbind|detach|detach_|alias|lift_fresh"
    r"|empty|empty_like|empty_strided|new_empty|new_empty_strided|resolve_conj|resolve_neg"
    r"|embedding|index_select|nonzero|item|_local_scalar_dense|is_nonzero|arange|lift"
    r"|result_type|set_|resize_|_reshape_alias|numpy_T|flatten|contiguous|matmul|linear"
    r"|dropout|scaled_dot_product_attention|size|stride|zeros|ones|full|scalar_tensor"
    r"|_has_compatible_shallow_copy_type|to|type_as|clone)$"
)


# --------------------------------------------------------------------------------------------
# Attribution


def _ancestors(event: FunctionEvent) -> list[FunctionEvent]:
    out = []
    parent = event.cpu_parent
    while parent is not None:
        out.append(parent)
        parent = parent.cpu_parent
    return out


def _dims(event: FunctionEvent) -> set[int]:
    return {d for shape in event.input_shapes or [] if isinstance(shape, list) for d in shape}


class _Attributor:
    """Category of each profiler event's self time (see the module docstring for the rules)."""

    def __init__(self, events: list[FunctionEvent], rank: int, vocab: int) -> None:
        self.rank, self.vocab = rank, vocab
        # Forward op that created each autograd node: the outermost op with that sequence number.
        self.forward_of: dict[int, FunctionEvent] = {}
        for e in events:
            if e.sequence_nr < 0 or e.name.startswith("autograd::engine"):
                continue
            if not any(a.sequence_nr == e.sequence_nr for a in _ancestors(e)):
                self.forward_of.setdefault(e.sequence_nr, e)
        self._memo: dict[int, str | None] = {}

    def _forward_hint(self, event: FunctionEvent) -> str | None:
        """'attention' or 'head_loss' when the forward op behind this backward op was one."""
        node = next(
            (a for a in [event, *_ancestors(event)] if a.name.startswith("autograd::engine")),
            None,
        )
        if node is None:
            return None
        if node.id in self._memo:
            return self._memo[node.id]
        fwd = self.forward_of.get(node.sequence_nr)
        hint = None
        if fwd is not None:
            family = [fwd, *fwd.cpu_children]
            if any(_ATTENTION.search(f.name) for f in family):
                hint = "attention"
            elif any(_LOSS.search(f.name) or self.vocab in _dims(f) for f in family):
                hint = "head_loss"
        self._memo[node.id] = hint
        return hint

    def category(self, event: FunctionEvent) -> str:
        name = event.name
        chain = [event, *_ancestors(event)]
        if any(a.name.startswith("Optimizer.") for a in chain):
            return "optimizer"
        hint = self._forward_hint(event)
        if any(_ATTENTION.search(a.name) for a in chain) or hint == "attention":
            return "attention"
        if _RNG.match(name):
            return "rng"
        if _GEMM.match(name) and name != "aten::linear":
            dims = _dims(event)
            if self.vocab in dims:
                return "head_loss"
            return "adapter_gemm" if self.rank in dims else "frozen_gemm"
        if name == "aten::embedding":
            return "other"
        if _LOSS.search(name) or hint == "head_loss":
            return "head_loss"
        if name.startswith("aten::") and self.vocab in _dims(event):
            return "head_loss"
        if name.startswith("aten::") and not _NOT_COMPUTE.match(name):
            return "elementwise"
        return "other"


def attribute(events: list[FunctionEvent], rank: int, vocab: int) -> dict[str, Any]:
    """Seconds per category of the events under the step scope, and per op within each."""
    root = next(e for e in events if e.name == STEP_SCOPE)
    inside = [e for e in events if e is root or root in _ancestors(e)]
    attributor = _Attributor(inside, rank, vocab)
    seconds: dict[str, float] = dict.fromkeys(CATEGORIES, 0.0)
    ops: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for e in inside:
        cat = attributor.category(e)
        seconds[cat] += e.self_cpu_time_total / 1e6
        ops[cat][e.name] += e.self_cpu_time_total / 1e6
    by_cat = {cat: dict(sorted(o.items(), key=lambda kv: -kv[1])) for cat, o in ops.items()}
    return {"seconds": seconds, "step_s": root.cpu_time_total / 1e6, "ops": by_cat}


def profile_step(provider: Provider, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One profiled optimizer step of ``provider`` on ``batch``: seconds per category.

    ``wall_s`` is the step measured outside the profiler's own bookkeeping (perf_counter around
    the step), the number the categories must add up to.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    model = provider.model
    vocab = model.get_output_embeddings().weight.shape[0]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        with record_function(STEP_SCOPE):
            provider.train_step(batch)
        wall = time.perf_counter() - t0
    result = attribute(list(prof.events()), provider.rank, vocab)
    result["wall_s"] = wall
    return result


# --------------------------------------------------------------------------------------------
# Engine case: model(input_ids=..., labels=...) on padded batches


def engine_batch(workload: Workload, rows: int = 4, seq: int = 256) -> dict[str, torch.Tensor]:
    """``rows``×``seq`` real tokens of the bundled data, the first half of each row a prompt."""
    stream = torch.tensor([t for e in workload.examples for t in e.input_ids], dtype=torch.long)
    if stream.numel() < rows * seq:
        raise ValueError(f"the data holds {stream.numel()} tokens, fewer than {rows}x{seq}")
    ids = stream[: rows * seq].view(rows, seq)
    labels = ids.clone()
    labels[:, : seq // 2] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def _engine_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch, use_cache=False).loss


def engine_provider(provider: Provider) -> Provider:
    """``provider`` driven the way other trainers drive a model: ``model(ids, labels).loss``."""
    return dataclasses.replace(provider, loss_fn=_engine_loss)


def time_engine(
    providers: list[Provider], batch: dict[str, torch.Tensor], warmup: int, steps: int
) -> dict[str, list[float]]:
    """Seconds of each optimizer step per provider, providers interleaved (rotating order)."""
    from bench.measure import sync

    batches = {p.name: {k: v.to(p.device) for k, v in batch.items()} for p in providers}
    times: dict[str, list[float]] = {p.name: [] for p in providers}
    for r in range(warmup + steps):
        order = providers[r % len(providers) :] + providers[: r % len(providers)]
        for p in order:
            sync()
            t0 = time.perf_counter()
            p.train_step(batches[p.name])
            sync()
            if r >= warmup:
                times[p.name].append(time.perf_counter() - t0)
    return times


# --------------------------------------------------------------------------------------------
# Workloads


def run_profile(
    base: torch.nn.Module,
    workload: Workload,
    dtypes: tuple[str, ...],
    providers: tuple[str, ...] = PROFILED,
    cases: tuple[str, ...] = ("trainer", "engine"),
    warmup: int = 1,
    log: Any = print,
) -> list[dict[str, Any]]:
    """Attribution rows: one per (case, dtype, provider), step 0 of ``workload`` (trainer case:
    each provider's own batching and loss) or the engine batch."""
    rows = []
    for case in cases:
        for dtype in dtypes:
            for name in providers:
                log(f"[profile] {case} {dtype} {name}")
                p = build_provider(name, base, dtype)
                if case == "engine":
                    p = engine_provider(p)
                    batch = {k: v.to(p.device) for k, v in engine_batch(workload).items()}
                else:
                    batch = p.batch(workload.step_examples(0), workload.pad_id)
                for _ in range(warmup):
                    p.train_step(batch)
                res = profile_step(p, batch)
                tokens = int(batch["input_ids"].numel())
                rows.append(
                    {
                        "workload": "profile",
                        "case": case,
                        "provider": name,
                        "dtype": dtype,
                        "shape": "x".join(str(d) for d in batch["input_ids"].shape),
                        "tokens": tokens,
                        "wall_s": res["wall_s"],
                        "step_s": res["step_s"],
                        **{f"{c}_s": res["seconds"][c] for c in CATEGORIES},
                        # The six largest ops of each category: what to look at next.
                        "top_ops": {c: dict(list(o.items())[:6]) for c, o in res["ops"].items()},
                    }
                )
                del p
    return rows


def run_engine(
    base: torch.nn.Module,
    workload: Workload,
    dtypes: tuple[str, ...],
    providers: tuple[str, ...] = PROFILED,
    warmup: int = 1,
    steps: int = 3,
    log: Any = print,
) -> list[dict[str, Any]]:
    """Engine-case throughput, every provider interleaved, best of ``steps`` steps."""
    batch = engine_batch(workload)
    tokens = int(batch["input_ids"].numel())
    rows = []
    for dtype in dtypes:
        built = [engine_provider(build_provider(n, base, dtype)) for n in providers]
        log(f"[engine] {dtype}: {', '.join(providers)} x {steps} steps")
        times = time_engine(built, batch, warmup, steps)
        for p in built:
            best = min(times[p.name])
            rows.append(
                {
                    "workload": "engine",
                    "provider": p.name,
                    "dtype": dtype,
                    "shape": "x".join(str(d) for d in batch["input_ids"].shape),
                    "layers": f"{p.layers[0]}-{p.layers[-1]}",
                    "rank": p.rank,
                    "steps": len(times[p.name]),
                    "step_s_best": best,
                    "step_s_all": times[p.name],
                    "tokens_per_s": tokens / best,
                }
            )
        del built
    for r in rows:
        for ref in ("peft_all", "peft_mid"):
            other = next(
                (x for x in rows if x["provider"] == ref and x["dtype"] == r["dtype"]), None
            )
            if other is not None:
                r[f"vs_{ref}"] = r["tokens_per_s"] / other["tokens_per_s"]
    return rows


# --------------------------------------------------------------------------------------------
# Reports


def profile_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: milliseconds per category (and % of the step) for each profiled step."""
    header = ["case", "dtype", "provider", "step ms"] + [LABELS[c] for c in CATEGORIES]
    cells = []
    for r in rows:
        total = sum(r[f"{c}_s"] for c in CATEGORIES)
        shares = [f"{1e3 * r[f'{c}_s']:.0f} ({100 * r[f'{c}_s'] / total:.0f}%)" for c in CATEGORIES]
        cells.append([r["case"], r["dtype"], r["provider"], f"{1e3 * total:.0f}", *shares])
    return markdown_table(header, cells)


def engine_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: engine-case tokens/s and ratios."""
    header = [
        "dtype",
        "provider",
        "layers",
        "rank",
        "best step s",
        "tok/s",
        "vs peft_all",
        "vs peft_mid",
    ]
    cells = []
    for r in rows:
        ratios = [f"{r[k]:.2f}x" if k in r else "" for k in ("vs_peft_all", "vs_peft_mid")]
        cells.append(
            [
                r["dtype"],
                r["provider"],
                r["layers"],
                str(r["rank"]),
                f"{r['step_s_best']:.3f}",
                f"{r['tokens_per_s']:.0f}",
                *ratios,
            ]
        )
    return markdown_table(header, cells)


def profile_plot(rows: list[dict[str, Any]], title: str) -> bytes:
    """Stacked bars of milliseconds per category, one bar per profiled step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 3), 4.5))
    names = [f"{r['provider']}\n{r['case']} {r['dtype']}" for r in rows]
    bottom = [0.0] * len(rows)
    for c in CATEGORIES:
        values = [1e3 * r[f"{c}_s"] for r in rows]
        ax.bar(range(len(rows)), values, 0.7, bottom=bottom, label=LABELS[c])
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_xticks(range(len(rows)), names, fontsize=7)
    ax.set_ylabel("ms per training step (self CPU time)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _csv(rows: list[dict[str, Any]]) -> bytes:
    return csv_bytes(
        [{k: v for k, v in r.items() if k not in ("top_ops", "step_s_all")} for r in rows]
    )


def write_reports(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """profile.{md,csv,json,png} and engine.{md,csv} for whichever of the two ran."""
    written = []
    files: dict[str, bytes] = {}
    if results.get("profile"):
        rows = results["profile"]
        files["profile.md"] = (profile_table(rows) + "\n").encode()
        files["profile.csv"] = _csv(rows)
        files["profile.json"] = (json.dumps(rows, indent=1) + "\n").encode()
        title = f"Where a training step goes\n{rows[0].get('machine', '')}"
        files["profile.png"] = profile_plot(rows, title)
    if results.get("engine"):
        rows = results["engine"]
        files["engine.md"] = (engine_table(rows) + "\n").encode()
        files["engine.csv"] = _csv(rows)
    for name, data in files.items():
        path = out_dir / name
        write_bytes_atomic(path, data)
        written.append(path)
    return written


# --------------------------------------------------------------------------------------------
# python -m bench.profile


def main(argv: list[str] | None = None) -> int:
    """Run the profile and/or engine workloads alone and write their reports."""
    from bench.machine import machine_info, machine_label
    from bench.providers import load_base, make_workload

    parser = argparse.ArgumentParser(
        prog="python -m bench.profile", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="tiny model (seconds)")
    parser.add_argument("--workloads", default="profile,engine", help="profile,engine")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--providers", default=",".join(PROFILED))
    parser.add_argument("--steps", type=int, default=3, help="engine: timed steps (best is kept)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="default: bench/results(/quick)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    split = lambda s: tuple(x for x in s.split(",") if x)
    providers = split(args.providers)
    bad = [p for p in providers if p not in PROVIDERS]
    if bad:
        parser.error(f"unknown provider {bad[0]}")
    base, tokenizer, model_name = load_base(args.quick)
    workload = make_workload(tokenizer, num_steps=1, batch_tokens=256 if args.quick else 1024)
    info = machine_info()
    stamp = {"machine": machine_label(info), "commit": info["commit"], "model": model_name}
    results: dict[str, Any] = {}
    workloads = split(args.workloads)
    if "profile" in workloads:
        rows = run_profile(base, workload, split(args.dtypes), providers)
        results["profile"] = [{**r, **stamp} for r in rows]
        print(profile_table(results["profile"]))
    if "engine" in workloads:
        rows = run_engine(base, workload, split(args.dtypes), providers, steps=args.steps)
        results["engine"] = [{**r, **stamp} for r in rows]
        print(engine_table(results["engine"]))
    root = Path(__file__).resolve().parent / "results"
    out = Path(args.out) if args.out else (root / "quick" if args.quick else root)
    out.mkdir(parents=True, exist_ok=True)
    for path in write_reports(results, out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
