"""The sensitivity probe and its band rule, on tiny random-init models."""

from __future__ import annotations

import json
import types

import pytest
import torch

from fastmid import cli
from fastmid.data import Example
from fastmid.midblock import MidBlockConfig, apply_midblock, resolve_band
from fastmid.probe import recommend_band, select_band
from tests.fastmid._tiny import tiny_model

TOKENIZER = types.SimpleNamespace(pad_token_id=0)


def _examples(n: int = 16, length: int = 20, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, 256, (length - i % 5,), generator=g).tolist()  # ragged lengths
        out.append(Example(input_ids=ids, targets=[*ids[1:], -100]))
    return out


def test_select_band_picks_the_lowest_window() -> None:
    scores = [5.0, 1.0, 1.0, 1.0, 1.0, 5.0, 5.0, 5.0, 1.0, 1.0]
    layers, means = select_band(scores, 4)
    assert layers == [1, 2, 3, 4]
    assert means[1] == 1.0 and len(means) == 7
    assert select_band(scores, 2)[0] == [3, 4]  # ties (1-2, 2-3, 3-4, 8-9): nearest the middle


def test_select_band_ties_give_the_default_band() -> None:
    # A flat profile carries no information: the rule falls back to the centred window, which
    # for the default width is exactly the paper's 20-80% band.
    for num_layers in (10, 16, 30, 32):
        width = len(resolve_band((0.2, 0.8), num_layers))
        layers, _ = select_band([1.0] * num_layers, width)
        assert abs(layers[0] - (num_layers - layers[-1] - 1)) <= 1
    assert select_band([1.0] * 10, 6)[0] == resolve_band((0.2, 0.8), 10)
    with pytest.raises(ValueError):
        select_band([1.0] * 4, 5)


def test_recommend_band_is_deterministic_valid_and_restores_the_model() -> None:
    model = tiny_model("llama", num_layers=10)
    flags = [p.requires_grad for p in model.parameters()]
    layers, info = recommend_band(model, TOKENIZER, _examples(), batch_size=8, max_batches=2)
    again, info2 = recommend_band(model, TOKENIZER, _examples(), batch_size=8, max_batches=2)
    assert layers == again and info["score"] == info2["score"]
    assert len(layers) == 6 and layers == list(range(layers[0], layers[0] + 6))
    assert layers[0] >= 0 and layers[-1] <= 9
    assert len(info["grad_ratio"]) == len(info["rotation"]) == len(info["score"]) == 10
    assert all(g > 0 for g in info["grad_ratio"]) and all(0 < r < 2 for r in info["rotation"])
    assert info["window_means"][layers[0]] == pytest.approx(min(info["window_means"]))
    assert info["reason"].startswith(f"layers {layers[0]}-{layers[-1]} of 0-9")
    assert info["tokens"] == sum(e.num_loss_tokens for e in _examples())
    json.dumps(info)  # recorded beside the adapter, so it must be JSON-able
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


def test_recommend_band_avoids_layers_made_sensitive() -> None:
    model = tiny_model("llama", num_layers=10)
    # Blow up what blocks 1 and 8 write into the residual stream: they now rotate it far more
    # than any other block, so no window may contain them; the only 6-layer window left is 2-7.
    with torch.no_grad():
        for layer in (1, 8):
            model.model.layers[layer].self_attn.o_proj.weight.mul_(30)
            model.model.layers[layer].mlp.down_proj.weight.mul_(30)
    layers, info = recommend_band(model, TOKENIZER, _examples(), batch_size=8, max_batches=2)
    assert layers == [2, 3, 4, 5, 6, 7]
    assert info["score"][1] > 10 and info["score"][8] > 10
    # A narrower band goes to the calmest stretch that avoids both.
    layers, _ = recommend_band(model, TOKENIZER, _examples(), batch_size=8, max_batches=2, width=3)
    assert 1 not in layers and 8 not in layers


def test_recommend_band_refuses_a_patched_model() -> None:
    model = apply_midblock(tiny_model("llama", num_layers=10), MidBlockConfig(rank=2))
    with pytest.raises(ValueError, match="untuned"):
        recommend_band(model, TOKENIZER, _examples())


def test_probe_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["probe", "--batches", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--batches must be positive" in err
