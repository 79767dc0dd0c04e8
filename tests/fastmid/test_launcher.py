"""``fastmid train --nproc N``: the torchrun launcher reports like one process does.

A user error is one line on stderr and exit status 2 (not torchrun's report of failed
workers and status 1); SIGTERM to the launcher reaches the workers, which checkpoint and stop,
and the launcher exits 130.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastmid.errors import STATUS_FILE_ENV, UserError, record_exit, report_user_error
from tests.fastmid._runs import RECORDS, make_model_dir, write_jsonl


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return env


def _train(*args: str) -> subprocess.Popen:
    # A session of its own, so a hung run can be killed with torchrun and its workers.
    return subprocess.Popen(
        [sys.executable, "-m", "fastmid", "train", "--nproc", "2", *args],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise


@pytest.mark.parametrize(
    ("env", "printed"),
    [
        ({}, True),
        ({"LOCAL_RANK": "0", "RANK": "0"}, True),
        ({"LOCAL_RANK": "1", "RANK": "1"}, False),
    ],
)
def test_a_user_error_is_printed_once_under_torchrun(
    env: dict, printed: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    for key in ("LOCAL_RANK", "RANK", STATUS_FILE_ENV):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert report_user_error("fastmid train", UserError("bad band\nreally")) == 2
    line = "fastmid train: error: bad band really"
    assert capsys.readouterr().err == (line + "\n" if printed else "")


def test_launcher_workers_report_to_the_status_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    status = tmp_path / "status.txt"
    status.write_text("")
    monkeypatch.setenv(STATUS_FILE_ENV, str(status))
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "0")
    assert report_user_error("fastmid train", UserError("no data")) == 2
    record_exit(2)
    assert capsys.readouterr().err == ""  # the launcher prints it, once for all ranks
    assert status.read_text() == "error fastmid train: error: no data\nexit 2\n"


def test_an_interrupted_worker_reports_130_before_teardown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # The checkpoint is saved when train() returns: the launcher learns it even if the worker
    # is ended during teardown (torchrun's grace period after passing a signal on).
    import argparse

    from fastmid.recipe import distributed
    from fastmid.recipe import train as train_mod

    status = tmp_path / "status.txt"
    status.write_text("")
    monkeypatch.setenv(STATUS_FILE_ENV, str(status))
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(train_mod, "train", lambda cfg: {"interrupted": True})

    def killed() -> None:
        raise SystemExit(-9)

    monkeypatch.setattr(distributed, "shutdown", killed)
    with pytest.raises(SystemExit):
        train_mod.run(argparse.Namespace(config=None, command="train", output_dir=str(tmp_path)))
    assert status.read_text() == "exit 130\n"


@pytest.mark.slow  # starts torchrun and two worker processes
def test_user_error_on_two_ranks_is_one_line_and_exit_2(tmp_path: Path):
    missing, out = tmp_path / "missing.jsonl", tmp_path / "out"
    proc = _train("--data", str(missing), "--output-dir", str(out), "--no-eval")
    _, stderr = _finish(proc)
    assert proc.returncode == 2, stderr
    assert stderr.strip().splitlines() == [f"fastmid train: error: data file not found: {missing}"]
    assert not out.exists()


@pytest.mark.slow  # starts torchrun and two worker processes
def test_sigterm_to_the_launcher_checkpoints_and_exits_130(tmp_path: Path):
    model = make_model_dir(tmp_path, num_layers=4)
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    out = tmp_path / "out"
    proc = _train(
        "--model", str(model), "--data", str(data), "--output-dir", str(out), "--no-eval",
        "--precision", "fp32", "--max-steps", "500", "--batch-tokens", "128",
        "--max-length", "64", "--rank", "4",
    )  # fmt: skip
    deadline = time.monotonic() + 180
    while not (out / "metrics.jsonl").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "no training step within 180 s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # the launcher only: it must pass the signal on
    stdout, stderr = _finish(proc)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "SIGTERM: saving a checkpoint after this step, then stopping" in stdout
    assert (out / "checkpoint" / "manifest.json").is_file()
    assert not (out / "adapter").exists()
    steps = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert 1 <= len(steps) < 500
    assert f"stopped at step {len(steps)}; continue with --resume" in stdout
