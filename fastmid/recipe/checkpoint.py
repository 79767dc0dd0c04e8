"""Resumable training checkpoints: safetensors for tensors, JSON for everything else.

A checkpoint is a directory holding

- ``adapter.safetensors``: every trainable parameter by its module path,
- ``optimizer.safetensors``: the optimizer's per-parameter state (``<key>/<param name>``),
- ``torch_rng.safetensors``: torch's CPU and CUDA generator states,
- ``state.json``: optimizer hyper-parameters, scheduler counters, Python/NumPy RNG states and
  whatever the training loop passes as ``extra`` (data position, running totals, config),
- ``manifest.json``: the size and SHA-256 of each of the files above, written last.

It is written into a temporary sibling directory and renamed into place, so a reader sees the
previous checkpoint or the new one, never a partial one. The previous checkpoint is kept as
``<name>.old``: when the files of the newest one are damaged later (a bad disk, a truncating
copy), the manifest shows it and loading falls back to the previous one, saying so in one
line. A failed save (a full disk) leaves both untouched. No pickle anywhere.

:class:`CheckpointSchedule` says when the training loop writes one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from fastmid.errors import UserError
from fastmid.recipe import distributed

CHECKPOINT_DIR = "checkpoint"
_STATE = "state.json"
MANIFEST = "manifest.json"
# Suffix of the previous checkpoint, kept beside the newest as a fallback.
PREVIOUS = ".old"


def trainable_named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters by module path, in registration order (the optimizer's order)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    extra: dict[str, Any],
) -> Path:
    """Write a complete checkpoint to ``path`` atomically and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    params = trainable_named_parameters(model)
    names_by_id = {id(p): name for name, p in params.items()}
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        files = {
            "adapter.safetensors": safetensors_bytes(
                {name: p.detach().contiguous().cpu() for name, p in params.items()}
            ),
            "optimizer.safetensors": safetensors_bytes(_optimizer_tensors(optimizer, names_by_id)),
            "torch_rng.safetensors": safetensors_bytes(_torch_rng_tensors()),
        }
        groups = [
            {k: v for k, v in group.items() if k != "params"}
            for group in optimizer.state_dict()["param_groups"]
        ]
        state = {
            "param_groups": _jsonable(groups),
            "scheduler": _jsonable(
                {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
            ),
            "python_rng": _jsonable(random.getstate()),
            "numpy_rng": _jsonable(np.random.get_state()),
            "extra": extra,
        }
        files[_STATE] = json.dumps(state, indent=1).encode("utf-8")
        manifest = {name: _write_file(tmp / name, blob) for name, blob in files.items()}
        _write_file(tmp / MANIFEST, json.dumps({"files": manifest}, indent=1).encode("utf-8"))
        _swap_into_place(tmp, path)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = err.strerror or str(err)
        kept = " (the previous checkpoint is kept)" if path.is_dir() else ""
        raise UserError(f"cannot save the checkpoint {path}: {reason}{kept}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Restore parameters, optimizer, scheduler and RNG states in place; return ``extra``.

    Loads the newest valid checkpoint (see :func:`find_checkpoint`); when that is the previous
    one because the newest is damaged, one line on stderr says so.
    """
    wanted = Path(path)
    path = find_checkpoint(wanted)
    if path is None:
        raise UserError("no checkpoint to resume from")
    damage = verify_checkpoint(wanted) if wanted.exists() and path != wanted else None
    if damage is not None and _is_rank0():
        print(
            f"fastmid: checkpoint {wanted} is damaged ({damage}); resuming from the previous "
            f"one, {path}",
            file=sys.stderr,
            flush=True,
        )
    params = trainable_named_parameters(model)
    try:
        state = json.loads((path / _STATE).read_text(encoding="utf-8"))
        saved = load_file(str(path / "adapter.safetensors"))
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        rng = load_file(str(path / "torch_rng.safetensors"))
    except (OSError, ValueError) as err:
        raise UserError(f"checkpoint {path} is unreadable: {err}") from None
    if set(saved) != set(params):
        raise UserError(
            f"checkpoint {path} holds different adapter parameters than this run builds "
            "(band, rank or targets changed?)"
        )
    with torch.no_grad():
        for name, p in params.items():
            if saved[name].shape != p.shape:
                raise UserError(f"checkpoint {path}: {name} has shape {tuple(saved[name].shape)}")
            p.copy_(saved[name])

    # Rebuild the optimizer's own state_dict layout: state keyed by parameter index.
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    names_by_id = {id(p): name for name, p in params.items()}
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for index, p in enumerate(ordered):
        name = names_by_id[id(p)]
        # load_state_dict moves and casts each entry to its parameter's device itself.
        entry = {
            key.split("/", 1)[0]: t
            for key, t in opt_tensors.items()
            if key.split("/", 1)[1] == name
        }
        if entry:
            opt_state[index] = entry
    groups = state["param_groups"]
    start = 0
    for group, live in zip(groups, optimizer.param_groups, strict=True):
        group["params"] = list(range(start, start + len(live["params"])))
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        start += len(live["params"])
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    sched = scheduler.state_dict()
    sched.update(state["scheduler"])
    scheduler.load_state_dict(sched)

    random.setstate(_python_rng(state["python_rng"]))
    np.random.set_state(_numpy_rng(state["numpy_rng"]))
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        cuda_states = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    return state["extra"]


def find_checkpoint(path: str | os.PathLike[str]) -> Path | None:
    """The newest valid checkpoint: ``path``, else the previous one (``<path>.old``).

    None when neither exists; UserError when they exist but none passes
    :func:`verify_checkpoint`.
    """
    path = Path(path)
    damage = None
    for candidate in (path, path.with_name(path.name + PREVIOUS)):
        if not candidate.is_dir():
            continue
        problem = verify_checkpoint(candidate)
        if problem is None:
            return candidate
        damage = damage or f"checkpoint {candidate} is damaged ({problem})"
    if damage is None:
        return None
    raise UserError(f"{damage} and there is no valid checkpoint to resume from")


def verify_checkpoint(path: str | os.PathLike[str]) -> str | None:
    """None when every file of the checkpoint at ``path`` matches its manifest, else why not."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name in ("adapter.safetensors", "optimizer.safetensors", "torch_rng.safetensors", _STATE):
        if name not in manifest:
            return f"{MANIFEST} does not list {name}"
    for name, expected in manifest.items():
        try:
            blob = (path / name).read_bytes()
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as err:
            return f"{name} is unreadable: {err.strerror or err}"
        if len(blob) != expected["bytes"]:
            return f"{name} is truncated or padded: {len(blob)} of {expected['bytes']} bytes"
        if hashlib.sha256(blob).hexdigest() != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def remove_checkpoint(path: str | os.PathLike[str]) -> None:
    """Delete the checkpoint at ``path`` and the previous one kept beside it."""
    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(path.with_name(path.name + PREVIOUS), ignore_errors=True)


def read_extra(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Just the ``extra`` mapping of a checkpoint (cheap: no tensors), or None if absent."""
    found = find_checkpoint(path)
    if found is None:
        return None
    try:
        return json.loads((found / _STATE).read_text(encoding="utf-8"))["extra"]
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"checkpoint {found} is unreadable: {err}") from None


def _write_file(path: Path, data: bytes) -> dict[str, Any]:
    """Write ``data`` to ``path`` and flush it to the disk; returns its manifest entry."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _swap_into_place(tmp: Path, path: Path) -> None:
    # os.replace cannot replace a non-empty directory, so the current checkpoint steps aside
    # to become the previous one (dropping the one before it); find_checkpoint() falls back
    # to it if the new one is damaged later, or if we are killed between the two renames.
    old = path.with_name(path.name + PREVIOUS)
    if path.is_dir():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)


def _is_rank0() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def _optimizer_tensors(
    optimizer: torch.optim.Optimizer, names_by_id: dict[int, str]
) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if not isinstance(value, torch.Tensor):
                    value = torch.tensor(value)
                tensors[f"{key}/{names_by_id[id(p)]}"] = value.detach().contiguous().cpu()
    return tensors


def _torch_rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i:03d}"] = s
    return tensors


def _jsonable(value: Any) -> Any:
    """Tuples → lists, tensors/arrays → lists, numbers kept; enough for RNG and scheduler state."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _python_rng(saved: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss = saved
    return (version, tuple(internal), gauss)


def _numpy_rng(saved: list[Any]) -> tuple[Any, ...]:
    kind, keys, pos, has_gauss, cached = saved
    return (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)


class CheckpointSchedule:
    """When the loop writes a periodic checkpoint: every ``every_steps`` optimizer steps, and
    once ``every_minutes`` have passed since the last checkpoint (or the start)."""

    def __init__(self, every_steps: int, every_minutes: float) -> None:
        self.every_steps = every_steps
        self.every_seconds = every_minutes * 60.0
        self.saved()

    def due(self, step: int) -> bool:
        """Whether to checkpoint after ``step``; the same answer on every rank."""
        if self.every_steps > 0 and step % self.every_steps == 0:
            return True
        if self.every_seconds <= 0:
            return False
        # Clocks differ between ranks: rank 0's decides for all.
        late = distributed.is_main() and time.monotonic() - self.last >= self.every_seconds
        return distributed.any_rank(late)

    def saved(self) -> None:
        """A checkpoint was just written (or the loop starts): restart the clock."""
        self.last = time.monotonic()
