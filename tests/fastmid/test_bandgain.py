"""The probe-run band criteria: loss allocations match the loss changes they claim, the
gradient signal-to-noise ratio finds planted signal, the window criterion tunes the windows it
says and picks the lowest held-out loss, and every rule picks the window it should."""

from __future__ import annotations

import copy
import dataclasses
import math
import re

import fastmid.kernels._common as kernel_dispatch
import pytest
import torch

from fastmid.engine.midblock import MidBlockConfig
from fastmid.recipe import bandgain
from fastmid.recipe.data import Example
from fastmid.recipe.probe import best_window
from tests.fastmid._tiny import tiny_model


@pytest.fixture(autouse=True)
def torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels' torch path (the probe runs train, and the interpreter is slow)."""
    monkeypatch.setattr(kernel_dispatch, "INTERPRET", False)


# Rank-4 probe adapters with scale 2.
SMALL = MidBlockConfig(rank=4, alpha=8.0, dropout=0.0)


class Tok:
    pad_token_id = 0


def examples(n: int = 8, length: int = 12) -> list[Example]:
    """Random token sequences: nothing to learn that carries over to other sequences."""
    gen = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 250, (length,), generator=gen).tolist()
        out.append(Example(input_ids=ids, targets=[*ids[1:], -100]))
    return out


def counting(n: int = 16, length: int = 12) -> list[Example]:
    """Runs of consecutive tokens from different starts: "next = this + 1" is learnable and holds
    on held-out sequences too."""
    out = []
    for i in range(n):
        ids = [3 + (7 * i + k) % 60 for k in range(length)]
        out.append(Example(input_ids=ids, targets=[*ids[1:], -100]))
    return out


def fake_run(**scores: list[float]) -> bandgain.ProbeRun:
    fields = dict(gain=[], snr=None, heldout=None, heldout_before=None, heldout_after=None)
    return bandgain.ProbeRun(**{**fields, **scores}, losses=[2.0, 1.5])


# --- the probe run's measurements -------------------------------------------------------------


def test_allocated_gain_equals_the_first_step_loss_change():
    model = tiny_model("llama", 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = examples()
    # One batch holds every example, so every step sees the same batch: the loss at step 1
    # minus the loss at step 0 is what step 0's update did, and the gains of a 1-step run
    # allocate exactly that step (to first order: small lr).
    kw = dict(batch_size=len(data), adapter=SMALL, lr=1e-4, seed=0)
    one = bandgain.probe_run(model, data, 0, steps=1, **kw)
    two = bandgain.probe_run(model, data, 0, steps=2, **kw)
    drop = two.losses[0] - two.losses[1]
    assert drop > 0
    assert sum(one.gain) == pytest.approx(drop, rel=0.05)
    # Every layer's adapter took part, and the allocation is not uniform.
    assert len(one.gain) == 6 and all(g != 0 for g in two.gain)
    assert max(two.gain) > 1.5 * min(two.gain)
    # Splitting the batch into micro-batches changes nothing about the step: the step's
    # gradient is the token-weighted sum of theirs.
    split = bandgain.probe_run(model, data, 0, steps=2, micro_batches=4, **kw)
    assert split.losses == pytest.approx(two.losses, rel=1e-5)
    assert split.gain == pytest.approx(two.gain, rel=1e-3)
    assert one.snr is None and split.snr is not None and all(x > 0 for x in split.snr)
    # The model itself is untouched.
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_heldout_allocation_equals_the_heldout_loss_change():
    model = tiny_model("llama", 6)
    data = counting()
    train, held = data[:12], data[12:]
    run = bandgain.probe_run(
        model, train, 0, heldout=held, steps=1, batch_size=12, adapter=SMALL, lr=1e-4
    )
    # One step: the held-out loss after it minus before it is what the update did to the
    # held-out examples, and the allocation splits exactly that (to first order).
    measured = run.heldout_before - run.heldout_after
    assert measured > 0
    assert sum(run.heldout) == pytest.approx(measured, rel=0.05)
    # Without allocation the held-out losses are still measured, and are the same.
    plain = bandgain.probe_run(
        model,
        train,
        0,
        heldout=held,
        allocate_heldout=False,
        steps=1,
        batch_size=12,
        adapter=SMALL,
        lr=1e-4,
    )
    assert plain.heldout is None
    assert plain.heldout_after == pytest.approx(run.heldout_after, rel=1e-6)


def test_a_band_probe_run_tunes_only_the_band():
    model = tiny_model("llama", 8)
    run = bandgain.probe_run(model, counting(), 0, band=range(2, 5), steps=2, batch_size=8)
    assert len(run.gain) == 8
    assert [i for i, g in enumerate(run.gain) if g != 0] == [2, 3, 4]


def test_probe_run_is_deterministic_under_its_seed():
    model = tiny_model("llama", 6)
    kw = dict(steps=2, batch_size=8, micro_batches=4, adapter=SMALL)
    a = bandgain.probe_run(model, counting(), 0, seed=5, **kw)
    b = bandgain.probe_run(model, counting(), 0, seed=5, **kw)
    c = bandgain.probe_run(model, counting(), 0, seed=6, **kw)
    assert a.snr == b.snr and a.gain == b.gain and a.losses == b.losses
    # Another seed: another adapter init, so other scores.
    assert a.snr != c.snr


# --- gradient signal-to-noise ratio -----------------------------------------------------------


def test_gradient_snr_numbers():
    # Two micro-batches along one coordinate, 1 and 3: mean 2, sample variance 2.
    assert bandgain.gradient_snr(torch.tensor([[1.0, 0.0], [3.0, 0.0]])) == pytest.approx(
        2 / math.sqrt(2)
    )
    # Opposite gradients: no signal at all.
    assert bandgain.gradient_snr(torch.tensor([[1.0, -2.0], [-1.0, 2.0]])) == 0.0
    # Identical rows: all signal; all-zero rows: nothing.
    assert bandgain.gradient_snr(torch.ones(3, 4)) == math.inf
    assert bandgain.gradient_snr(torch.zeros(3, 4)) == 0.0
    # Scale-free: the same gradients ten times larger score the same.
    g = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    assert bandgain.gradient_snr(10 * g) == pytest.approx(bandgain.gradient_snr(g))
    with pytest.raises(ValueError, match="two micro-batches"):
        bandgain.gradient_snr(torch.ones(1, 4))


def test_snr_finds_the_layers_where_the_signal_is_planted(monkeypatch):
    # Ten layers of 4 micro-batch gradients: layers 6-8 share a direction (signal plus noise);
    # the others are pure noise, and far larger, so a magnitude criterion would pick them.
    gen = torch.Generator().manual_seed(0)
    direction = 2 * torch.randn(200, generator=gen)
    snr = []
    for layer in range(10):
        noise = torch.randn(4, 200, generator=gen)
        grads = direction + noise if layer in (6, 7, 8) else 30 * noise
        snr.append(bandgain.gradient_snr(grads))
    # Expected: √(4·200 + 200/4) / √200 ≈ 2.06 with the signal, √(200/4) / √200 = 0.5 without.
    assert min(snr[6:9]) > 1.5 and max(snr[:6] + snr[9:]) < 0.7
    monkeypatch.setattr(bandgain, "probe_run", lambda *a, **k: fake_run(snr=snr))
    model = tiny_model("llama", 10)
    layers, info = bandgain.recommend_band_by_probe_run(
        model, Tok(), examples(), criterion="snr", width=3
    )
    assert layers == [6, 7, 8]
    assert "signal-to-noise" in info["reason"] and info["score"] == snr


def test_snr_criterion_splits_each_step_into_micro_batches(monkeypatch):
    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return fake_run(snr=[1.0] * 10)

    monkeypatch.setattr(bandgain, "probe_run", spy)
    bandgain.recommend_band_by_probe_run(
        tiny_model("llama", 10), Tok(), examples(), criterion="snr"
    )
    assert seen["micro_batches"] == bandgain.SNR_MICRO_BATCHES


# --- the rules ---------------------------------------------------------------------------------


def test_rule_picks_the_window_with_the_largest_gain(monkeypatch):
    model = tiny_model("llama", 10)
    gains = [0.1, 0.1, 0.2, 0.3, 0.1, 0.0, 0.5, 0.6, 0.4, 0.2]
    monkeypatch.setattr(bandgain, "probe_run", lambda *a, **k: fake_run(gain=gains))
    layers, info = bandgain.recommend_band_by_probe_run(model, Tok(), examples(), width=3)
    assert layers == [6, 7, 8]  # 1.5, the largest 3-layer sum
    layers, info = bandgain.recommend_band_by_probe_run(model, Tok(), examples())
    assert layers == [3, 4, 5, 6, 7, 8]  # default width 6 (the 20-80% band of 10 layers)
    assert "layers 3-8 of 0-9" in info["reason"]
    assert "probe loss 2.000 → 1.500" in info["reason"]


def test_heldout_criterion_trains_on_three_quarters(monkeypatch):
    seen = {}

    def spy(model, train, pad_id, **kwargs):
        seen.update(train=train, **kwargs)
        return fake_run(heldout=[0.0] * 8 + [1.0, 1.0], heldout_before=2.0, heldout_after=1.0)

    monkeypatch.setattr(bandgain, "probe_run", spy)
    data = examples(8)
    layers, info = bandgain.recommend_band_by_probe_run(
        tiny_model("llama", 10), Tok(), data, criterion="heldout", width=2
    )
    assert seen["train"] == data[:6] and seen["heldout"] == data[6:]
    assert layers == [8, 9]
    assert "held-out 2.000 → 1.000" in info["reason"]
    with pytest.raises(bandgain.UserError, match="at least 4 examples"):
        bandgain.recommend_band_by_probe_run(
            tiny_model("llama", 10), Tok(), data[:3], criterion="heldout"
        )


def test_window_starts():
    # SmolLM2: 30 layers, the default band 6-23 is 18 wide: five evenly spaced windows.
    assert bandgain.window_starts(30, 18) == [0, 3, 6, 9, 12]
    # 32 layers, default band 6-24 (19 wide): stride 4 from 0, the top (13) and the default (6).
    assert bandgain.window_starts(32, 19) == [0, 4, 6, 8, 12, 13]
    # Narrow bands in a deep model: still about five, the top included.
    assert bandgain.window_starts(30, 6) == [0, 6, 12, 18, 24]
    assert bandgain.window_starts(10, 6) == [0, 1, 2, 3, 4]
    assert bandgain.window_starts(10, 10) == [0]
    with pytest.raises(ValueError, match="width"):
        bandgain.window_starts(10, 11)


def test_best_window_ties_go_to_the_middle_then_down():
    assert best_window({0: 1.0, 3: 0.5, 6: 0.7}, 30, 18) == 3
    assert best_window({0: 0.5, 6: 0.5, 12: 0.5}, 30, 18) == 6  # the middle
    assert best_window({4: 0.5, 8: 0.5}, 30, 18) == 4  # equally near: the lower
    assert best_window({0: 0.5 + 1e-12, 12: 0.5}, 30, 18) == 0  # float noise is a tie


def test_window_criterion_tunes_each_candidate_and_picks_the_lowest_heldout_loss(monkeypatch):
    bands = []
    losses = {0: 1.30, 1: 1.10, 2: 1.05, 3: 1.20, 4: 1.25}

    def spy(model, train, pad_id, *, band, heldout, allocate_heldout, **kwargs):
        assert not allocate_heldout  # only the losses are needed
        assert kwargs["steps"] == bandgain.WINDOW_STEPS
        assert len(train) == 6 and len(heldout) == 2
        bands.append(list(band))
        return fake_run(heldout_before=1.5, heldout_after=losses[band[0]])

    monkeypatch.setattr(bandgain, "probe_run", spy)
    layers, info = bandgain.recommend_band_by_probe_run(
        tiny_model("llama", 10), Tok(), examples(8), criterion="window"
    )
    assert bands == [list(range(s, s + 6)) for s in range(5)]
    assert layers == list(range(2, 8))
    assert info["window_heldout_loss"] == losses
    assert "of 5 6-layer windows" in info["reason"]
    assert (
        "(1.500 → 1.050; the default band 2-7 → 1.050, bottom → 1.300, top → 1.250)"
        in (info["reason"])
    )


def test_band_tradeoff_numbers():
    # All layers gain 1.5 - 0.5 = 1.0; the band 1.5 - 0.6 = 0.9: it gives up a tenth.
    t = bandgain.band_tradeoff(1.5, 0.6, 0.5, band_seconds=3.0, all_seconds=4.0)
    assert t == pytest.approx({"gap": 0.1, "time": 0.75})
    # A band at least as good as all layers gives up nothing; so does a run where all layers
    # gained nothing (no gain to give up).
    assert bandgain.band_tradeoff(1.5, 0.4, 0.5, 1.0, 2.0)["gap"] == 0.0
    assert bandgain.band_tradeoff(1.5, 1.7, 1.6, 1.0, 2.0)["gap"] == 0.0


def _window_and_all(monkeypatch, window_loss: float, all_loss: float) -> list[str]:
    """Fake probe runs: every window ends at ``window_loss`` except start 2 (0.01 lower), the
    all-layer run at ``all_loss``, all from 1.5; returns the bands tried ("all" or a start)."""
    tried = []

    def fake(model, train, pad_id, *, heldout, allocate_heldout, band="all", **kwargs):
        tried.append(band if band == "all" else band[0])
        if band == "all":
            return fake_run(heldout_before=1.5, heldout_after=all_loss)
        after = window_loss - (0.01 if band[0] == 2 else 0.0)
        return fake_run(heldout_before=1.5, heldout_after=after)

    monkeypatch.setattr(bandgain, "probe_run", fake)
    return tried


def test_auto_answers_all_layers_when_the_band_gives_up_too_much(monkeypatch):
    # All layers reduce the held-out loss by 1.0, the best window (start 2) by 0.6: it gives up
    # 40%, more than the 10% allowed.
    tried = _window_and_all(monkeypatch, window_loss=0.91, all_loss=0.5)
    layers, info = bandgain.recommend_band_by_probe_run(
        tiny_model("llama", 10), Tok(), examples(8), criterion="window", max_quality_gap=0.1
    )
    assert tried == [0, 1, 2, 3, 4, "all"]
    assert layers == list(range(10))
    assert info["tradeoff"]["gap"] == pytest.approx(0.4)
    assert info["all_layers_heldout_loss"] == 0.5
    assert info["reason"].startswith("all layers: the best 6-layer window (2-7) gives up 40%")
    line = info["tradeoff_line"]
    assert line.startswith("band trade-off: layers 2-7 keep 60% of the all-layer held-out gain")
    assert "(gives up 40%, limit --max-quality-gap 10%)" in line
    assert line.endswith("→ training all layers")


def test_auto_keeps_the_band_within_the_quality_gap(monkeypatch):
    # The best window reduces the loss by 0.95 of the all-layer 1.0: 5% given up, within 10%.
    _window_and_all(monkeypatch, window_loss=0.56, all_loss=0.5)
    layers, info = bandgain.recommend_band_by_probe_run(
        tiny_model("llama", 10), Tok(), examples(8), criterion="window", max_quality_gap=0.1
    )
    assert layers == list(range(2, 8))
    assert info["tradeoff"]["gap"] == pytest.approx(0.05)
    assert "keep 95% of the all-layer held-out gain (gives up 5%" in info["tradeoff_line"]
    assert info["tradeoff_line"].endswith("→ training layers 2-7")
    # Without a limit no all-layer run is made and the band stands.
    tried = _window_and_all(monkeypatch, window_loss=0.91, all_loss=0.5)
    layers, info = bandgain.recommend_band_by_probe_run(
        tiny_model("llama", 10), Tok(), examples(8), criterion="window"
    )
    assert "all" not in tried and layers == list(range(2, 8)) and "tradeoff" not in info


def test_auto_all_layers_on_a_tiny_model():
    """A real probe on a tiny model: a 1-layer window cannot match all 6 layers on the
    counting task, so a zero gap limit must answer all layers, and a limit of 1 never does."""
    model = tiny_model("llama", 6)
    kw = dict(criterion="window", width=1, steps=3, batch_size=4, adapter=SMALL, lr=1e-2)
    strict, info = bandgain.recommend_band_by_probe_run(
        model, Tok(), counting(), max_quality_gap=0.0, **kw
    )
    assert info["tradeoff"]["gap"] > 0
    assert info["all_layers_heldout_loss"] < min(info["window_heldout_loss"].values())
    assert strict == list(range(6))
    lenient, _ = bandgain.recommend_band_by_probe_run(
        model, Tok(), counting(), max_quality_gap=1.0, **kw
    )
    assert len(lenient) == 1


def test_window_criterion_on_a_tiny_model():
    model = tiny_model("llama", 6)
    kw = dict(criterion="window", width=3, steps=3, batch_size=4, adapter=SMALL, lr=1e-2)
    layers, info = bandgain.recommend_band_by_probe_run(model, Tok(), counting(), **kw)
    after = info["window_heldout_loss"]
    assert sorted(after) == bandgain.window_starts(6, 3)
    # Every window learned something that carries over to the held-out sequences, and the
    # choice is the lowest.
    assert all(loss < info["heldout_before"] for loss in after.values())
    assert after[layers[0]] == min(after.values())
    again, info_again = bandgain.recommend_band_by_probe_run(model, Tok(), counting(), **kw)
    assert again == layers and info_again["window_heldout_loss"] == after


def test_unknown_criterion_is_a_user_error():
    with pytest.raises(bandgain.UserError, match=re.escape("gain|snr|heldout|window, got 'vibes'")):
        bandgain.recommend_band_by_probe_run(
            tiny_model("llama", 4), Tok(), examples(), criterion="vibes"
        )


def test_a_probe_run_tunes_adapters_shaped_like_the_runs(monkeypatch):
    """With a budget-matched template the probe's adapters get the rank and scale the run
    would give the same band: rank floor(budget * L / n), scale alpha / rank (or / sqrt)."""
    import fastmid.engine.midblock as midblock

    seen = []
    real = midblock.apply_midblock

    def spy(model, config):
        state = real(model, config)
        seen.append({(m.lora_A.shape[0], m.scale) for _, _, m in midblock.lora_modules(model)})
        return state

    monkeypatch.setattr(midblock, "apply_midblock", spy)
    model = tiny_model("llama", 10)
    run = MidBlockConfig(rank_budget=3, alpha=12.0)
    bandgain.probe_run(model, counting(4), 0, band=range(2, 8), steps=1, adapter=run)
    rslora = MidBlockConfig(rank_budget=3, alpha=12.0, use_rslora=True)
    bandgain.probe_run(model, counting(4), 0, band=range(0, 10), steps=1, adapter=rslora)
    bandgain.probe_run(model, counting(4), 0, steps=1)  # the default: the small probe adapters
    assert seen == [{(5, 12.0 / 5)}, {(3, 12.0 / math.sqrt(3))}, {(8, 2.0)}]


def test_auto_band_window_tunes_with_the_runs_adapters_and_lr(monkeypatch):
    calls = []

    def spy(model, tokenizer, examples, **kwargs):
        calls.append((len(examples), kwargs))
        return [1, 2], {"reason": "spied"}

    monkeypatch.setattr(bandgain, "recommend_band_by_probe_run", spy)
    run = MidBlockConfig(rank_budget=3, alpha=12.0)
    many = counting(bandgain.AUTO_EXAMPLES + 10)
    assert bandgain.AUTO_CRITERION == "window"
    auto = dict(adapter=run, lr=3e-4, max_quality_gap=0.25)
    layers, info = bandgain.choose_auto_band(None, Tok(), many, width=2, **auto)
    assert (layers, info["reason"]) == ([1, 2], "spied")
    want = dict(criterion="window", width=2, **auto)
    assert calls == [(bandgain.AUTO_EXAMPLES, want)]
    # The all-layer criteria keep their small probe adapters.
    bandgain.choose_auto_band(None, Tok(), many, criterion="snr", **auto)
    assert calls[-1] == (bandgain.AUTO_EXAMPLES, dict(criterion="snr", width=None))
    with pytest.raises(bandgain.UserError, match=re.escape("sensitivity|gain|snr|heldout|window")):
        bandgain.choose_auto_band(None, Tok(), many, criterion="vibes", **auto)


def test_the_probe_copy_shares_the_weights_and_leaves_the_model_as_it_was(monkeypatch):
    import fastmid.engine.midblock as midblock
    from fastmid.engine.lora import LoraLinear

    model = tiny_model("llama", 6)
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 2 == 0)
    flags = [p.requires_grad for p in model.parameters()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    storages = []
    real = midblock.apply_midblock

    def spy(work, config):
        storages.append({p.data_ptr() for p in work.parameters()})
        return real(work, config)

    monkeypatch.setattr(midblock, "apply_midblock", spy)
    bandgain.probe_run(model, counting(4), 0, steps=2, adapter=SMALL)
    # No second copy of the weights; the model keeps its flags, values and lack of adapters.
    assert storages == [{p.data_ptr() for p in model.parameters()}]
    assert [p.requires_grad for p in model.parameters()] == flags
    assert getattr(model, "fastmid_state", None) is None
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_probe_snr_equals_a_hand_computation():
    from fastmid.engine.loss import forward_loss
    from fastmid.engine.midblock import apply_midblock, lora_modules
    from fastmid.recipe.data import collate_padded

    model = tiny_model("llama", 4)
    data = examples(6)
    run = bandgain.probe_run(
        model, data, 0, steps=1, batch_size=6, micro_batches=3, adapter=SMALL, seed=2
    )
    # By hand: the same adapters (same seed), then per micro-batch of two examples the gradient
    # of its mean loss, per layer; snr = ‖mean over micro-batches‖ / √(Σ sample variances).
    work = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        apply_midblock(work, dataclasses.replace(SMALL, band="all", fuse_groups=False))
    by_layer: dict[int, list] = {}
    for layer, _, module in lora_modules(work):
        by_layer.setdefault(layer, []).extend([module.lora_A, module.lora_B])
    rows: dict[int, list[list[float]]] = {layer: [] for layer in by_layer}
    for part in (data[0:2], data[2:4], data[4:6]):
        loss_sum, count = forward_loss(work, collate_padded(part, 0))
        params = [p for layer in sorted(by_layer) for p in by_layer[layer]]
        grads = dict(
            zip(map(id, params), torch.autograd.grad(loss_sum / count, params), strict=True)
        )
        for layer, ps in by_layer.items():
            rows[layer].append([float(x) for p in ps for x in grads[id(p)].flatten()])
    want = []
    for layer in sorted(rows):
        g = rows[layer]
        m = len(g)
        columns = list(zip(*g, strict=True))
        mean = [sum(col) / m for col in columns]
        var = [
            sum((x - mu) ** 2 for x in col) / (m - 1) for col, mu in zip(columns, mean, strict=True)
        ]
        want.append(math.sqrt(sum(mu * mu for mu in mean)) / math.sqrt(sum(var)))
    assert run.snr == pytest.approx(want, rel=1e-5)
    assert len(set(round(x, 6) for x in want)) == len(want)  # the layers really differ
