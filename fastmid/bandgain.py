"""A band chosen by where a short tuning run actually reduces the loss.

The probe in :mod:`fastmid.probe` ranks layers by how sensitive the untuned model is. This
criterion asks a more direct question: if every layer gets a small adapter and the model is
tuned for a few steps, which layers' adapters did the loss reduction come from?

**Loss-change allocation.** For a step with gradient ``g`` and parameter update ``Δθ``, the
first-order change of the loss is ``⟨g, Δθ⟩``; split over the parameters of each layer it gives
that layer's share. Summed over the probe run, ``gain_l = −Σ_steps ⟨g_l, Δθ_l⟩`` is the loss
reduction the adapters of block ``l`` are responsible for (positive = helped). It costs nothing
beyond the probe run itself: no extra forward or backward passes.

**The rule**: the contiguous window of ``width`` layers (default: the size of the default
20%–80% band, so the budget-matched rank is the same as the default's) with the largest total
gain; ties go to the window nearest the middle of the network, then to the lower one.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fastmid.errors import UserError

__all__ = ["layer_gains", "recommend_band_by_gain"]


def layer_gains(
    model: nn.Module,
    examples: Sequence[Any],
    pad_id: int,
    *,
    steps: int = 8,
    batch_size: int = 8,
    rank: int = 8,
    alpha: float = 16.0,
    lr: float = 1e-3,
    seed: int = 0,
) -> tuple[list[float], list[float]]:
    """Tune a copy of ``model`` with rank-``rank`` adapters on every layer for ``steps`` AdamW
    steps (``batch_size`` examples each, cycling through ``examples``) and allocate the loss
    change to the layers. Returns ``(gain per layer, training loss per step)``; ``model`` itself
    is not modified.
    """
    from fastmid.data import collate_padded
    from fastmid.loss import forward_loss
    from fastmid.midblock import MidBlockConfig, apply_midblock, lora_modules

    examples = [e for e in examples if e.num_loss_tokens > 0]
    if not examples:
        raise UserError("the gain probe needs at least one example with loss tokens")
    if steps < 1 or batch_size < 1:
        raise UserError("the gain probe needs at least one step of at least one example")
    work = copy.deepcopy(model)
    device = next(work.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        apply_midblock(
            work,
            MidBlockConfig(band="all", rank=rank, alpha=alpha, dropout=0.0, fuse_groups=False),
        )
    by_layer: dict[int, list[nn.Parameter]] = {}
    for layer, _, module in lora_modules(work):
        by_layer.setdefault(layer, []).extend([module.lora_A, module.lora_B])
    layers = sorted(by_layer)
    params = [p for layer in layers for p in by_layer[layer]]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gains = [0.0] * len(layers)
    losses = []
    work.train()  # dropout is 0, so train mode only matters for the frozen model (none there)
    for step in range(steps):
        start = (step * batch_size) % len(examples)
        chunk = [examples[(start + i) % len(examples)] for i in range(batch_size)]
        batch = {k: v.to(device) for k, v in collate_padded(chunk, pad_id).items()}
        loss_sum, count = forward_loss(work, batch)
        loss = loss_sum / max(count, 1)
        loss.backward()
        before = [p.detach().clone() for p in params]
        optimizer.step()
        with torch.no_grad():
            i = 0
            for slot, layer in enumerate(layers):
                for p in by_layer[layer]:
                    delta = p.detach() - before[i]
                    gains[slot] -= float((p.grad.double() * delta.double()).sum())
                    i += 1
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    del work
    full = [0.0] * (max(layers) + 1)
    for slot, layer in enumerate(layers):
        full[layer] = gains[slot]
    return full, losses


def recommend_band_by_gain(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Any],
    *,
    width: int | None = None,
    **probe: Any,
) -> tuple[list[int], dict[str, Any]]:
    """The ``width``-layer window whose adapters reduced the loss most in a short all-layer
    probe run (see the module docstring). Returns ``(layers, info)`` with the per-layer
    ``gain``, the probe's ``losses`` and a one-line ``reason``; ``probe`` goes to
    :func:`layer_gains`.
    """
    from fastmid.midblock import PAPER_BAND, find_decoder_layers, resolve_band
    from fastmid.probe import select_band

    if getattr(model, "fastmid_state", None) is not None:
        raise ValueError("recommend_band_by_gain needs the untuned model, before apply_midblock")
    num_layers = len(find_decoder_layers(model))
    default = resolve_band(PAPER_BAND, num_layers)
    width = len(default) if width is None else width
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    gains, losses = layer_gains(model, examples, pad_id, **probe)
    # select_band picks the lowest mean; the largest gain is the lowest negated gain.
    layers, _ = select_band([-g for g in gains], width)
    total = sum(gains) or 1.0

    def share(idx: Sequence[int]) -> float:
        return sum(gains[i] for i in idx) / total

    reason = (
        f"layers {layers[0]}-{layers[-1]} of 0-{num_layers - 1}: the {width}-layer window "
        f"whose adapters reduced the loss most in a {len(losses)}-step all-layer probe run "
        f"({share(layers):.0%} of the reduction; the default band {default[0]}-{default[-1]} "
        f"{share(default):.0%}); probe loss {losses[0]:.3f} → {losses[-1]:.3f}"
    )
    info = {
        "layers": layers,
        "reason": reason,
        "num_layers": num_layers,
        "width": width,
        "gain": gains,
        "losses": losses,
    }
    return layers, info
