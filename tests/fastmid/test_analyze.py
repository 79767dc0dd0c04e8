"""`fastmid analyze` on tiny models: no change, a change at one layer, adapters, outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from fastmid import cli
from fastmid.engine.adapters import merge, save_adapter
from fastmid.engine.midblock import MidBlockConfig, apply_midblock, lora_modules
from fastmid.recipe.data import Example
from fastmid.study.analyze import COLUMNS, analyze, write_outputs
from tests.fastmid._tiny import tiny_model

LAYERS = 10


def _examples(n: int = 12, length: int = 16) -> list[Example]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        ids = torch.randint(3, 256, (length - i % 4,), generator=g).tolist()
        out.append(Example(input_ids=ids, targets=[*ids[1:], -100]))
    return out


def _base() -> torch.nn.Module:
    return tiny_model("llama", num_layers=LAYERS)


def test_model_against_itself_shows_no_change() -> None:
    result = analyze(_base, _base, _examples(), batch_size=5)
    rows = result["layers"]
    assert len(rows) == LAYERS and result["band"] == []
    assert result["tokens"] == sum(len(e.input_ids) for e in _examples())
    assert result["lens_positions"] == sum(e.num_loss_tokens for e in _examples())
    for r in rows:
        assert r["cka"] == pytest.approx(1.0, abs=1e-9)
        assert r["cosine"] == pytest.approx(1.0, abs=1e-9)
        assert r["mean_shift"] == 0.0 and r["weight_change"] == 0.0
        assert r["erank_base"] == r["erank_tuned"] and 0 < r["erank_base"] <= 1
        assert r["entropy_base"] == r["entropy_tuned"] and 0 < r["entropy_base"] <= 1
        assert r["logit_lens_base"] == r["logit_lens_tuned"]
    assert [r["depth"] for r in rows] == pytest.approx([(i + 1) / LAYERS for i in range(LAYERS)])


def test_change_appears_exactly_where_the_model_was_perturbed() -> None:
    def perturbed() -> torch.nn.Module:
        model = _base()
        with torch.no_grad():
            w = model.model.layers[7].self_attn.v_proj.weight
            w.add_(0.5 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(3)))
        return model

    result = analyze(_base, perturbed, _examples(), batch_size=5)
    rows = result["layers"]
    assert result["band"] == [7]
    for r in rows[:7]:  # nothing below the perturbed block can see it
        assert r["cka"] == pytest.approx(1.0, abs=1e-9) and r["mean_shift"] == 0.0
        assert r["weight_change"] == 0.0
    attn_base, attn_tuned = _base().model.layers[7].self_attn, perturbed().model.layers[7].self_attn
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    delta = (attn_tuned.v_proj.weight - attn_base.v_proj.weight).detach().norm()
    norm = sum(getattr(attn_base, n).weight.detach().square().sum() for n in names).sqrt()
    assert rows[7]["weight_change"] == pytest.approx(float(delta / norm), rel=1e-6)
    assert rows[7]["weight_change"] > 0.1
    for r in rows[7:]:
        assert r["mean_shift"] > 1e-4 and r["cosine"] < 1 - 1e-7
    assert rows[8]["weight_change"] == rows[9]["weight_change"] == 0.0


def test_adapter_dir_matches_the_merged_model(tmp_path: Path) -> None:
    patched = apply_midblock(_base(), MidBlockConfig(band=[4, 5], rank=2, dropout=0.0))
    with torch.no_grad():
        for _, _, m in lora_modules(patched):
            m.lora_B.normal_(0, 0.05)
    expected = {}
    for layer in (4, 5):
        mods = [m for lay, _, m in lora_modules(patched) if lay == layer]
        num = sum(float((m.scale * m.lora_B @ m.lora_A).detach().square().sum()) for m in mods)
        den = sum(float(m.weight.square().sum()) for m in mods)
        expected[layer] = (num / den) ** 0.5
    save_adapter(patched, tmp_path / "adapter")
    merged = merge(patched)

    from_adapter = analyze(_base, str(tmp_path / "adapter"), _examples(), batch_size=6)
    from_model = analyze(_base, lambda: merged, _examples(), batch_size=6)
    assert from_adapter["band"] == from_model["band"] == [4, 5]
    for a, b in zip(from_adapter["layers"], from_model["layers"], strict=True):
        layer = a["layer"]
        assert a["weight_change"] == pytest.approx(expected.get(layer, 0.0), rel=1e-5, abs=1e-12)
        assert a["weight_change"] == pytest.approx(b["weight_change"], rel=1e-4, abs=1e-12)
        assert a["cka"] == pytest.approx(b["cka"], abs=1e-6)
        assert a["mean_shift"] == pytest.approx(b["mean_shift"], rel=1e-4, abs=1e-7)
        if layer < 4:
            assert a["cka"] == pytest.approx(1.0, abs=1e-9) and a["mean_shift"] == 0.0
        else:
            assert a["mean_shift"] > 0


def test_outputs_are_written(tmp_path: Path) -> None:
    result = analyze(_base, _base, _examples(n=6), batch_size=6, band=[2, 3, 4], lens_positions=3)
    assert result["lens_positions"] == 6 * 3  # every example has more than 3 positions
    paths = write_outputs(result, tmp_path / "out", title="tiny vs tiny")
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    with paths["csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == COLUMNS and len(rows) == LAYERS
    assert [int(r["in_band"]) for r in rows] == [int(i in (2, 3, 4)) for i in range(LAYERS)]
    assert float(rows[0]["cka"]) == pytest.approx(1.0)
    loaded = json.loads(paths["json"].read_text())
    assert loaded["band"] == [2, 3, 4] and len(loaded["layers"]) == LAYERS
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "analysis.json",
        "depth_profile.png",
        "layers.csv",
    ]  # no temp files left behind


def test_cli_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["analyze", "--tuned", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tuned not found" in err
    assert cli.main(["analyze", "--tuned", str(tmp_path), "--samples", "0"]) == 2
    assert "--samples must be positive" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_on_the_embedded_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fastmid.engine.models import load_model

    model, _, name = load_model()
    patched = apply_midblock(model, MidBlockConfig(dropout=0.0))
    with torch.no_grad():
        for _, _, m in lora_modules(patched):
            m.lora_B.normal_(0, 1e-3)
    # Laid out like a `fastmid train` output dir: the adapter in its adapter/ subdir.
    save_adapter(patched, tmp_path / "run" / "adapter", base_model_name_or_path=name)
    del model, patched
    out = tmp_path / "out"
    argv = ["analyze", "--tuned", str(tmp_path / "run"), "--samples", "8"]
    argv += ["--max-length", "48", "--output-dir", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    assert "layers.csv" in capsys.readouterr().out
    result = json.loads((out / "analysis.json").read_text())
    rows = result["layers"]
    assert result["num_layers"] == 30 and result["band"] == list(range(6, 24))
    for r in rows:
        if r["layer"] < 6:  # below the band nothing changed, to the bit
            assert r["cka"] == pytest.approx(1.0, abs=1e-9) and r["mean_shift"] == 0.0
        if 6 <= r["layer"] < 24:
            assert r["weight_change"] > 0
        else:
            assert r["weight_change"] == 0.0
        assert r["logit_lens_base"] <= 1 and 0 < r["erank_base"] <= 1
    # The untouched model predicts far better at its last layer than at its first.
    assert rows[-1]["logit_lens_base"] > rows[0]["logit_lens_base"] + 0.1
    assert (out / "depth_profile.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_announces_and_uses_its_default_output_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.fastmid._runs import RECORDS, make_model_dir, write_jsonl

    model_dir = make_model_dir(tmp_path, num_layers=4)
    model = apply_midblock(_from_dir(model_dir), MidBlockConfig(band=[1, 2], rank=2, dropout=0.0))
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(model_dir))
    data = write_jsonl(tmp_path / "data.jsonl", RECORDS[:4])
    monkeypatch.chdir(tmp_path)
    argv = ["analyze", "--base", str(model_dir), "--tuned", str(tmp_path / "adapter")]
    assert cli.main([*argv, "--data", str(data), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "fastmid analyze: results go to ./fastmid-analyze (--output-dir)"
    names = sorted(p.name for p in (tmp_path / "fastmid-analyze").iterdir())
    assert names == ["analysis.json", "depth_profile.png", "layers.csv"]
    # The repository ignores the default output dir, as it does fastmid train's.
    gitignore = (Path(__file__).parents[2] / ".gitignore").read_text().splitlines()
    assert "fastmid-analyze/" in gitignore


def _from_dir(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)
