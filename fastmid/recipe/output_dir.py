"""A run's output directory: what it holds, refusing to mix runs, the point a ``--resume``
continues from, checkpoints of the loop's progress, and the files of a finished run.

Output directory layout::

    <output-dir>/adapter/         PEFT adapter (adapter_config.json + adapter_model.safetensors)
    <output-dir>/config.yaml      resolved config (feed it back with --config)
    <output-dir>/metrics.jsonl    one JSON object per logged step
    <output-dir>/summary.json     loss first → last, accuracy before → after, tok/s, wall time
    <output-dir>/predictions.jsonl  eval generations of the tuned model
    <output-dir>/curve.png        loss and learning rate per logged step
    <output-dir>/checkpoint/      only while a run is unfinished (interrupted or in progress)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastmid.engine.adapters import save_adapter
from fastmid.errors import UserError
from fastmid.fileio import write_text_atomic
from fastmid.outdir import user_entries
from fastmid.recipe import distributed
from fastmid.recipe.batches import StepPlan
from fastmid.recipe.checkpoint import (
    CHECKPOINT_DIR,
    find_checkpoint,
    load_checkpoint,
    read_extra,
    remove_checkpoint,
    save_checkpoint,
)
from fastmid.recipe.config import AUTO_BATCH, TrainConfig, may_change_on_resume, save_yaml
from fastmid.recipe.distributed import log
from fastmid.recipe.metrics import Progress, save_curve, truncate_metrics

# Files a run writes; --overwrite removes exactly these and nothing else the user keeps there.
OUTPUT_ENTRIES = (
    "adapter",
    "config.yaml",
    "metrics.jsonl",
    "summary.json",
    "predictions.jsonl",
    "curve.png",
    "tensorboard",
    "wandb",
    CHECKPOINT_DIR,
    CHECKPOINT_DIR + ".old",
)


def check_output_dir(cfg: TrainConfig) -> Path:
    """Refuse to mix runs: a non-empty dir needs --overwrite, --resume needs a checkpoint."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output dir {out} exists and is not a directory")
    if cfg.resume:
        if find_checkpoint(out / CHECKPOINT_DIR) is None:
            raise UserError(f"--resume: no checkpoint in {out} (nothing to resume)")
        return out
    if user_entries(out) and not cfg.overwrite:
        raise UserError(
            f"output dir {out} is not empty; pass --overwrite to replace its results "
            "or --resume to continue"
        )
    return out


def read_resume_point(cfg: TrainConfig, out: Path) -> dict[str, Any] | None:
    """With --resume, what the checkpoint recorded (checked against ``cfg``); else None."""
    if not cfg.resume:
        return None
    resumed = read_extra(out / CHECKPOINT_DIR)
    if resumed is not None:
        check_resume_compatible(cfg, resumed["config"])
    return resumed


def check_resume_compatible(cfg: TrainConfig, saved: dict[str, Any]) -> None:
    """A --resume must train what the checkpoint trained (logging and eval may change)."""
    now = cfg.to_dict()
    # batch_tokens auto takes the checkpoint's sizes (train.resolve_batch), whatever it chose then.
    chosen = ("batch_tokens", "grad_accum") if cfg.batch_tokens == AUTO_BATCH else ()
    for key, value in saved.items():
        if may_change_on_resume(key) or key not in now or key in chosen:
            continue
        if now[key] != value:
            raise UserError(
                f"--resume: {key} is {now[key]!r} but the checkpoint was trained with {value!r}"
            )


def start_or_resume(
    cfg: TrainConfig,
    out: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    eval_before: dict[str, float],
    plan: StepPlan,
) -> Progress:
    """A fresh run clears the previous results; --resume restores the checkpoint in place."""
    if not cfg.resume:
        if distributed.is_main():
            out.mkdir(parents=True, exist_ok=True)
            _clear_previous_outputs(out)
        return Progress(eval_before=eval_before)
    extra = load_checkpoint(out / CHECKPOINT_DIR, model, optimizer, scheduler)
    progress = Progress(
        int(extra["step"]), extra["totals"], extra["loss_first"], extra["loss_last"], eval_before
    )
    progress.eval_losses = extra.get("eval_losses", [])
    if distributed.is_main():
        truncate_metrics(out / "metrics.jsonl", progress.step)
    log(f"resumed from {out / CHECKPOINT_DIR} at step {progress.step}/{plan.total_steps}")
    return progress


def save_progress(
    out: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: Progress,
    cfg: TrainConfig,
) -> None:
    """Checkpoint (rank 0 writes; every rank holds the same adapters and optimizer state)."""
    if distributed.is_main():
        extra = {**dataclasses.asdict(progress), "config": cfg.to_dict()}
        save_checkpoint(out / CHECKPOINT_DIR, model, optimizer, scheduler, extra)


def _clear_previous_outputs(out: Path) -> None:
    for name in OUTPUT_ENTRIES:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def finish_outputs(
    out: Path,
    model: nn.Module,
    model_name: str,
    config: dict[str, Any],
    summary: dict[str, Any],
    predictions: list[dict],
) -> None:
    """Rank 0 writes the adapter, config, predictions and summary, then drops the checkpoint."""
    if not distributed.is_main():
        return
    _save_adapter_atomic(model, out / "adapter", model_name)
    save_yaml(config, out / "config.yaml")
    if predictions:
        text = "".join(json.dumps(p) + "\n" for p in predictions)
        write_text_atomic(out / "predictions.jsonl", text)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    save_curve(out / "metrics.jsonl", out / "curve.png")
    remove_checkpoint(out / CHECKPOINT_DIR)


def _save_adapter_atomic(model: nn.Module, adapter_dir: Path, model_name: str) -> None:
    tmp = Path(tempfile.mkdtemp(dir=adapter_dir.parent, prefix=".adapter.tmp-"))
    try:
        save_adapter(model, tmp, base_model_name_or_path=model_name)
        if adapter_dir.exists():
            shutil.rmtree(adapter_dir)
        os.replace(tmp, adapter_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
