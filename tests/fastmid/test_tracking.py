"""Trackers: TensorBoard event files read back, W&B offline runs, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastmid.errors import UserError
from fastmid.recipe import tracking

CONFIG = {"lr": 0.001, "band": "0.2,0.8", "targets": ["q_proj", "v_proj"]}


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_text(log_dir: Path, tag: str) -> str:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    (event,) = acc.Tensors(tag + "/text_summary")
    return event.tensor_proto.string_val[0].decode()


def test_tensorboard_events_read_back(tmp_path: Path):
    pytest.importorskip("tensorboard")
    tracker = tracking.make_tracker("tensorboard", tmp_path)
    tracker.open(CONFIG)
    tracker.log(1, {"train/loss": 2.5, "train/lr": 1e-3})
    tracker.log(2, {"train/loss": 2.0, "train/lr": 5e-4})
    tracker.log(2, {"eval/loss": 2.25})
    tracker.close()
    scalars = read_scalars(tmp_path / "tensorboard")
    assert scalars["train/loss"] == [(1, 2.5), (2, 2.0)]
    assert scalars["train/lr"] == [(1, pytest.approx(1e-3)), (2, pytest.approx(5e-4))]
    assert scalars["eval/loss"] == [(2, 2.25)]
    text = read_text(tmp_path / "tensorboard", "config")
    assert json.loads(text.strip("`\n")) == CONFIG


def read_wandb(path: Path) -> tuple[list[dict], dict]:
    """History rows and config of an offline ``.wandb`` file: a 7-byte file header, then
    LevelDB-log records (7-byte header: crc32, length, type) in 32 KiB blocks, each a
    protobuf ``Record``."""
    import struct

    from wandb.proto import wandb_internal_pb2

    raw, pos, pending, history, config = path.read_bytes(), 7, b"", [], {}
    # Keys with a "/" are stored split into nested_key.
    name = lambda item: item.key or "/".join(item.nested_key)
    block = 32768
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        pending += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind not in (1, 4):  # FULL or LAST completes a record
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        pending = b""
        if record.WhichOneof("record_type") == "history":
            history.append({name(i): json.loads(i.value_json) for i in record.history.item})
        elif record.WhichOneof("record_type") == "run":
            config = {name(i): json.loads(i.value_json) for i in record.run.config.update}
    return history, config


def test_wandb_offline_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = tracking.make_tracker("wandb", tmp_path)
    tracker.open(CONFIG)
    tracker.log(1, {"train/loss": 2.5})
    tracker.log(2, {"train/loss": 2.0, "eval/loss": 2.25})
    tracker.close()
    # Offline by default: the run is a local file, synced later with `wandb sync`.
    (run_file,) = (tmp_path / "wandb" / "wandb").glob("offline-run-*/run-*.wandb")
    history, config = read_wandb(run_file)
    rows = [{k: v for k, v in h.items() if not k.startswith("_")} for h in history]
    assert rows == [{"train/loss": 2.5}, {"train/loss": 2.0, "eval/loss": 2.25}]
    assert [h["_step"] for h in history] == [1, 2]
    assert config["lr"] == 0.001 and config["targets"] == ["q_proj", "v_proj"]


def test_unknown_or_missing_tracker_is_one_line(monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(UserError, match=r"report_to must be one of none\|tensorboard\|wandb"):
        tracking.make_tracker("mlflow", ".")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(UserError, match=r"needs the wandb package: pip install 'fastmid\[track\]'"):
        tracking.make_tracker("wandb", ".")


def test_none_tracker_writes_nothing(tmp_path: Path):
    tracker = tracking.make_tracker("none", tmp_path)
    tracker.open(CONFIG)
    tracker.log(1, {"train/loss": 1.0})
    tracker.close()
    assert list(tmp_path.iterdir()) == []


# --- a resumed training run is one run in its tracker -------------------------------------


def crash_in_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """The run's forward raises during optimizer step ``step`` (one micro-batch a step)."""
    import fastmid.recipe.train as train_mod

    real, calls = train_mod.forward_loss, {"n": 0}

    def forward_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == step:
            raise RuntimeError("the machine went away")
        return real(model, batch)

    monkeypatch.setattr(train_mod, "forward_loss", forward_loss)


def crash_and_resume(
    kind: str, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """5 steps, a checkpoint every 2, a crash in step 4 (after step 3 was logged), --resume."""
    from fastmid.recipe.train import train
    from tests.fastmid._runs import RECORDS, tiny_cfg, write_jsonl

    data = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    out = tmp_path / "out"
    common = dict(max_steps=5, save_every=2, log_every=1, grad_accum=1, report_to=kind)
    with monkeypatch.context() as patch:
        crash_in_step(patch, 4)
        with pytest.raises(RuntimeError, match="went away"):
            train(tiny_cfg(model_dir, data, out, **common))
    assert [m["step"] for m in _metrics(out)] == [1, 2, 3]
    train(tiny_cfg(model_dir, data, out, resume=True, **common))
    assert [m["step"] for m in _metrics(out)] == [1, 2, 3, 4, 5]
    return out


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.usefixtures("one_thread_torch_path")
def test_tensorboard_shows_a_resumed_run_once(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    pytest.importorskip("tensorboard")
    out = crash_and_resume("tensorboard", model_dir, tmp_path, monkeypatch)
    scalars = read_scalars(out / "tensorboard")
    # Step 3 was logged before the crash and again after the resume from step 2: once here.
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5]
    assert [value for _, value in scalars["train/loss"]] == pytest.approx(
        [m["loss"] for m in _metrics(out)], rel=1e-6
    )
    assert [step for step, _ in scalars["train/lr"]] == [1, 2, 3, 4, 5]
    # The config text is written once, by the first part.
    assert json.loads(read_text(out / "tensorboard", "config").strip("`\n"))["max_steps"] == 5


@pytest.mark.usefixtures("one_thread_torch_path")
def test_wandb_resumes_the_same_run(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = crash_and_resume("wandb", model_dir, tmp_path, monkeypatch)
    runs = sorted((out / "wandb" / "wandb").glob("offline-run-*"))
    # Two parts (or one directory, when both started within the same second), one run id.
    ids = {run.name.rsplit("-", 1)[1] for run in runs}
    files = [f for run in runs for f in run.glob("run-*.wandb")]
    assert len(ids) == 1 and {f.name for f in files} == {f"run-{ids.pop()}.wandb"}
    history, config = read_wandb(files[-1])
    assert [h["_step"] for h in history][-2:] == [4, 5]
    assert config["max_steps"] == 5
