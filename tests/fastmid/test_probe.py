"""The sensitivity probe and its band rule, on tiny random-init models."""

from __future__ import annotations

import json
import types

import pytest
import torch

from fastmid import cli
from fastmid.engine.midblock import MidBlockConfig, apply_midblock, resolve_band
from fastmid.recipe.data import Example
from fastmid.recipe.probe import recommend_band, select_band
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


def test_per_layer_numbers_match_a_hand_computation_without_padding() -> None:
    """grad_ratio and rotation of a 2-layer model, recomputed from each example alone (no
    padding at all) with autograd and the model's own hidden states."""
    model = tiny_model("llama", num_layers=2)
    examples = _examples(n=6)  # lengths 20, 19, 18, 17, 16, 20: every batch is padded
    layers, info = recommend_band(model, TOKENIZER, examples, batch_size=3, max_batches=2, width=1)
    projections = [
        [getattr(block.self_attn, n).weight for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        for block in model.model.layers
    ]
    norms = [torch.sqrt(sum(w.detach().double().square().sum() for w in ws)) for ws in projections]

    grad_ratio = [0.0, 0.0]
    rot_sum, rot_count = [0.0, 0.0], 0
    final_norm = model.model.norm
    for batch in (examples[:3], examples[3:]):
        labels = sum(len(e.input_ids) - 1 for e in batch)
        grads = [[torch.zeros_like(w, dtype=torch.float64) for w in ws] for ws in projections]
        for e in batch:
            ids = torch.tensor([e.input_ids])
            logits = model(input_ids=ids).logits[0, :-1]
            loss = torch.nn.functional.cross_entropy(
                logits, ids[0, 1:], reduction="sum"
            )  # this example's share of the batch's mean loss, times the batch's label count
            flat = [w for ws in projections for w in ws]
            for g, d in zip(
                [g for gs in grads for g in gs], torch.autograd.grad(loss, flat), strict=True
            ):
                g += d.double() / labels
            # Block inputs and outputs: the embeddings, block 0's output, and block 1's output
            # (read with the final norm switched off).
            model.model.norm = torch.nn.Identity()
            with torch.no_grad():
                hs = model(input_ids=ids, output_hidden_states=True).hidden_states
            model.model.norm = final_norm
            for layer in (0, 1):
                cos = torch.nn.functional.cosine_similarity(hs[layer][0], hs[layer + 1][0], dim=-1)
                rot_sum[layer] += float((1 - cos.double()).sum())
            rot_count += len(e.input_ids)
        for layer in (0, 1):
            g = torch.sqrt(sum(d.square().sum() for d in grads[layer]))
            grad_ratio[layer] += float(g / norms[layer]) / 2
    rotation = [r / rot_count for r in rot_sum]

    assert info["tokens"] == sum(len(e.input_ids) - 1 for e in examples)
    assert info["grad_ratio"] == pytest.approx(grad_ratio, rel=1e-4)
    assert info["rotation"] == pytest.approx(rotation, rel=1e-4)
    assert min(grad_ratio) > 0 and min(rotation) > 0
    # Two layers: the median is the mean, and each score averages the two normalised signals.
    g_med, r_med = sum(grad_ratio) / 2, sum(rotation) / 2
    score = [0.5 * g / g_med + 0.5 * r / r_med for g, r in zip(grad_ratio, rotation, strict=True)]
    assert info["score"] == pytest.approx(score, rel=1e-4)
    assert layers == [min((0, 1), key=lambda i: score[i])]


def test_probe_cli_says_its_band_is_a_diagnostic(tmp_path, capsys) -> None:
    from tests.fastmid._runs import make_model_dir

    model_dir = make_model_dir(tmp_path, num_layers=6)
    argv = ["probe", "--model", str(model_dir), "--batches", "1", "--batch-size", "2"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].startswith("least sensitive band: ")
    # What the probe is for, and that the band to train with is --band auto's choice.
    assert "diagnostic" in lines[-1] and "not a band to train with" in lines[-1]
    assert "--band auto chooses" in lines[-1]
