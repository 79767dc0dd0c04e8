"""Resumable training checkpoints: safetensors for tensors, JSON for everything else.

A checkpoint is a directory holding

- ``adapter.safetensors``: every trainable parameter by its module path,
- ``optimizer.safetensors``: the optimizer's per-parameter state (``<key>/<param name>``),
- ``torch_rng.safetensors``: torch's CPU and CUDA generator states,
- ``state.json``: optimizer hyper-parameters, scheduler counters, Python/NumPy RNG states and
  whatever the training loop passes as ``extra`` (data position, running totals, config).

It is written into a temporary sibling directory and renamed into place, so a reader sees the
previous checkpoint or the new one, never a partial one. No pickle anywhere.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fastmid.errors import UserError

CHECKPOINT_DIR = "checkpoint"
_STATE = "state.json"


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
        save_file(
            {name: p.detach().contiguous().cpu() for name, p in params.items()},
            str(tmp / "adapter.safetensors"),
        )
        save_file(_optimizer_tensors(optimizer, names_by_id), str(tmp / "optimizer.safetensors"))
        save_file(_torch_rng_tensors(), str(tmp / "torch_rng.safetensors"))
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
        (tmp / _STATE).write_text(json.dumps(state, indent=1), encoding="utf-8")
        _swap_into_place(tmp, path)
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
    """Restore parameters, optimizer, scheduler and RNG states in place; return ``extra``."""
    path = find_checkpoint(path)
    if path is None:
        raise UserError("no checkpoint to resume from")
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
    """The checkpoint at ``path``, or the previous one left by a swap that was cut short."""
    path = Path(path)
    for candidate in (path, path.with_name(path.name + ".old")):
        if (candidate / _STATE).is_file():
            return candidate
    return None


def read_extra(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Just the ``extra`` mapping of a checkpoint (cheap: no tensors), or None if absent."""
    found = find_checkpoint(path)
    if found is None:
        return None
    try:
        return json.loads((found / _STATE).read_text(encoding="utf-8"))["extra"]
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"checkpoint {found} is unreadable: {err}") from None


def _swap_into_place(tmp: Path, path: Path) -> None:
    # os.replace cannot replace a non-empty directory, so the old checkpoint steps aside
    # first; find_checkpoint() falls back to it if we are killed between the two renames.
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


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
