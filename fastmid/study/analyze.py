"""``fastmid analyze``: how each layer of a tuned model differs from its base, per layer.

Both models read the same inputs. For every decoder block ``l`` the block's output is captured by
a forward hook and reduced on the spot, so no per-token states of the whole network are ever
kept: per layer only the mean-pooled ``(N, D)`` matrix of the N examples (mean over real tokens)
and a logit-lens hit count survive a batch. The two models are run one after the other, never
both in memory (an adapter is applied onto the same base model after its pass).

Per layer (see :mod:`fastmid.study.layerstats` for the formulas):

- ``cka``, ``cosine``, ``mean_shift``: base vs tuned pooled states of the same inputs;
- ``erank_*``, ``entropy_*``: normalised effective rank and matrix entropy of each model's states;
- ``weight_change``: ``||ΔW||_F / ||W||_F`` over the layer's adapted projections stacked (for an
  adapter ``ΔW = s·B·A`` of each adapted projection, for a full model the difference of the
  q/k/v/o weights); 0 where nothing changed;
- ``logit_lens_*``: next-token top-1 accuracy of ``lm_head(final_norm(h_l))`` at the positions
  that have a next token (all of them, or ``--lens-positions`` evenly spaced ones per example).

Outputs in ``--output-dir``: ``layers.csv``, ``analysis.json`` and ``depth_profile.png`` (every
metric against relative depth ``(l + 1) / L``, the adapted band shaded), each written atomically.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fastmid.engine.loss import IGNORE_INDEX
from fastmid.engine.quantize import QUANTIZE_METHODS
from fastmid.errors import UserError
from fastmid.fileio import replace_atomic
from fastmid.outdir import holds_output_dir
from fastmid.recipe.inputs import add_data_argument, add_format_argument, add_model_argument
from fastmid.study import layerstats

__all__ = [
    "COLUMNS",
    "LayerStates",
    "adapter_weight_change",
    "add_arguments",
    "analyze",
    "collect_states",
    "compare",
    "final_norm",
    "run",
    "weight_change",
    "write_outputs",
]

# `fastmid analyze` writes here unless --output-dir says otherwise (announced when it starts).
DEFAULT_OUTPUT_DIR = "./fastmid-analyze"
COLUMNS = (
    "layer",
    "depth",
    "in_band",
    "cka",
    "cosine",
    "mean_shift",
    "erank_base",
    "erank_tuned",
    "entropy_base",
    "entropy_tuned",
    "weight_change",
    "logit_lens_base",
    "logit_lens_tuned",
)
# Logit-lens logits are computed this many token rows at a time: rows x vocab floats at once.
_LENS_CHUNK = 512


@dataclass
class LayerStates:
    """What one model's pass leaves behind: pooled states and logit-lens counts per layer."""

    pooled: list[Tensor]  # per layer: (N, D) float32 on CPU, mean over each example's tokens
    lens_correct: list[int]  # per layer: positions where lm_head(norm(h_l)) predicts the next token
    lens_total: int  # positions with a next token


def final_norm(model: nn.Module) -> nn.Module:
    """The normalisation applied to the last hidden state before the LM head."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    for owner in (decoder, model):
        for name in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
            module = getattr(owner, name, None)
            if isinstance(module, nn.Module):
                return module
    raise UserError(f"cannot find the final norm of {type(model).__name__} for the logit lens")


def _hidden(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.inference_mode()
def collect_states(
    model: nn.Module,
    examples: Sequence[Any],
    batch_size: int = 8,
    pad_id: int = 0,
    desc: str | None = None,
    lens_positions: int = 0,
) -> LayerStates:
    """Run ``model`` over ``examples`` (with ``input_ids`` and shifted ``targets``) and reduce
    every decoder block's output as it is produced (see the module docstring).

    ``lens_positions`` > 0 evaluates the logit lens at that many evenly spaced positions per
    example instead of all of them: the lens costs a full LM-head matmul per position and
    layer, far more than the forward pass itself on a CPU.
    """
    from tqdm.auto import tqdm

    from fastmid.engine.blocks import find_decoder_layers
    from fastmid.recipe.data import collate_padded

    blocks = find_decoder_layers(model)
    norm, head = final_norm(model), model.get_output_embeddings()
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    device = next(model.parameters()).device
    pooled: list[list[Tensor]] = [[] for _ in blocks]
    correct = [0] * len(blocks)
    batch: dict[str, Tensor] = {}

    def hook(index: int):
        def reduce(module: nn.Module, args: Any, out: Any) -> None:
            h = _hidden(out)
            mask = batch["mask"].unsqueeze(-1).to(h.dtype)
            mean = (h * mask).sum(1).float() / mask.sum(1).float()
            pooled[index].append(mean.cpu())
            rows, targets = h[batch["valid"]], batch["targets"]
            hits = 0
            for s in range(0, rows.shape[0], _LENS_CHUNK):
                logits = head(norm(rows[s : s + _LENS_CHUNK]))
                hits += int((logits.argmax(-1) == targets[s : s + _LENS_CHUNK]).sum())
            correct[index] += hits

        return reduce

    was_training = model.training
    model.eval()
    handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(blocks)]
    total = 0
    try:
        starts = range(0, len(examples), batch_size)
        for s in tqdm(starts, desc=desc, disable=desc is None, unit="batch", leave=False):
            padded = collate_padded(list(examples[s : s + batch_size]), pad_id)
            ids = padded["input_ids"].to(device)
            mask = padded["attention_mask"].to(device)
            targets = padded["targets"].to(device)
            valid = _lens_mask(targets != IGNORE_INDEX, lens_positions)
            batch.update(mask=mask, valid=valid, targets=targets[valid])
            total += int(valid.sum())
            # The decoder alone: the hooks see every block, and the LM head over all positions
            # (the model's own logits, unused here) is skipped.
            decoder(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return LayerStates([torch.cat(p) for p in pooled], correct, total)


def _lens_mask(valid: Tensor, per_row: int) -> Tensor:
    """``valid`` thinned to at most ``per_row`` evenly spaced True entries per row (0 = all)."""
    if per_row <= 0:
        return valid
    out = torch.zeros_like(valid)
    for row in range(valid.shape[0]):
        idx = valid[row].nonzero().flatten()
        if idx.numel() > per_row:
            pick = torch.linspace(0, idx.numel() - 1, per_row, device=idx.device).round().long()
            idx = idx[pick]
        out[row, idx] = True
    return out


def _projection_weights(model: nn.Module, names: Sequence[str]) -> dict[int, list[Tensor]]:
    from fastmid.engine.blocks import find_decoder_layers
    from fastmid.recipe.probe import layer_projections

    return {
        i: [m.weight.detach() for m in layer_projections(block, names).values()]
        for i, block in enumerate(find_decoder_layers(model))
    }


def weight_change(base: dict[int, list[Tensor]], tuned: dict[int, list[Tensor]]) -> list[float]:
    """Per layer ``||W_tuned - W_base||_F / ||W_base||_F`` over the layer's matrices stacked."""
    if sorted(base) != sorted(tuned):
        raise UserError("base and tuned models have different numbers of layers")
    out = []
    for layer in sorted(base):
        b, t = base[layer], [w.to(device=base[layer][0].device) for w in tuned[layer]]
        if [w.shape for w in b] != [w.shape for w in t]:
            raise UserError(f"layer {layer}: base and tuned projections differ in shape")
        out.append(layerstats.relative_change(b, t))
    return out


@torch.no_grad()
def adapter_weight_change(model: nn.Module) -> list[float]:
    """Per layer ``||s·B·A||_F / ||W||_F`` over the layer's adapted projections stacked, for a
    model with adapters applied (0 for layers without adapters)."""
    from fastmid.engine.blocks import find_decoder_layers
    from fastmid.engine.midblock import lora_modules

    num = [0.0] * len(find_decoder_layers(model))
    den = [0.0] * len(num)
    for layer, _, m in lora_modules(model):
        delta = m.scale * (m.lora_B.double() @ m.lora_A.double())
        num[layer] += float(delta.square().sum())
        den[layer] += float(m.weight.double().square().sum())
    return [math.sqrt(n / d) if d > 0 else 0.0 for n, d in zip(num, den, strict=True)]


def compare(
    base: LayerStates,
    tuned: LayerStates,
    changes: Sequence[float],
    band: Sequence[int] = (),
) -> list[dict[str, Any]]:
    """One row per layer with every metric of :data:`COLUMNS`."""
    num_layers = len(base.pooled)
    if len(tuned.pooled) != num_layers or len(changes) != num_layers:
        raise UserError("base and tuned models have different numbers of layers")
    rows = []
    for layer, (x, y) in enumerate(zip(base.pooled, tuned.pooled, strict=True)):
        rows.append(
            {
                "layer": layer,
                "depth": (layer + 1) / num_layers,
                "in_band": layer in band,
                "cka": layerstats.linear_cka(x, y),
                "cosine": layerstats.cosine_similarity(x, y),
                "mean_shift": layerstats.mean_shift(x, y),
                "erank_base": layerstats.effective_rank(x),
                "erank_tuned": layerstats.effective_rank(y),
                "entropy_base": layerstats.matrix_entropy(x),
                "entropy_tuned": layerstats.matrix_entropy(y),
                "weight_change": float(changes[layer]),
                "logit_lens_base": base.lens_correct[layer] / max(base.lens_total, 1),
                "logit_lens_tuned": tuned.lens_correct[layer] / max(tuned.lens_total, 1),
            }
        )
    return rows


def is_adapter_dir(path: str | os.PathLike | None) -> bool:
    """True for a directory holding an ``adapter_config.json`` (fastmid's or PEFT's)."""
    return path is not None and (Path(path) / "adapter_config.json").is_file()


def analyze(
    load_base: Callable[[], nn.Module],
    tuned: str | os.PathLike | Callable[[], nn.Module],
    examples: Sequence[Any],
    *,
    batch_size: int = 8,
    pad_id: int = 0,
    band: Sequence[int] | None = None,
    progress: bool = False,
    lens_positions: int = 0,
    quantize: str = "none",
) -> dict[str, Any]:
    """Compare a tuned model with its base on ``examples``; returns the JSON-able result.

    ``tuned`` is an adapter directory (applied onto a base loaded by ``load_base``) or a
    callable returning the tuned model. ``band`` (the layers to shade) defaults to the adapter's
    layers, or for a full model to the layers whose weights changed. ``lens_positions``: see
    :func:`collect_states`. ``quantize`` stores the base's frozen linears quantized (as the
    adapter was trained), in both passes.
    """
    from fastmid.engine.adapters import load_adapter, merge
    from fastmid.engine.midblock import lora_modules
    from fastmid.engine.quantize import quantize_frozen
    from fastmid.recipe.probe import PROJECTIONS

    if quantize != "none" and callable(tuned):
        raise UserError("--quantize applies to an adapter; a full tuned model has its own weights")
    model = quantize_frozen(load_base(), quantize)
    base = collect_states(
        model, examples, batch_size, pad_id, "base" if progress else None, lens_positions
    )
    if not callable(tuned):
        if quantize != "none":
            # Adapters are patched in before quantizing: start again from a fresh base.
            del model
            model = load_base()
        load_adapter(model, tuned)
        quantize_frozen(model, quantize)
        adapted = sorted({layer for layer, _, _ in lora_modules(model)})
        changes = adapter_weight_change(model)
        # The tuned pass then runs the plain model with W + s·B·A folded in (W dequantized).
        merge(model, dequantize=True)
    else:
        weights = _projection_weights(model, PROJECTIONS)
        before = {k: [w.cpu().clone() for w in ws] for k, ws in weights.items()}
        del weights
        del model
        model = tuned()
        changes = weight_change(before, _projection_weights(model, PROJECTIONS))
        adapted = [i for i, c in enumerate(changes) if c > 0]
    after = collect_states(
        model, examples, batch_size, pad_id, "tuned" if progress else None, lens_positions
    )
    band = adapted if band is None else sorted(band)
    rows = compare(base, after, changes, band)
    worst = min(rows, key=lambda r: r["cka"])
    return {
        "num_layers": len(rows),
        "samples": len(examples),
        "tokens": sum(len(e.input_ids) for e in examples),
        "lens_positions": base.lens_total,
        "band": list(band),
        "min_cka": {"layer": worst["layer"], "cka": worst["cka"]},
        "layers": rows,
    }


# --------------------------------------------------------------------------------------------
# Outputs


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {
                k: (f"{v:.6g}" if isinstance(v, float) else int(v) if isinstance(v, bool) else v)
                for k, v in row.items()
            }
        )
    return buf.getvalue()


_PANELS = (
    ("linear CKA (base vs tuned)", ("cka",)),
    ("cosine similarity", ("cosine",)),
    ("mean shift ||μ_tuned − μ_base||", ("mean_shift",)),
    ("weight change ||ΔW|| / ||W||", ("weight_change",)),
    ("effective rank / min(N, D)", ("erank_base", "erank_tuned")),
    ("matrix entropy (normalised)", ("entropy_base", "entropy_tuned")),
    ("logit-lens next-token accuracy", ("logit_lens_base", "logit_lens_tuned")),
)


def plot_profile(result: dict[str, Any], path: Path, title: str = "") -> None:
    """Depth-profile PNG: one panel per metric against relative depth, the band shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["layers"]
    num_layers = result["num_layers"]
    depth = [r["depth"] for r in rows]
    band = result["band"]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.5), constrained_layout=True)
    for ax, (label, keys) in zip(axes.flat, _PANELS, strict=False):
        for key in keys:
            name = key.rsplit("_", 1)[-1] if len(keys) > 1 else None
            ax.plot(depth, [r[key] for r in rows], marker="o", markersize=3, label=name)
        if band:
            # Shade from half a layer before the band's first point to half a layer after its last.
            ax.axvspan(
                (band[0] + 0.5) / num_layers,
                (band[-1] + 1.5) / num_layers,
                color="tab:green",
                alpha=0.12,
                label="adapted band" if len(keys) > 1 else None,
            )
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("relative depth")
        ax.set_xlim(0, 1.02)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    summary = axes.flat[-1]
    summary.axis("off")
    lines = [
        f"layers: {num_layers}",
        f"band: {band[0]}-{band[-1]}" if band else "band: none",
        f"samples: {result['samples']}, tokens: {result['tokens']}",
        f"logit-lens positions: {result['lens_positions']}",
        f"min CKA {result['min_cka']['cka']:.4f} at layer {result['min_cka']['layer']}",
    ]
    summary.text(0.02, 0.95, "\n".join(lines), va="top", family="monospace", fontsize=10)
    if title:
        fig.suptitle(title)
    replace_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def write_outputs(result: dict[str, Any], out_dir: str | os.PathLike, title: str = "") -> dict:
    """Write ``layers.csv``, ``analysis.json`` and ``depth_profile.png``; returns their paths."""
    out = Path(out_dir)
    paths = {
        "csv": out / "layers.csv",
        "json": out / "analysis.json",
        "png": out / "depth_profile.png",
    }
    text = _csv_text(result["layers"])
    replace_atomic(paths["csv"], lambda tmp: Path(tmp).write_text(text))
    blob = json.dumps(result, indent=2) + "\n"
    replace_atomic(paths["json"], lambda tmp: Path(tmp).write_text(blob))
    plot_profile(result, paths["png"], title)
    return paths


# --------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fastmid analyze``."""
    add_model_argument(parser, "--base", role="base model")
    parser.add_argument(
        "--tuned",
        required=True,
        help="tuned model dir, adapter dir (fastmid's or PEFT's) or `fastmid train` output dir",
    )
    add_data_argument(parser, "test")
    parser.add_argument(
        "--samples", type=int, default=200, help="examples to analyse (default: %(default)s)"
    )
    add_format_argument(parser)
    parser.add_argument(
        "--max-length", type=int, default=128, help="tokens per example (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, help="examples per forward pass (default: %(default)s)"
    )
    parser.add_argument(
        "--band", default=None, help="layers to shade, e.g. 6-23 (default: the adapted layers)"
    )
    parser.add_argument(
        "--lens-positions",
        type=int,
        default=16,
        help="logit-lens positions per example, evenly spaced; 0 = every position "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--output-dir",
        default=DEFAULT_OUTPUT_DIR,
        help="where layers.csv, analysis.json and depth_profile.png go (default: %(default)s)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="hide the progress bar (default: shown)"
    )
    parser.add_argument(
        "--quantize",
        default="none",
        choices=QUANTIZE_METHODS,
        help="frozen decoder linears stored quantized, as the adapter was trained (default: none)",
    )


@holds_output_dir(lambda args: args.output_dir)
def run(args: argparse.Namespace) -> int:
    """``fastmid analyze``: compute the table, write CSV + JSON + PNG, print the table."""
    from fastmid.engine.adapters import resolve_adapter_dir
    from fastmid.engine.midblock import parse_band
    from fastmid.engine.models import load_model
    from fastmid.recipe.data import bundled_path, load_records, tokenize_records

    for name in ("samples", "max_length", "batch_size"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if args.lens_positions < 0:
        raise UserError("--lens-positions must be 0 (all) or positive")
    tuned_path = Path(args.tuned)
    if not tuned_path.exists():
        raise UserError(f"--tuned not found: {args.tuned}")
    tuned_path = resolve_adapter_dir(tuned_path)
    band = None
    if args.band is not None:
        band = parse_band(args.band)
        if not isinstance(band, list):
            raise UserError("--band must list layers, e.g. 6-23 or 3,5,7")
    data = Path(args.data) if args.data else bundled_path("test")
    records = load_records(data)[: args.samples]
    print(f"fastmid analyze: results go to {args.output_dir} (--output-dir)", flush=True)
    # The base is loaded here for its tokenizer; analyze() takes it over (and may free it).
    model, tokenizer, base_name = load_model(args.base)
    examples = tokenize_records(
        records, tokenizer, fmt=args.format, max_length=args.max_length, loss_on="all"
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    held = [model]
    del model

    def load_base() -> nn.Module:
        return held.pop() if held else load_model(args.base)[0]

    def load_tuned() -> nn.Module:
        return load_model(str(tuned_path))[0]

    tuned = str(tuned_path) if is_adapter_dir(tuned_path) else load_tuned
    result = analyze(
        load_base,
        tuned,
        examples,
        batch_size=args.batch_size,
        pad_id=pad_id,
        band=band,
        progress=not args.no_progress,
        lens_positions=args.lens_positions,
        quantize=args.quantize,
    )
    result.update(base=base_name, tuned=str(tuned_path), data=str(data))
    paths = write_outputs(result, args.output_dir, title=f"{args.tuned} vs {base_name}")
    print(
        f"{'layer':>5} {'band':>4} {'cka':>7} {'cos':>7} {'shift':>8} {'erank':>6} "
        f"{'entropy':>7} {'dW/W':>8} {'lens':>6}"
    )
    for r in result["layers"]:
        print(
            f"{r['layer']:>5} {'*' if r['in_band'] else '':>4} {r['cka']:>7.4f} "
            f"{r['cosine']:>7.4f} {r['mean_shift']:>8.4g} {r['erank_tuned']:>6.3f} "
            f"{r['entropy_tuned']:>7.3f} {r['weight_change']:>8.3g} "
            f"{r['logit_lens_tuned']:>6.3f}"
        )
    print(f"wrote {paths['csv']}, {paths['json']}, {paths['png']}")
    return 0
