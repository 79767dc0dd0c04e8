"""TrainConfig: YAML plus overrides, type coercion, band parsing and one-line validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastmid.engine.midblock import parse_band
from fastmid.errors import UserError
from fastmid.recipe.config import DEMO, TrainConfig, build_config, load_yaml, save_yaml


def test_defaults_follow_the_paper():
    cfg = build_config(None, {"data": "mine.jsonl"}).resolved()
    mid = cfg.midblock
    assert (mid.alpha, mid.dropout, mid.rank_budget, cfg.lr) == (128.0, 0.05, 64, 1e-4)
    assert (cfg.epochs, cfg.max_steps) == (1, None)
    assert mid.targets == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert (mid.band, cfg.schedule, cfg.output_dir) == ((0.2, 0.8), "linear", "./fastmid-out")
    assert cfg.to_dict()["band"] == "0.2,0.8"


def test_no_arguments_is_the_short_demo():
    demo = build_config().resolved()
    assert (demo.max_steps, demo.lr) == (DEMO["max_steps"], DEMO["lr"])
    # Any of data, length or lr given by the user turns the demo off.
    assert build_config(None, {"epochs": 2}).resolved().lr == 1e-4
    assert build_config(None, {"lr": 5e-4}).resolved().max_steps is None
    assert build_config(None, {"max_steps": 3}).resolved().lr == 1e-4


def test_yaml_then_overrides(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "lr: 3.0e-4\nrank: 16\nband: [6, 7, 8]\ntargets: [q_proj, v_proj]\n"
        "max-steps: 20\neval: false\nalpha: 32\n"
    )
    cfg = build_config(path, {"rank": 4, "targets": "q_proj,k_proj", "lr": "1e-3"})
    assert cfg.midblock.rank == 4  # the flag wins
    assert cfg.lr == 1e-3  # strings from the command line are coerced
    assert cfg.midblock.targets == ("q_proj", "k_proj")
    assert cfg.midblock.band == [6, 7, 8]
    assert cfg.max_steps == 20 and cfg.eval is False
    assert cfg.midblock.alpha == 32.0 and isinstance(cfg.midblock.alpha, float)


def test_saved_config_round_trips(tmp_path: Path):
    cfg = build_config(None, {"rank": 8, "band": "3-5", "max_steps": 7})
    save_yaml({**cfg.to_dict(), "resolved": {"layers": [3, 4, 5]}}, tmp_path / "config.yaml")
    again = build_config(tmp_path / "config.yaml")
    assert again == cfg
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temp file


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.2,0.8", (0.2, 0.8)),
        (" 0.25 , 1 ", (0.25, 1.0)),
        ("all", "all"),
        ("auto", "auto"),
        ("6-23", list(range(6, 24))),
        ("7,3,5", [3, 5, 7]),
    ],
)
def test_parse_band(text: str, expected):
    assert parse_band(text) == expected


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"band": "0.8,0.2"}, "band '0.8,0.2'"),
        ({"band": "middle"}, "band 'middle' is not one of"),
        ({"band": "9-3"}, "range start 9 is after its end 3"),
        ({"rank": 0}, "rank must be a positive integer"),
        ({"rank": "eight"}, "rank must be int"),
        ({"targets": ""}, "targets must name at least one"),
        ({"targets": "q_proj,q_proj"}, "targets list a module twice"),
        ({"targets": "q-proj"}, "unknown target 'q-proj'"),
        ({"precision": "fp16"}, "precision must be one of auto|bf16|fp32"),
        ({"dropout": 1.0}, "dropout must be in [0, 1)"),
        ({"batch_tokens": 64, "max_length": 128}, "batch_tokens (64) must be at least"),
        ({"resume": True, "overwrite": True}, "exclude each other"),
        ({"lerning_rate": 1e-3}, "unknown config key 'lerning_rate'"),
        ({"lr_": 1e-3}, "did you mean 'lr'?"),
        ({"eval": "maybe"}, "eval must be bool"),
        ({"max_steps": 2.5}, "max_steps must be int"),
    ],
)
def test_bad_values_are_one_line_user_errors(overrides: dict, message: str):
    with pytest.raises(UserError) as err:
        build_config(None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_file_problems(tmp_path: Path):
    with pytest.raises(UserError, match="config file not found"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 1e-4\nrank: [1,\n")
    with pytest.raises(UserError, match=r"bad\.yaml:\d+: not valid YAML"):
        load_yaml(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- lr\n- rank\n")
    with pytest.raises(UserError, match="expected a mapping"):
        load_yaml(listy)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert build_config(empty) == TrainConfig()


def test_every_field_is_one_flag_with_its_help_and_default():
    import argparse

    from fastmid.recipe.config import add_arguments, config_fields

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    # argparse wraps long help lines (also at hyphens): compare without white space.
    text = "".join(parser.format_help().split())
    for f in config_fields():
        assert f"--{f.name.replace('_', '-')}" in text, f.name
        assert "".join(f.metadata["help"].split()) in text, f.name
    assert "(default:0.2,0.8)" in text and "(default:q_proj,k_proj,v_proj,o_proj)" in text
    assert "(default:0.05)" in text and "(default:128.0)" in text

    args = parser.parse_args(["--rank", "4", "--no-eval", "--use-rslora", "--no-use-liger"])
    given = {k: v for k, v in vars(args).items() if k != "config"}
    # Flags the user did not type stay out, so they cannot override a config file.
    assert given == {"rank": "4", "eval": False, "use_rslora": True, "use_liger": False}
    cfg = build_config(None, given)
    assert (cfg.midblock.rank, cfg.eval, cfg.midblock.use_rslora) == (4, False, True)
    assert cfg.midblock.use_liger is False


def test_user_errors_are_value_errors_for_library_callers():
    from fastmid.engine.midblock import MidBlockConfig

    with pytest.raises(ValueError, match="rank must be a positive integer"):
        build_config(None, {"rank": 0})
    with pytest.raises(ValueError, match="dropout must be in"):
        MidBlockConfig(dropout=1.5).validate()
