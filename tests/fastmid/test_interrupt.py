"""Stopping a run: SIGINT and SIGTERM checkpoint and exit 130, a second SIGINT stops at once,
and a resume falls back to the previous checkpoint when the newest is damaged.

(``--nproc``'s launcher passing signals on is tested in ``test_launcher.py``.)
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import fastmid.kernels._common as kernel_dispatch
import pytest
import torch

import fastmid.recipe.train as train_mod
from fastmid.cli import main
from fastmid.recipe.config import build_config


@pytest.fixture(scope="module", autouse=True)
def torch_path() -> Iterator[None]:
    """The kernels' torch path on one thread, for every run here (the module-scoped
    reference run included, so all runs do the same arithmetic)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernel_dispatch, "INTERPRET", False)
        yield
    torch.set_num_threads(threads)


# The tiny model of the command-line tests: 5 blocks load quickly (see conftest.model_dir).
MODEL_LAYERS = 5


def argv(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """A 5-step run with dropout on (its masks come from per-micro-batch seeds of the run seed
    and the step, so a resumed step draws the masks it would have drawn), and a small
    evaluation before and after. The saved RNG states' round trip is tested with the
    checkpoint itself."""
    return [
        "train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out),
        "--precision", "fp32", "--max-steps", "5", "--eval-data", str(data), "--eval-limit", "2",
        "--max-new-tokens", "3", "--batch-tokens", "128",
        "--max-length", "64", "--rank", "4", "--dropout", "0.1", "--lr", "1e-2",
        "--grad-accum", "1", *extra,
    ]  # fmt: skip


REAL_FORWARD_LOSS = train_mod.forward_loss


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(model_dir: Path, train_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every stopped-and-resumed run must reproduce."""
    out = tmp_path_factory.mktemp("straight") / "out"
    assert main(argv(model_dir, train_data, out)) == 0
    return out


def signal_on_forward(monkeypatch: pytest.MonkeyPatch, at: dict[int, signal.Signals]) -> None:
    """Send this process ``at[n]`` during the n-th micro-batch forward (1-based)."""
    calls = {"n": 0}

    def forward_loss(model, batch):
        calls["n"] += 1
        if calls["n"] in at:
            os.kill(os.getpid(), at[calls["n"]])
        return REAL_FORWARD_LOSS(model, batch)

    monkeypatch.setattr(train_mod, "forward_loss", forward_loss)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_checkpoints_exits_130_and_resumes_exactly(
    sig: signal.Signals,
    straight: Path,
    model_dir: Path,
    train_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
):
    out = tmp_path / "out"
    before = signal.getsignal(sig)
    signal_on_forward(monkeypatch, {2: sig})  # during step 2 (one micro-batch a step)
    assert main(argv(model_dir, train_data, out)) == 130
    assert signal.getsignal(sig) is before  # the run's handler is gone again
    captured = capsys.readouterr()
    assert f"{sig.name}: saving a checkpoint after this step, then stopping" in captured.out
    assert "stopped at step 2; continue with --resume" in captured.out
    assert captured.err == ""
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "metrics.jsonl"]

    monkeypatch.setattr(train_mod, "forward_loss", REAL_FORWARD_LOSS)
    assert main(argv(model_dir, train_data, out, "--resume")) == 0
    assert losses(out) == losses(straight)  # bit-exact, dropout included
    a = (straight / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == a
    # The evaluation before training ran in the first part; the resume must carry it over.
    summary, want = (json.loads((d / "summary.json").read_text()) for d in (out, straight))
    assert summary["eval_before"] == want["eval_before"] and "heldout_ppl" in want["eval_before"]
    assert summary["eval_after"] == want["eval_after"]
    predictions = (straight / "predictions.jsonl").read_text()
    assert (out / "predictions.jsonl").read_text() == predictions
    assert not (out / "checkpoint").exists() and not (out / "checkpoint.old").exists()


def test_a_second_sigint_stops_at_once(
    model_dir: Path,
    train_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
):
    out = tmp_path / "out"
    signal_on_forward(monkeypatch, {1: signal.SIGINT, 2: signal.SIGINT})
    # Two micro-batches a step: the second SIGINT arrives before step 1's checkpoint.
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(build_config(None, _config(model_dir, train_data, out, grad_accum=2)))
    assert not (out / "checkpoint").exists()  # stopped at once: no checkpoint was written

    signal_on_forward(monkeypatch, {1: signal.SIGINT, 2: signal.SIGINT})
    code = main(argv(model_dir, train_data, tmp_path / "cli", "--grad-accum", "2"))
    assert code == 130
    assert capsys.readouterr().err.splitlines() == ["fastmid train: interrupted"]


def _config(model_dir: Path, data: Path, out: Path, **over) -> dict:
    values = dict(
        model=str(model_dir), data=str(data), output_dir=str(out), precision="fp32",
        max_steps=5, eval=False, batch_tokens=128, max_length=64, rank=4, dropout=0.1, lr=1e-2,
    )  # fmt: skip
    return {**values, **over}


def test_resume_falls_back_to_the_previous_checkpoint(
    straight: Path,
    model_dir: Path,
    train_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
):
    out = tmp_path / "out"
    # Checkpoints after steps 1, 2 and 3; stopped by SIGTERM during step 3.
    signal_on_forward(monkeypatch, {3: signal.SIGTERM})
    assert main(argv(model_dir, train_data, out, "--save-every", "1")) == 130
    ckpt, previous = out / "checkpoint", out / "checkpoint.old"
    assert json.loads((previous / "state.json").read_text())["extra"]["step"] == 2
    blob = bytearray((ckpt / "optimizer.safetensors").read_bytes())
    blob[len(blob) // 2] ^= 0x10
    (ckpt / "optimizer.safetensors").write_bytes(bytes(blob))
    capsys.readouterr()

    monkeypatch.setattr(train_mod, "forward_loss", REAL_FORWARD_LOSS)
    assert main(argv(model_dir, train_data, out, "--resume")) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"fastmid: checkpoint {ckpt} is damaged (optimizer.safetensors does not match its "
        f"checksum); resuming from the previous one, {previous}"
    ]
    assert f"resumed from {ckpt} at step 2/5" in captured.out
    assert losses(out) == losses(straight)
