"""Bands chosen by what short tuning runs do, layer by layer.

The probe in :mod:`fastmid.recipe.probe` ranks layers by how sensitive the untuned model is. The
criteria here ask about tuning itself. A *probe run* tunes a copy of the model with small
(rank-8) adapters for a few AdamW steps; one probe run loop (:func:`probe_run`) serves every
criterion. Three score the layers of one all-layer probe run:

- ``gain`` — **loss-change allocation.** For a step with gradient ``g`` and parameter update
  ``Δθ`` the first-order change of the loss is ``⟨g, Δθ⟩``; split over the parameters of each
  layer it gives that layer's share. ``gain_l = −Σ_steps ⟨g_l, Δθ_l⟩`` is the training-loss
  reduction the adapters of block ``l`` are responsible for (positive = helped). It needs no
  passes beyond the probe run. It rewards large gradients.
- ``snr`` — **gradient signal-to-noise ratio.** Each step's batch is split into ``M``
  micro-batches and the gradient ``g_{l,m}`` of each micro-batch's mean loss is kept per layer.
  With ``ḡ_l`` their mean and ``v_l = Σ_coords Var_m(g_{l,m})`` (sample variance across the
  micro-batches, summed over the layer's adapter coordinates),
  ``snr_l = mean_steps ‖ḡ_l‖ / √v_l``. It is scale-free: a layer scores high when different
  examples push its adapters the same way, not when its gradients are large. Pure noise
  scores about ``1/√M``.
- ``heldout`` — **held-out loss-change allocation.** A quarter of the examples is kept out of
  the probe run; before each update the gradient ``h_l`` of the held-out loss is taken, and
  ``heldout_l = −Σ_steps ⟨h_l, Δθ_l⟩`` is the held-out loss reduction block ``l``'s updates
  caused: fitting the training batches that does not carry over scores nothing.

The rule for these: the contiguous window of ``width`` layers (default: the size of the
default 20%–80% band, so the budget-matched rank is the same as the default's) with the
largest total score.

An all-layer run credits each layer with what it did *alongside all the others*; a band is
tuned alone. ``window`` measures that directly: it gives each of about five candidate windows
of ``width`` layers (evenly spaced from bottom to top, always including the bottom, the top
and the default band) its own probe run on three quarters of the examples, and picks the
window with the **lowest loss on the held-out quarter** after its run. It costs one probe run
per candidate, each cheaper than an all-layer one (blocks below the window run without
autograd). ``--band auto`` uses it with the run's own adapters and learning rate, so each
candidate is a short version of the run itself.

Ties (every criterion) go to the window nearest the middle of the network, then to the lower one.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fastmid.engine.midblock import MidBlockConfig
from fastmid.errors import UserError

__all__ = [
    "AUTO_CRITERIA",
    "AUTO_CRITERION",
    "CRITERIA",
    "ProbeRun",
    "band_tradeoff",
    "choose_auto_band",
    "gradient_snr",
    "probe_run",
    "recommend_band_by_probe_run",
    "tradeoff_line",
    "window_starts",
]

CRITERIA = ("gain", "snr", "heldout", "window")
# Micro-batches per step for the snr criterion: the variance needs at least two, and more
# micro-batches of a fixed-size batch make each one noisier; four of the default 8 examples
# keeps two examples per micro-batch.
SNR_MICRO_BATCHES = 4
# 1/HELDOUT_SHARE of the examples is kept out of the probe runs of heldout and window.
HELDOUT_SHARE = 4
# The adapters of the all-layer probe runs (gain, snr, heldout): small and quick to tune.
PROBE_ADAPTER = MidBlockConfig(rank=8, alpha=16.0, dropout=0.0)
# Windows the window criterion tunes (about; the bottom, top and default band always among them):
# each is a probe run, so this is the criterion's cost.
WINDOW_CANDIDATES = 5
# Steps of each window's probe run. On SmolLM2 and the bundled data, 8 steps of rank-8 adapters
# ranked the windows unlike full training did (it chose the default band, which trained worse
# than the top one); 16 steps with the run's own adapters ranked them as training did.
WINDOW_STEPS = 16
# What `fastmid compare --auto-criterion` may name: the sensitivity probe of fastmid.recipe.probe,
# or one of the probe-run criteria here; `--band auto` uses AUTO_CRITERION.
AUTO_CRITERIA = ("sensitivity", *CRITERIA)
AUTO_CRITERION = "window"
# The band choice looks at the first this many training examples.
AUTO_EXAMPLES = 64


@dataclass
class ProbeRun:
    """What a probe run measured; per-layer lists are indexed by layer."""

    gain: list[float]  # −Σ⟨g_l, Δθ_l⟩ over the steps (training loss)
    snr: list[float] | None  # mean over steps of ‖ḡ_l‖/√v_l; None with one micro-batch
    heldout: list[float] | None  # −Σ⟨h_l, Δθ_l⟩ (held-out loss); None unless allocated
    losses: list[float]  # training loss per step, before its update
    # Held-out loss before the first update and after the last (None without held-out examples).
    heldout_before: float | None
    heldout_after: float | None

    def scores(self, criterion: str) -> list[float]:
        """The per-layer score of ``criterion`` (larger = a better layer to adapt)."""
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
        scores = getattr(self, criterion)
        if scores is None:
            raise ValueError(f"this probe run did not measure {criterion}")
        return scores


def gradient_snr(micro_grads: Tensor) -> float:
    """``‖mean g‖ / √(Σ_coords sample variance of g)`` of ``micro_grads`` (M, P): the gradients
    of M micro-batches, one row each. Identical rows give inf (0 when they are all zero)."""
    if micro_grads.shape[0] < 2:
        raise ValueError("the gradient snr needs at least two micro-batches")
    g = micro_grads.double()
    signal = float(g.mean(dim=0).norm())
    noise = float(g.var(dim=0, unbiased=True).sum().sqrt())
    if noise == 0:
        return float("inf") if signal > 0 else 0.0
    return signal / noise


def _split(items: Sequence[Any], parts: int) -> list[list[Any]]:
    """``items`` in ``parts`` contiguous chunks whose sizes differ by at most one."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        out.append(list(items[start:end]))
        start = end
    return out


def probe_run(
    model: nn.Module,
    examples: Sequence[Any],
    pad_id: int,
    *,
    heldout: Sequence[Any] = (),
    allocate_heldout: bool = True,
    band: Sequence[int] | str = "all",
    steps: int = 8,
    batch_size: int = 8,
    micro_batches: int = 1,
    adapter: MidBlockConfig = PROBE_ADAPTER,
    lr: float = 1e-3,
    seed: int = 0,
) -> ProbeRun:
    """Tune a copy of ``model`` with adapters shaped like ``adapter``'s (its targets, rank or
    budget-matched rank, alpha, rsLoRA; no dropout) on the layers of ``band`` (default: every
    layer) for ``steps`` AdamW steps (``batch_size`` examples each, cycling through
    ``examples``, each step's batch split into ``micro_batches``) and score the adapted layers
    (see the module docstring; layers outside the band score 0). ``heldout`` examples are
    never trained on: their loss is measured before and after the run, and with
    ``allocate_heldout`` its change is allocated to the layers at every step (one more
    backward pass per step). ``model`` itself is not modified: the copy shares its weights
    (frozen, so untouched) and has adapters of its own.
    """
    from fastmid.engine.blocks import find_decoder_layers
    from fastmid.engine.loss import forward_loss
    from fastmid.engine.midblock import apply_midblock, lora_modules
    from fastmid.recipe.data import collate_padded

    examples = [e for e in examples if e.num_loss_tokens > 0]
    heldout = [e for e in heldout if e.num_loss_tokens > 0]
    if not examples:
        raise UserError("the probe run needs at least one example with loss tokens")
    if steps < 1 or batch_size < 1:
        raise UserError("the probe run needs at least one step of at least one example")
    if not 1 <= micro_batches <= batch_size:
        raise ValueError(f"micro_batches must be between 1 and batch_size, got {micro_batches}")
    # The probe's copy shares the model's tensors: it adds adapters of its own and trains only
    # them, so the frozen weights need no second copy (a large model could not afford one).
    # apply_midblock freezes every parameter; their flags are put back afterwards.
    flags = [(p, p.requires_grad) for p in model.parameters()]
    work = copy.deepcopy(model, memo={id(t): t for t in (*model.parameters(), *model.buffers())})
    try:
        num_layers = len(find_decoder_layers(work))
        device = next(work.parameters()).device
        spec = band if isinstance(band, str) else list(band)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            config = MidBlockConfig(
                band=spec,
                targets=adapter.targets,
                rank=adapter.rank,
                rank_budget=adapter.rank_budget,
                alpha=adapter.alpha,
                use_rslora=adapter.use_rslora,
                dropout=0.0,
                fuse_groups=False,
            )
            apply_midblock(work, config)
        by_layer: dict[int, list[nn.Parameter]] = {}
        for layer, _, module in lora_modules(work):
            by_layer.setdefault(layer, []).extend([module.lora_A, module.lora_B])
        layers = sorted(by_layer)
        params = [p for layer in layers for p in by_layer[layer]]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

        def batch_loss(batch_examples: list[Any]) -> tuple[Tensor, int]:
            batch = {k: v.to(device) for k, v in collate_padded(batch_examples, pad_id).items()}
            return forward_loss(work, batch)

        def loss_grads(batch_examples: list[Any]) -> tuple[list[Tensor], float, int]:
            """Gradients of the summed loss of ``batch_examples`` (one per layer, flattened), the
            summed loss and its token count."""
            for p in params:
                p.grad = None
            loss_sum, count = batch_loss(batch_examples)
            loss_sum.backward()
            flat = [
                torch.cat([p.grad.detach().double().flatten() for p in by_layer[layer]])
                for layer in layers
            ]
            return flat, float(loss_sum.detach()), int(count)

        def flat_params() -> list[Tensor]:
            return [
                torch.cat([p.detach().double().flatten() for p in by_layer[layer]])
                for layer in layers
            ]

        # The held-out set in batches of at most batch_size examples.
        held_parts = _split(heldout, -(-len(heldout) // batch_size)) if heldout else []

        def heldout_loss() -> float:
            with torch.no_grad():
                sums = [batch_loss(part) for part in held_parts]
            return sum(float(loss) for loss, _ in sums) / sum(count for _, count in sums)

        def allocate(grads: list[Tensor], deltas: list[Tensor]) -> list[float]:
            return [-float(torch.dot(g, d)) for g, d in zip(grads, deltas, strict=True)]

        gains = [0.0] * len(layers)
        held_gains = [0.0] * len(layers)
        snr = [0.0] * len(layers)
        losses: list[float] = []
        held_before = heldout_loss() if heldout else None
        allocating = bool(heldout) and allocate_heldout
        work.train()  # dropout is 0, so train mode only matters for the frozen model (none there)
        for step in range(steps):
            start = (step * batch_size) % len(examples)
            chunk = [examples[(start + i) % len(examples)] for i in range(batch_size)]
            # Gradients of each micro-batch's mean loss; the step's gradient weights them by their
            # tokens, so it is the gradient of the whole batch's mean loss whatever the split.
            micro = [loss_grads(part) for part in _split(chunk, micro_batches)]
            total = sum(count for _, _, count in micro)
            step_grads = [
                sum(grads[slot] for grads, _, _ in micro) / total for slot in range(len(layers))
            ]
            losses.append(sum(loss for _, loss, _ in micro) / total)
            if micro_batches > 1:
                for slot in range(len(layers)):
                    rows = torch.stack([grads[slot] / count for grads, _, count in micro])
                    snr[slot] += gradient_snr(rows) / steps
            if allocating:
                held = [loss_grads(part) for part in held_parts]
                held_total = sum(count for _, _, count in held)
                held_grads = [
                    sum(grads[slot] for grads, _, _ in held) / held_total
                    for slot in range(len(layers))
                ]
            # The optimizer steps on the training gradient, whatever the last backward left.
            for slot, layer in enumerate(layers):
                offset = 0
                for p in by_layer[layer]:
                    p.grad = step_grads[slot][offset : offset + p.numel()].view_as(p).to(p.dtype)
                    offset += p.numel()
            before = flat_params()
            optimizer.step()
            deltas = [a - b for a, b in zip(flat_params(), before, strict=True)]
            gains = [x + y for x, y in zip(gains, allocate(step_grads, deltas), strict=True)]
            if allocating:
                shares = allocate(held_grads, deltas)
                held_gains = [x + y for x, y in zip(held_gains, shares, strict=True)]
            optimizer.zero_grad(set_to_none=True)

        def full(values: list[float]) -> list[float]:
            out = [0.0] * num_layers
            for slot, layer in enumerate(layers):
                out[layer] = values[slot]
            return out

        return ProbeRun(
            gain=full(gains),
            snr=full(snr) if micro_batches > 1 else None,
            heldout=full(held_gains) if allocating else None,
            losses=losses,
            heldout_before=held_before,
            heldout_after=heldout_loss() if heldout else None,
        )
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


# What each criterion's reason says it measured.
_DESCRIPTION = {
    "gain": "whose adapters reduced the training loss most",
    "snr": "with the highest gradient signal-to-noise ratio across micro-batches",
    "heldout": "whose updates reduced the held-out loss most",
}


def window_starts(num_layers: int, width: int, candidates: int = WINDOW_CANDIDATES) -> list[int]:
    """Starts of the windows the ``window`` criterion tries: about ``candidates`` evenly spaced
    from the bottom to the top of depth, always with the bottom, the top and the default band."""
    from fastmid.engine.midblock import PAPER_BAND, resolve_band

    last = num_layers - width
    if last < 0:
        raise ValueError(f"window width {width} must be between 1 and the {num_layers} layers")
    stride = max(1, -(-last // max(candidates - 1, 1)))
    starts = set(range(0, last + 1, stride)) | {last}
    default = resolve_band(PAPER_BAND, num_layers)
    if len(default) == width:
        starts.add(default[0])
    return sorted(starts)


def _split_heldout(examples: list[Any]) -> tuple[list[Any], list[Any]]:
    """The examples to train on and the last quarter, held out."""
    cut = len(examples) - len(examples) // HELDOUT_SHARE
    if cut in (0, len(examples)):
        raise UserError(
            f"a held-out criterion needs at least {HELDOUT_SHARE} examples (a quarter is held out)"
        )
    return examples[:cut], examples[cut:]


def band_tradeoff(
    before: float, band_after: float, all_after: float, band_seconds: float, all_seconds: float
) -> dict[str, float]:
    """What a band costs and saves against all layers, from one probe run of each.

    ``gap`` is the share of the all-layer held-out loss reduction the band gives up:
    ``(band_after − all_after) / (before − all_after)`` (0 when the band does as well or better,
    or when all layers gained nothing); ``time`` is the band's probe time over the all-layer one.
    """
    gain = before - all_after
    gap = max(0.0, band_after - all_after) / gain if gain > 0 else 0.0
    return {"gap": gap, "time": band_seconds / all_seconds if all_seconds > 0 else 1.0}


def tradeoff_line(
    layers: Sequence[int], start: int, width: int, tradeoff: dict[str, float], limit: float
) -> str:
    """One line for the user: the quality the best band gives up and the time it saves."""
    chosen = "all layers" if len(layers) > width else f"layers {layers[0]}-{layers[-1]}"
    return (
        f"band trade-off: layers {start}-{start + width - 1} keep "
        f"{1 - tradeoff['gap']:.0%} of the all-layer held-out gain (gives up "
        f"{tradeoff['gap']:.0%}, limit --max-quality-gap {limit:.0%}) in "
        f"{tradeoff['time']:.2f}x the all-layer probe time → training {chosen}"
    )


def recommend_band_by_probe_run(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Any],
    *,
    criterion: str = "gain",
    width: int | None = None,
    max_quality_gap: float | None = None,
    **probe: Any,
) -> tuple[list[int], dict[str, Any]]:
    """The ``width``-layer band ``criterion`` picks by probe runs on ``examples`` (see the
    module docstring). ``heldout`` and ``window`` keep the last quarter of the examples out of
    training to measure on; ``snr`` splits each step into micro-batches. Returns
    ``(layers, info)`` with the scores, the probe's losses and a one-line ``reason``; ``probe``
    goes to :func:`probe_run`. With ``max_quality_gap`` (``window`` only) the same probe run
    on every layer is the reference: when the best window gives up more than that share of the
    all-layer held-out gain, the answer is all layers; ``info["tradeoff_line"]`` says what was
    seen either way.
    """
    from fastmid.engine.blocks import find_decoder_layers
    from fastmid.engine.midblock import PAPER_BAND, resolve_band
    from fastmid.recipe.probe import best_window, select_band

    if criterion not in CRITERIA:
        raise UserError(f"band criterion must be one of {'|'.join(CRITERIA)}, got {criterion!r}")
    if getattr(model, "fastmid_state", None) is not None:
        raise ValueError("the probe run needs the untuned model, before apply_midblock")
    num_layers = len(find_decoder_layers(model))
    default = resolve_band(PAPER_BAND, num_layers)
    width = len(default) if width is None else width
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    examples = list(examples)
    if criterion == "window":
        probe.setdefault("steps", WINDOW_STEPS)
    steps = probe.get("steps", 8)
    info: dict[str, Any] = {"criterion": criterion, "num_layers": num_layers, "width": width}

    if criterion == "window":
        train, held = _split_heldout(examples)
        after: dict[int, float] = {}
        seconds: dict[int, float] = {}
        for start in window_starts(num_layers, width):
            band = range(start, start + width)
            began = time.perf_counter()
            run = probe_run(
                model, train, pad_id, heldout=held, allocate_heldout=False, band=band, **probe
            )
            seconds[start] = time.perf_counter() - began
            after[start] = run.heldout_after
        start = best_window(after, num_layers, width)
        layers = list(range(start, start + width))
        before = run.heldout_before  # the untuned model's, the same for every window

        def loss_of(first: int) -> str:
            return f"{after[first]:.3f}" if first in after else "not tried"

        reason = (
            f"layers {layers[0]}-{layers[-1]} of 0-{num_layers - 1}: of {len(after)} "
            f"{width}-layer windows, each tuned alone for {steps} steps, the one with the lowest "
            f"held-out loss ({before:.3f} → {after[start]:.3f}; the default band "
            f"{default[0]}-{default[-1]} → {loss_of(default[0])}, bottom → {loss_of(0)}, top → "
            f"{loss_of(num_layers - width)})"
        )
        info.update(heldout_before=before, window_heldout_loss=after)
        if max_quality_gap is not None and width < num_layers:
            # The same short run on every layer: what the band would give up, and what it saves.
            began = time.perf_counter()
            whole = probe_run(model, train, pad_id, heldout=held, allocate_heldout=False, **probe)
            all_seconds = time.perf_counter() - began
            tradeoff = band_tradeoff(
                before, after[start], whole.heldout_after, seconds[start], all_seconds
            )
            info.update(all_layers_heldout_loss=whole.heldout_after, tradeoff=tradeoff)
            if tradeoff["gap"] > max_quality_gap:
                layers = list(range(num_layers))
                reason = (
                    f"all layers: the best {width}-layer window ({start}-{start + width - 1}) "
                    f"gives up {tradeoff['gap']:.0%} of the all-layer held-out gain, more than "
                    f"--max-quality-gap {max_quality_gap:.0%} ({before:.3f} → window "
                    f"{after[start]:.3f}, all layers {whole.heldout_after:.3f})"
                )
            info["tradeoff_line"] = tradeoff_line(layers, start, width, tradeoff, max_quality_gap)
    else:
        if criterion == "heldout":
            examples, held = _split_heldout(examples)
            probe.setdefault("heldout", held)
        if criterion == "snr":
            probe.setdefault("micro_batches", min(SNR_MICRO_BATCHES, probe.get("batch_size", 8)))
        run = probe_run(model, examples, pad_id, **probe)
        scores = run.scores(criterion)
        # select_band picks the lowest mean; the largest score is the lowest negated score.
        layers, _ = select_band([-x for x in scores], width)
        total = sum(scores) or 1.0

        def share(idx: Sequence[int]) -> str:
            if criterion == "snr":  # a ratio per layer: its mean, not a share, is what compares
                return f"mean {sum(scores[i] for i in idx) / len(idx):.3f}"
            return f"{sum(scores[i] for i in idx) / total:.0%} of the reduction"

        curve = f"probe loss {run.losses[0]:.3f} → {run.losses[-1]:.3f}"
        if run.heldout_before is not None:
            curve += f", held-out {run.heldout_before:.3f} → {run.heldout_after:.3f}"
        reason = (
            f"layers {layers[0]}-{layers[-1]} of 0-{num_layers - 1}: the {width}-layer window "
            f"{_DESCRIPTION[criterion]} in a {steps}-step all-layer probe run "
            f"({share(layers)}; the default band {default[0]}-{default[-1]} {share(default)}); "
            f"{curve}"
        )
        info.update(score=scores, gain=run.gain, losses=run.losses)
    info.update(layers=layers, reason=reason)
    return layers, info


def choose_auto_band(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Any],
    *,
    adapter: MidBlockConfig,
    lr: float,
    criterion: str = AUTO_CRITERION,
    width: int | None = None,
    max_quality_gap: float | None,
) -> tuple[list[int], dict[str, Any]]:
    """The band ``--band auto`` trains (``criterion``: one of :data:`AUTO_CRITERIA`), from the
    first :data:`AUTO_EXAMPLES` of ``examples``. ``window`` tunes each candidate with the run's
    own adapters (``adapter``: targets, rank or rank budget, alpha, rsLoRA) and learning rate
    ``lr``, and may answer all layers when the best window gives up more than
    ``max_quality_gap`` of the all-layer gain (None: never); the all-layer criteria use small
    probe adapters. Returns ``(layers, info)`` as :func:`recommend_band_by_probe_run` does."""
    from fastmid.recipe.probe import recommend_band

    if criterion not in AUTO_CRITERIA:
        known = "|".join(AUTO_CRITERIA)
        raise UserError(f"band criterion must be one of {known}, got {criterion!r}")
    examples = list(examples)[:AUTO_EXAMPLES]
    if criterion == "sensitivity":
        return recommend_band(model, tokenizer, examples, width=width)
    # Only window tunes bands as the run would; the all-layer runs keep PROBE_ADAPTER.
    probe: dict[str, Any] = {}
    if criterion == "window":
        probe = {"adapter": adapter, "lr": lr, "max_quality_gap": max_quality_gap}
    return recommend_band_by_probe_run(
        model, tokenizer, examples, criterion=criterion, width=width, **probe
    )
