"""The gain band criterion: its loss allocation matches the loss change it claims, and the
rule picks the window with the largest gain."""

from __future__ import annotations

import pytest
import torch

from fastmid import bandgain
from fastmid.data import Example
from tests.fastmid._tiny import tiny_model


def examples(n: int = 8, length: int = 12) -> list[Example]:
    gen = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 250, (length,), generator=gen).tolist()
        out.append(Example(input_ids=ids, targets=[*ids[1:], -100]))
    return out


def test_allocated_gain_equals_the_first_step_loss_change():
    model = tiny_model("llama", 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = examples()
    # One batch holds every example, so every step sees the same batch: the loss at step 1
    # minus the loss at step 0 is what step 0's update did, and the gains of a 1-step run
    # allocate exactly that step (to first order: small lr).
    kw = dict(batch_size=len(data), rank=4, alpha=8.0, lr=1e-4, seed=0)
    gains_one, _ = bandgain.layer_gains(model, data, 0, steps=1, **kw)
    gains_two, losses = bandgain.layer_gains(model, data, 0, steps=2, **kw)
    drop = losses[0] - losses[1]
    assert drop > 0
    assert sum(gains_one) == pytest.approx(drop, rel=0.05)
    # Every layer's adapter took part, and the allocation is not uniform.
    assert len(gains_one) == 6 and all(g != 0 for g in gains_two)
    assert max(gains_two) > 1.5 * min(gains_two)
    # The model itself is untouched.
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_rule_picks_the_window_with_the_largest_gain(monkeypatch):
    model = tiny_model("llama", 10)
    gains = [0.1, 0.1, 0.2, 0.3, 0.1, 0.0, 0.5, 0.6, 0.4, 0.2]
    monkeypatch.setattr(bandgain, "layer_gains", lambda *a, **k: (gains, [2.0, 1.5]))

    class Tok:
        pad_token_id = 0

    layers, info = bandgain.recommend_band_by_gain(model, Tok(), examples(), width=3)
    assert layers == [6, 7, 8]  # 1.5, the largest 3-layer sum
    layers, info = bandgain.recommend_band_by_gain(model, Tok(), examples())
    assert layers == [3, 4, 5, 6, 7, 8]  # default width 6 (the 20-80% band of 10 layers)
    assert "layers 3-8 of 0-9" in info["reason"]
    assert "probe loss 2.000 → 1.500" in info["reason"]
