"""``fastmid train`` on bad input: exit code 2, one line on stderr, no traceback, and nothing
written to the output directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastmid.cli import main
from tests.fastmid._runs import RECORDS, as_flags, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread_torch_path")


# The tiny model of the command-line tests: 5 blocks load quickly (see conftest.model_dir).
MODEL_LAYERS = 5


def fastmid_train(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(["train", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def quick(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    settings = dict(
        model=model_dir, data=data, output_dir=out, precision="fp32", max_steps=1, eval=False,
        batch_tokens=256, max_length=64, rank=4,
    )  # fmt: skip
    return [*as_flags(settings), *extra]


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fastmid train: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]


def bad_data(tmp_path: Path, kind: str) -> tuple[Path, list[str]]:
    """A data file with one problem, and the words its error message must contain."""
    path = tmp_path / f"{kind}.jsonl"
    good = json.dumps(RECORDS[0])
    if kind == "missing":
        return path, ["data file not found", str(path)]
    if kind == "malformed":
        path.write_text(f"{good}\n{good}\n{{not json\n")
        return path, [f"{path}:3", "malformed JSON"]
    if kind == "shape":
        path.write_text(f'{good}\n{{"text": "no question here"}}\n')
        return path, [f"{path}:2", "unknown record shape"]
    if kind == "empty":
        path.write_text("\n\n")
        return path, ["no records", str(path)]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "malformed", "shape", "empty"])
def test_bad_data_file(kind: str, model_dir: Path, tmp_path: Path, capsys):
    path, needles = bad_data(tmp_path, kind)
    out = tmp_path / "out"
    code, _, err = fastmid_train(capsys, *quick(model_dir, path, out))
    assert_one_line_error(code, err, *needles)
    assert not out.exists()


def test_no_example_left_after_filtering(model_dir: Path, tmp_path: Path, capsys):
    # Every response is cut off by max_length, so no example has a token to learn from.
    long_prompts = [{"prompt": "word " * 80, "response": "yes"} for _ in range(3)]
    path = write_jsonl(tmp_path / "long.jsonl", long_prompts)
    out = tmp_path / "out"
    code, _, err = fastmid_train(capsys, *quick(model_dir, path, out))
    assert_one_line_error(code, err, "no examples left")
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--band", "0.9,0.1"], ["band"]),
        (["--band", "12-14"], ["band layer 12 is outside the layers 0..4"]),
        (["--rank", "0"], ["rank must be a positive integer"]),
        (["--rank", "4096"], ["rank"]),
        (["--targets", "q_proj,qq_proj"], ["unknown target 'qq_proj'"]),
        (["--epochs", "0"], ["epochs must be positive"]),
    ],
)
def test_bad_band_rank_target(flags, needles, model_dir: Path, good_data: Path, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = fastmid_train(capsys, *quick(model_dir, good_data, out, *flags))
    assert_one_line_error(code, err, *needles)
    assert not out.exists()


def test_model_that_is_not_a_causal_lm(good_data: Path, tmp_path: Path, capsys):
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "weights.txt").write_text("hello")
    out = tmp_path / "out"
    code, _, err = fastmid_train(capsys, *quick(not_a_model, good_data, out))
    assert_one_line_error(code, err, str(not_a_model))
    assert not out.exists()

    encoder = tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text(json.dumps({"model_type": "vit"}))
    code, _, err = fastmid_train(capsys, *quick(encoder, good_data, out))
    assert_one_line_error(code, err, "not a causal language model")
    assert not out.exists()


def test_non_empty_output_dir(model_dir: Path, good_data: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, _, err = fastmid_train(capsys, *quick(model_dir, good_data, out))
    assert_one_line_error(code, err, "not empty", "--overwrite", "--resume")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    code, _, err = fastmid_train(capsys, *quick(model_dir, good_data, out, "--resume"))
    assert_one_line_error(code, err, "no checkpoint")

    # --overwrite replaces fastmid's own results and leaves the user's other files alone.
    code, stdout, err = fastmid_train(capsys, *quick(model_dir, good_data, out, "--overwrite"))
    assert code == 0, err
    assert "step 1/1 | loss" in stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "adapter", "config.yaml", "curve.png", "metrics.jsonl", "notes.txt", "summary.json"
    ]  # fmt: skip


def test_overwrite_replaces_a_previous_runs_results(
    model_dir: Path, good_data: Path, tmp_path: Path, capsys
):
    out = tmp_path / "out"
    code, _, err = fastmid_train(capsys, *quick(model_dir, good_data, out, "--seed", "1"))
    assert code == 0, err
    old = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (out / "notes.txt").write_text("keep me")
    (out / "adapter" / "README.md").write_text("a file the user put in the old adapter dir")
    (out / "checkpoint.old").mkdir()  # a stale previous checkpoint of an earlier run
    (out / "checkpoint.old" / "state.json").write_text("{}")

    args = quick(model_dir, good_data, out, "--overwrite", "--max-steps", "2", "--seed", "2")
    code, stdout, err = fastmid_train(capsys, *args)
    assert code == 0, err
    assert "step 2/2 | loss" in stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "adapter", "config.yaml", "curve.png", "metrics.jsonl", "notes.txt", "summary.json"
    ]  # fmt: skip
    assert (out / "notes.txt").read_text() == "keep me"
    # Every result is the new run's: nothing kept from the old files, nothing appended to them.
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").open()] == [1, 2]
    assert "seed: 2" in (out / "config.yaml").read_text()
    assert sorted(p.name for p in (out / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"
    ]  # fmt: skip
    for name in ("adapter_model.safetensors", "metrics.jsonl", "summary.json", "config.yaml"):
        new = next(p for p in out.rglob(name)).read_bytes()
        assert new != old[name], name


def test_config_file_with_flag_overrides(model_dir: Path, good_data: Path, tmp_path, capsys):
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text(f"rank: 2\nalpha: 4\nmax_steps: 5\nband: all\nmodel: {model_dir}\n")
    args = ["--config", str(config), *quick(model_dir, good_data, out, "--max-steps", "2")]
    code, _, err = fastmid_train(capsys, *args)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2  # the flag beat the file's max_steps: 5
    assert summary["resolved"]["rank"] == 4  # --rank 4 beat the file's rank: 2
    assert summary["resolved"]["layers"] == [0, 1, 2, 3, 4]
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 4  # alpha from the file

    config.write_text("rank: 2\nranks: 3\n")
    code, _, err = fastmid_train(capsys, "--config", str(config))
    assert_one_line_error(code, err, "unknown config key 'ranks'")


def test_real_process_exit_code_and_stderr(good_data: Path, tmp_path: Path):
    """The installed entry point, as a user runs it: exit 2 and exactly one stderr line."""
    out = tmp_path / "out"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "fastmid", "train", "--data", str(tmp_path / "nope.jsonl"),
         "--output-dir", str(out)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"fastmid train: error: data file not found: {tmp_path / 'nope.jsonl'}"
    ]
    assert not out.exists()


@pytest.mark.parametrize("command", ["train", "eval", "analyze", "probe"])
def test_help_states_every_default(command: str, capsys: pytest.CaptureFixture):
    """Each option's help says what happens when it is not given, as ``train --help`` does."""
    import argparse
    import importlib

    from fastmid.cli import COMMANDS

    parser = argparse.ArgumentParser(prog=f"fastmid {command}")
    importlib.import_module(COMMANDS[command][0]).add_arguments(parser)
    options = [a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")]
    assert options
    for action in options:
        if action.required:
            continue
        assert "default:" in (action.help or ""), f"{command} {action.option_strings[0]}"
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "(default: " in capsys.readouterr().out


def test_budget_rank_is_clamped_with_one_line(model_dir: Path, good_data: Path, tmp_path, capsys):
    out = tmp_path / "out"
    # Budget 64 over 3 of 5 layers: rank 106, wider than the tiny model's 32-wide k/v.
    flags = [f for f in quick(model_dir, good_data, out) if f not in ("--rank", "4")]
    code, stdout, err = fastmid_train(capsys, *flags)
    assert code == 0, err
    notes = [line for line in stdout.splitlines() if "from the budget" in line]
    assert notes == [
        "note: rank 106 from the budget is wider than k_proj of layer 1 (32x64); using rank 32"
    ]
    assert json.loads((out / "summary.json").read_text())["resolved"]["rank"] == 32


def test_version(capsys):
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"fastmid {version('fastmid')}\n"
