"""Checkpoint integrity: a manifest of checksums, the previous checkpoint as a fallback, and a
failed save (a full disk) that leaves what was there untouched."""

from __future__ import annotations

import errno
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fastmid.errors import UserError
from fastmid.recipe import checkpoint
from fastmid.recipe.checkpoint import (
    find_checkpoint,
    load_checkpoint,
    remove_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)


def _trainer(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2))
    model[1].weight.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    return model, optimizer, scheduler


def _step(model: nn.Module, optimizer, scheduler) -> None:
    model(torch.randn(3, 8)).square().sum().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def _two_checkpoints(path: Path) -> tuple[dict, dict]:
    """Save after step 1 and step 2; return both steps' trainable parameters."""
    model, optimizer, scheduler = _trainer()
    states = []
    for step in (1, 2):
        _step(model, optimizer, scheduler)
        save_checkpoint(path, model, optimizer, scheduler, {"step": step})
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return states[0], states[1]


def _flip_a_byte(p: Path) -> None:
    blob = bytearray(p.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    p.write_bytes(bytes(blob))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-7])


DAMAGE: dict[str, tuple[Callable[[Path], None], str, str]] = {
    # name: (what to do to the newest checkpoint, which file, the reason reported)
    "corrupted": (_flip_a_byte, "adapter.safetensors", "does not match its checksum"),
    "truncated": (_truncate, "optimizer.safetensors", "is truncated or padded"),
    "missing": (Path.unlink, "torch_rng.safetensors", "is missing"),
    "state_edited": (_flip_a_byte, "state.json", "does not match its checksum"),
    "no_manifest": (Path.unlink, "manifest.json", "no manifest.json"),
}


def test_save_keeps_the_previous_checkpoint_and_a_manifest(tmp_path: Path):
    path = tmp_path / "checkpoint"
    _two_checkpoints(path)
    old = tmp_path / "checkpoint.old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "checkpoint.old"]
    manifest = json.loads((path / "manifest.json").read_text())["files"]
    assert sorted(manifest) == [
        "adapter.safetensors", "optimizer.safetensors", "state.json", "torch_rng.safetensors"
    ]  # fmt: skip
    assert manifest["state.json"]["bytes"] == (path / "state.json").stat().st_size
    assert verify_checkpoint(path) is None and verify_checkpoint(old) is None
    assert json.loads((old / "state.json").read_text())["extra"] == {"step": 1}
    remove_checkpoint(path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(
    damage: str, tmp_path: Path, capsys: pytest.CaptureFixture
):
    path = tmp_path / "checkpoint"
    step1, step2 = _two_checkpoints(path)
    harm, file, reason = DAMAGE[damage]
    harm(path / file)
    assert reason in verify_checkpoint(path)
    assert find_checkpoint(path) == tmp_path / "checkpoint.old"

    model, optimizer, scheduler = _trainer(seed=1)
    capsys.readouterr()
    extra = load_checkpoint(path, model, optimizer, scheduler)
    err = capsys.readouterr().err.strip().splitlines()
    assert extra == {"step": 1}
    assert len(err) == 1
    assert f"checkpoint {path} is damaged" in err[0] and reason in err[0]
    assert "resuming from the previous one" in err[0]
    for key, p in checkpoint.trainable_named_parameters(model).items():
        assert torch.equal(p, step1[key]), key
    assert not torch.equal(model.state_dict()["0.weight"], step2["0.weight"])


def test_no_valid_checkpoint_is_one_user_error(tmp_path: Path):
    path = tmp_path / "checkpoint"
    _two_checkpoints(path)
    _flip_a_byte(path / "adapter.safetensors")
    _truncate(tmp_path / "checkpoint.old" / "adapter.safetensors")
    model, optimizer, scheduler = _trainer()
    with pytest.raises(UserError) as info:
        load_checkpoint(path, model, optimizer, scheduler)
    message = str(info.value)
    assert "\n" not in message
    assert f"checkpoint {path} is damaged (adapter.safetensors does not match" in message
    assert message.endswith("and there is no valid checkpoint to resume from")


def test_a_full_disk_during_a_save_leaves_both_checkpoints_as_they_were(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    path = tmp_path / "checkpoint"
    _two_checkpoints(path)
    before = {
        str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()
    }
    real_write = checkpoint._write_file
    written = []

    def write_file(target: Path, data: bytes) -> dict:
        if len(written) == 1:  # the second file runs out of space halfway
            target.write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        written.append(target.name)
        return real_write(target, data)

    monkeypatch.setattr(checkpoint, "_write_file", write_file)
    model, optimizer, scheduler = _trainer(seed=2)
    _step(model, optimizer, scheduler)
    with pytest.raises(UserError) as info:
        save_checkpoint(path, model, optimizer, scheduler, {"step": 3})
    assert str(info.value) == (
        f"cannot save the checkpoint {path}: No space left on device "
        "(the previous checkpoint is kept)"
    )
    after = {
        str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()
    }
    assert after == before  # no temp dir, no half-written file, nothing rotated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "checkpoint.old"]


def test_load_restores_every_rng_to_where_it_was_saved(tmp_path: Path):
    import random

    import numpy as np

    def draws() -> tuple:
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    model, optimizer, scheduler = _trainer()
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    draws()  # a state that no seed call gives
    save_checkpoint(tmp_path / "checkpoint", model, optimizer, scheduler, {"step": 1})
    want = draws()
    # Elsewhere in the generators' streams (and another draw, so the states differ again).
    random.seed(7)
    np.random.seed(8)
    torch.manual_seed(9)
    assert draws() != want
    load_checkpoint(tmp_path / "checkpoint", model, optimizer, scheduler)
    got = draws()
    assert got[0] == want[0] and got[1] == want[1] and got[2] == want[2]
