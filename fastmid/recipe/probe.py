"""``fastmid probe``: a cheap per-layer sensitivity profile of an untuned model, and a band.

Two signals are measured on a few batches of the training data, with the model as it is:

- **gradient ratio** ``g_l = ||∇L/∂W_l||_F / ||W_l||_F`` over the stacked q/k/v/o projections of
  block ``l`` (``L`` = mean next-token cross-entropy of the batch; averaged over batches). It is
  how hard the loss pulls on the layer relative to its size: layers the data pulls hardest on
  are the ones fine-tuning moves most.
- **rotation** ``ρ_l = mean_t (1 − cos(h_in, h_out))`` over the real tokens: how much block ``l``
  turns the residual stream it receives. Blocks that rewrite their input (typically the first
  and the last few) are where a change of weights changes representations most.

Each signal is divided by its median over layers and the two are averaged, giving a score
``s_l`` where 1 means "a typical layer". **The rule**: slide a window of ``width`` contiguous layers
(default: the size of the default 20%–80% band, so the budget-matched rank is unchanged) over
depth and pick the window with the lowest mean score; ties go to the window nearest the middle
of the network, then to the lower one. This is the paper's finding, made measurable per model:
the middle of the network is the stable part worth adapting, the edges are the sensitive part.
The result is deterministic for a given model and data.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fastmid.engine.midblock import PAPER_TARGETS
from fastmid.errors import UserError
from fastmid.recipe.inputs import add_data_argument, add_format_argument, add_model_argument

__all__ = [
    "add_arguments",
    "best_window",
    "layer_projections",
    "recommend_band",
    "run",
    "select_band",
]

PROJECTIONS = PAPER_TARGETS


def layer_projections(block: nn.Module, names: Sequence[str] = PROJECTIONS) -> dict[str, nn.Module]:
    """The linear submodules of a decoder block whose name ends with one of ``names``."""
    found = {}
    for path, module in block.named_modules():
        leaf = path.rsplit(".", 1)[-1]
        if leaf in names and hasattr(module, "weight"):
            found[leaf] = module
    return found


def best_window(values: dict[int, float], num_layers: int, width: int) -> int:
    """The start of the ``width``-layer window with the lowest value among ``values`` (window
    start → value); ties go to the window nearest the middle of ``num_layers``, then the lowest."""
    centre = (num_layers - width) / 2

    def key(start: int) -> tuple[float, float, int]:
        # Round so that float noise in equal windows does not decide the tie.
        return (round(values[start], 9), abs(start - centre), start)

    return min(values, key=key)


def select_band(scores: Sequence[float], width: int) -> tuple[list[int], list[float]]:
    """The contiguous ``width``-layer window with the lowest mean score (ties: nearest the middle,
    then lowest); returns (layers, mean score of every window start)."""
    n = len(scores)
    if not 1 <= width <= n:
        raise ValueError(f"window width {width} must be between 1 and the {n} layers")
    means = [sum(scores[s : s + width]) / width for s in range(n - width + 1)]
    best = best_window(dict(enumerate(means)), n, width)
    return list(range(best, best + width)), means


def _hidden(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _span(layers: Sequence[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if layers else "none"


def recommend_band(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Any],
    *,
    batch_size: int = 8,
    max_batches: int = 4,
    width: int | None = None,
) -> tuple[list[int], dict[str, Any]]:
    """Profile the untuned ``model`` on the first ``batch_size * max_batches`` examples and pick a
    contiguous band by the rule in the module docstring.

    Returns ``(layers, info)``: the chosen layer indices and a JSON-able dict with the per-layer
    ``grad_ratio``, ``rotation`` and ``score`` lists, the window means and a one-line ``reason``.
    The model's ``requires_grad`` flags and train/eval mode are restored afterwards and its
    ``.grad`` fields are left empty.
    """
    from fastmid.engine.blocks import find_decoder_layers
    from fastmid.engine.loss import IGNORE_INDEX
    from fastmid.engine.midblock import PAPER_BAND, resolve_band
    from fastmid.recipe.data import collate_padded

    if getattr(model, "fastmid_state", None) is not None:
        raise ValueError("recommend_band needs the untuned model, before apply_midblock")
    examples = [e for e in examples if len(e.input_ids) > 1][: batch_size * max_batches]
    if not examples:
        raise UserError("the probe needs at least one example with two or more tokens")
    blocks = find_decoder_layers(model)
    num_layers = len(blocks)
    default = resolve_band(PAPER_BAND, num_layers)
    width = len(default) if width is None else width
    projections = [layer_projections(b) for b in blocks]
    if any(not p for p in projections):
        raise UserError("cannot find q/k/v/o projections in every decoder block of the model")

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    weights = [[m.weight for m in p.values()] for p in projections]
    grad_ratio = [0.0] * num_layers
    rot_sum = torch.zeros(num_layers, dtype=torch.float64, device=device)
    rot_count = 0
    current_mask: list[Tensor] = []
    handles = []

    def pre_hook(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            module._fastmid_probe_in = (args[0] if args else kwargs["hidden_states"]).detach()

        return hook

    def post_hook(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            h_in = module.__dict__.pop("_fastmid_probe_in")
            h_out = _hidden(out).detach()
            cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
            rot_sum[index] += ((1 - cos.double()) * current_mask[0]).sum()

        return hook

    try:
        model.eval()  # no dropout: the profile must not depend on the RNG
        for p in model.parameters():
            p.requires_grad_(False)
        for ws in weights:
            for w in ws:
                w.requires_grad_(True)
                w.grad = None
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
            handles.append(block.register_forward_hook(post_hook(i), with_kwargs=True))
        norms = [
            math.sqrt(sum(float(w.detach().double().square().sum()) for w in ws)) for ws in weights
        ]
        batches = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
        tokens = 0
        for batch in batches:
            padded = collate_padded(batch, pad_id)
            ids, mask = padded["input_ids"].to(device), padded["attention_mask"].to(device)
            targets = padded["targets"].to(device)
            current_mask[:] = [mask.double()]
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            valid = targets != IGNORE_INDEX
            loss = torch.nn.functional.cross_entropy(logits[valid].float(), targets[valid])
            loss.backward()
            rot_count += int(mask.sum())
            tokens += int(valid.sum())
            for layer, ws in enumerate(weights):
                g = math.sqrt(sum(float(w.grad.double().square().sum()) for w in ws))
                grad_ratio[layer] += g / norms[layer] / len(batches)
                for w in ws:
                    w.grad = None
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)

    rotation = (rot_sum / max(rot_count, 1)).tolist()
    g_med, r_med = statistics.median(grad_ratio), statistics.median(rotation)
    score = [
        0.5 * (g / g_med if g_med > 0 else 1.0) + 0.5 * (r / r_med if r_med > 0 else 1.0)
        for g, r in zip(grad_ratio, rotation, strict=True)
    ]
    layers, window_means = select_band(score, width)

    def mean_of(idx: Sequence[int]) -> str:
        return f"{sum(score[i] for i in idx) / len(idx):.2f}" if idx else "n/a"

    below, above = list(range(layers[0])), list(range(layers[-1] + 1, num_layers))
    reason = (
        f"layers {_span(layers)} of 0-{num_layers - 1}: the {width}-layer window with the lowest "
        f"mean sensitivity {mean_of(layers)} (1 = median layer; gradient ratio and rotation "
        f"over {tokens} tokens); default 20-80% band {_span(default)} scores "
        f"{mean_of(default)}; layers below {mean_of(below)}, above {mean_of(above)}"
    )
    info = {
        "layers": layers,
        "reason": reason,
        "num_layers": num_layers,
        "width": width,
        "default_band": default,
        "grad_ratio": grad_ratio,
        "rotation": rotation,
        "score": score,
        "window_means": window_means,
        "examples": len(examples),
        "tokens": tokens,
    }
    return layers, info


# --------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fastmid probe``."""
    add_model_argument(parser)
    add_data_argument(parser, "train")
    add_format_argument(parser)
    parser.add_argument(
        "--max-length", type=int, default=128, help="tokens per example (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, help="examples per batch (default: %(default)s)"
    )
    parser.add_argument(
        "--batches", type=int, default=4, help="batches to profile (default: %(default)s)"
    )
    parser.add_argument(
        "--width",
        type=int,
        default=None,
        help="band width in layers (default: as many as the 20%%-80%% band)",
    )
    parser.add_argument(
        "--output", default=None, help="also write the profile as JSON here (default: not written)"
    )


def run(args: argparse.Namespace) -> int:
    """``fastmid probe``: print the per-layer profile and the least sensitive band."""
    from fastmid.engine.blocks import find_decoder_layers
    from fastmid.engine.models import load_model
    from fastmid.fileio import write_text_atomic
    from fastmid.recipe.data import bundled_path, load_records, tokenize_records

    for name in ("max_length", "batch_size", "batches"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    data = Path(args.data) if args.data else bundled_path("train")
    model, tokenizer, name = load_model(args.model)
    records = load_records(data)[: args.batch_size * args.batches]
    examples = tokenize_records(
        records, tokenizer, fmt=args.format, max_length=args.max_length, loss_on="all"
    )
    num_layers = len(find_decoder_layers(model))
    if args.width is not None and not 1 <= args.width <= num_layers:
        raise UserError(f"--width must be between 1 and the model's {num_layers} layers")
    layers, info = recommend_band(
        model,
        tokenizer,
        examples,
        batch_size=args.batch_size,
        max_batches=args.batches,
        width=args.width,
    )
    print(f"model {name}: {info['num_layers']} layers, {info['tokens']} tokens profiled")
    print(f"{'layer':>5} {'grad_ratio':>11} {'rotation':>9} {'score':>6}  band")
    for i in range(info["num_layers"]):
        mark = "*" if i in layers else ""
        print(
            f"{i:>5} {info['grad_ratio'][i]:>11.4g} {info['rotation'][i]:>9.4f} "
            f"{info['score'][i]:>6.2f}  {mark}"
        )
    print(f"least sensitive band: {_span(layers)}  ({info['reason']})")
    # On the bundled data this band trained worse than the default one: the profile is a map
    # of the model, and choosing a band to train is --band auto's job.
    print(
        "this is a diagnostic map of the untuned model, not a band to train with: "
        "--band auto chooses by tuning candidate windows briefly (fastmid train --band auto)"
    )
    if args.output:
        info["model"] = name
        write_text_atomic(Path(args.output), json.dumps(info, indent=2) + "\n")
    return 0
