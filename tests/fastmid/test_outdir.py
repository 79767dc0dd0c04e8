"""One run per output directory: a second run refuses while the first holds the directory, and
a killed run's directory is usable again at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastmid.errors import UserError
from fastmid.outdir import LOCK_NAME, hold_output_dir, user_entries
from tests.fastmid._runs import RECORDS, as_flags, tiny_settings, write_jsonl


def test_a_held_directory_refuses_a_second_holder_and_is_released(tmp_path: Path):
    out = tmp_path / "out"
    with hold_output_dir(out):
        assert (out / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        assert user_entries(out) == []  # the lock file does not make the directory a run's
        # flock locks belong to open files, so a second open in this process conflicts too.
        in_use = rf"output dir {out} is in use .*\(pid {os.getpid()}\)"
        with pytest.raises(UserError, match=in_use), hold_output_dir(out):
            pass
        (out / "result.txt").write_text("kept")
    assert sorted(p.name for p in out.iterdir()) == ["result.txt"]
    with hold_output_dir(out):  # free again
        pass


def test_a_directory_made_for_a_run_that_wrote_nothing_is_removed(tmp_path: Path):
    out = tmp_path / "new" / "out"
    with pytest.raises(RuntimeError), hold_output_dir(out):
        raise RuntimeError("failed before writing")
    assert not out.exists()


def _train(settings: dict, *extra: str, stderr: int = subprocess.PIPE) -> subprocess.Popen:
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fastmid", "train", *as_flags(settings), *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)


def _wait_for_checkpoint(proc: subprocess.Popen, out: Path) -> None:
    deadline = time.monotonic() + 600
    while not (out / "checkpoint" / "state.json").is_file():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_two_runs_on_one_directory_one_trains_the_other_refuses(model_dir: Path, tmp_path: Path):
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    out = tmp_path / "out"
    settings = tiny_settings(model_dir, data, out, max_steps=6, save_every=1)
    first = _train(settings)
    _wait_for_checkpoint(first, out)
    first.send_signal(signal.SIGSTOP)  # hold it mid-run, whatever the machine's speed
    try:
        # --overwrite: only the lock stands between this run and the first one's files.
        second = _train(settings, "--overwrite")
        assert second.wait(timeout=600) == 2
        err = second.stderr.read()
        assert err == (
            f"fastmid train: error: output dir {out} is in use by another fastmid run "
            f"(pid {first.pid}); wait for it to end or choose another output dir\n"
        )
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=600) == 0, first.stderr.read()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter", "config.yaml", "curve.png", "metrics.jsonl", "summary.json",
    ]  # fmt: skip


def test_a_killed_runs_directory_is_usable_at_once(model_dir: Path, tmp_path: Path):
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    out = tmp_path / "out"
    settings = tiny_settings(model_dir, data, out, max_steps=6, save_every=1)
    killed = _train(settings)
    _wait_for_checkpoint(killed, out)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    assert (out / LOCK_NAME).read_text() == f"{killed.pid}\n"  # left behind, held by no one
    resumed = _train(settings, "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "--output", "{out}/preds.jsonl"],
        ["analyze", "--tuned", "{out}", "--output-dir", "{out}"],
        ["compare", "--output-dir", "{out}"],
    ],
)
def test_every_writing_command_refuses_a_held_directory(argv: list[str], tmp_path: Path, capsys):
    from fastmid.cli import main

    out = tmp_path / "out"
    with hold_output_dir(out):
        assert main([a.format(out=out) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"output dir {out} is in use by another fastmid run (pid {os.getpid()})" in err
