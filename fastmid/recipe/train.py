"""The training recipe and the ``fastmid train`` command.

:func:`train` reads top to bottom as named steps: check the output dir → load data → load the
model → choose the band → patch it (:func:`fastmid.engine.models.prepare_model`) → evaluate the base
model → AdamW over the adapter parameters only and a schedule sized by :func:`plan_steps` →
the loop of :func:`train_step` over packed token-budget batches, logged through a
:class:`MetricsWindow` and checkpointed → evaluate again → save the adapter (PEFT format), the
resolved config and a summary. Checkpoints make ``--resume`` continue exactly where the run
stopped: written atomically every ``save_every_minutes`` (10 by default), every ``save_every``
steps, and on SIGINT/SIGTERM.

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

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastmid.engine import models
from fastmid.engine.compile import compile_seconds
from fastmid.engine.loss import forward_loss
from fastmid.engine.midblock import MidBlockConfig, adapter_parameters, format_band
from fastmid.errors import INTERRUPTED_EXIT, UserError, record_exit
from fastmid.fileio import write_bytes_atomic, write_text_atomic
from fastmid.memory import peak_rss_bytes
from fastmid.recipe import data, distributed, tracking
from fastmid.recipe.checkpoint import (
    CHECKPOINT_DIR,
    find_checkpoint,
    load_checkpoint,
    read_extra,
    remove_checkpoint,
    save_checkpoint,
)
from fastmid.recipe.config import (
    AUTO_BATCH,
    CPU_BATCH_TOKENS,
    TrainConfig,
    build_config,
    may_change_on_resume,
    save_yaml,
)
from fastmid.recipe.data import Example
from fastmid.recipe.estimate import BatchChoice

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


# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run one training job described by ``cfg``; returns the summary (also summary.json).

    On SIGINT/SIGTERM the loop checkpoints and returns early with ``summary["interrupted"]``
    set; ``--resume`` then continues with the same losses an uninterrupted run would have.
    """
    wall = Stopwatch()
    cfg = cfg.validate().resolved()
    out = check_output_dir(cfg)
    resumed = read_resume_point(cfg, out)
    rt = init_runtime(cfg)
    # Data first: a bad file should fail in a second, not after loading a model.
    records = data.load_records(cfg.data or str(data.bundled_path("train")), cfg.fields)
    records, loss_records = split_heldout(cfg, records)
    eval_set = load_eval_set(cfg)
    seed_everything(cfg.seed)
    model, tokenizer, model_name, load_block = load_base_model(cfg, rt)
    parallel = distributed.resolve_parallel(cfg.parallel, model, rt.device, rt.world)
    # Under FSDP only each rank's shard goes to the device; a block loader puts each block there.
    if parallel != "fsdp" and load_block is None:
        model.to(rt.device)
    examples = data.tokenize_records(
        records,
        tokenizer,
        fmt=cfg.format,
        max_length=cfg.max_length,
        loss_on=cfg.loss_on,
        cache_dir=models.cache_root() / "tokenized",
    )
    heldout = HeldoutLoss.build(cfg, loss_records, tokenizer)
    adapter_cfg, band_reason = choose_band(
        cfg.midblock, cfg.lr, cfg.max_quality_gap, model, tokenizer, examples, rt.autocast
    )
    # FSDP shards each linear's own weight; fused groups read a concatenated copy.
    fuse = adapter_cfg.fuse_groups and parallel != "fsdp"
    adapter_cfg = dataclasses.replace(adapter_cfg, fuse_groups=fuse)
    torch.manual_seed(cfg.seed)
    state = models.prepare_model(model, adapter_cfg, rt.device, load_block)
    # One process: a pass-through. Several: DDP or FSDP, this rank's micro-batches, grad sums.
    dp = distributed.ParallelStep(model, parallel, forward_loss, rt.device)
    requested, (cfg, batch_choice) = cfg, resolve_batch(cfg, rt, model, adapter_cfg, resumed)
    # Freshly patched adapters have lora_B = 0, so this is exactly the base model's output;
    # patching first makes a bad band/rank/target fail before minutes of generation.
    eval_before = resumed["eval_before"] if resumed else None
    if eval_before is None:
        eval_before, _ = evaluate(model, tokenizer, eval_set, cfg, rt.autocast)
    params = adapter_parameters(model)
    optimizer = torch.optim.AdamW(params, cfg.lr, weight_decay=cfg.weight_decay, fused=rt.cuda)
    batches = EpochBatches(examples, cfg.batch_tokens, cfg.seed)
    plan = plan_steps(len(batches.epoch(0)), cfg)
    scheduler = make_scheduler(optimizer, plan, cfg.schedule)
    equalizer = make_equalizer(model) if cfg.equalize_updates else None
    resolved = describe_run(rt, model_name, parallel, state, params, plan, examples, band_reason)
    resolved.update(batch_tokens=cfg.batch_tokens, grad_accum=cfg.grad_accum)
    resolved.update(batch_choice.resolved() if batch_choice else {})
    progress = start_or_resume(cfg, out, model, optimizer, scheduler, eval_before, plan)
    log(format_header(resolved))

    update = optimizer_update(optimizer, scheduler, cfg.max_grad_norm, equalizer)
    checkpoints = CheckpointSchedule(cfg.save_every, cfg.save_every_minutes)
    model.train()
    heldout_loss = heldout and (lambda: heldout(model, rt.autocast))
    window = MetricsWindow(rt.device, out, progress, plan, cfg, resolved, heldout)
    with window, StopFlag().installed() as stop, out_of_memory_as_user_error(cfg, batch_choice):
        while progress.step < plan.total_steps:
            step_batches = [[examples[i] for i in b] for b in batches.for_step(plan, progress.step)]
            result = train_step(dp, step_batches, update, rt, (cfg.seed, progress.step))
            progress.step += 1
            window.add(result)
            # A signal may reach the ranks at different steps: all stop at the same one.
            stop.requested = distributed.any_rank(stop.requested)
            due = stop.requested or checkpoints.due(progress.step)
            saving = due and progress.step < plan.total_steps
            window.step_done(progress, result, heldout_loss, force=saving)
            if saving:
                save_progress(out, model, optimizer, scheduler, progress, cfg)
                checkpoints.saved()
                window.restart_clock()  # checkpoint time is not training time
            if saving and stop.requested:
                log(f"stopped at step {progress.step}; continue with --resume (in {out})")
                return progress.summary(plan, resolved, interrupted=True)
        eval_after, predictions = evaluate(model, tokenizer, eval_set, cfg, rt.autocast, tuned=True)
        window.tracker.log(progress.step, tracking.namespaced(eval_after, "eval"))
    summary = progress.summary(plan, resolved, interrupted=False)
    summary.update(eval_after=eval_after, adapter=str(out / "adapter"), wall_seconds=wall())
    # The band "auto" chose is recorded, so feeding this config back reproduces the run; a
    # batch size "auto" chose is in the resolved section (the next device may have less room).
    config = {
        **cfg.to_dict(),
        "band": format_band(adapter_cfg.band),
        "batch_tokens": requested.batch_tokens,
        "grad_accum": requested.grad_accum,
        "resolved": resolved,
    }
    finish_outputs(out, model, model_name, config, summary, predictions)
    log(format_summary(summary))
    return summary


# --------------------------------------------------------------------------------------------
# Steps of the recipe
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    """Where this process trains: its device, the number of ranks, the precision."""

    device: torch.device
    world: int
    precision: str

    @property
    def dtype(self) -> torch.dtype:
        return models.DTYPES[self.precision]

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 mixed precision, or nothing."""
        return torch.autocast(self.device.type, self.dtype, enabled=self.precision == "bf16")


def init_runtime(cfg: TrainConfig) -> Runtime:
    """This rank's device and precision; under torchrun, join the process group. Every rank
    has passed the output-dir checks before rank 0 may write there (the barrier)."""
    device = distributed.default_device()
    world = distributed.init_distributed(device).world_size
    quantize = cfg.midblock.quantize
    if world > 1 and quantize != "none":
        # DDP broadcasts and FSDP shards plain parameters; a quantized base is one process's.
        raise UserError(f"--quantize {quantize} runs in one process only; this run has {world}")
    distributed.barrier()
    if world > 1 and cfg.grad_accum % world:
        log(f"note: grad_accum {cfg.grad_accum} is not a multiple of {world} ranks; some idle")
    return Runtime(device, world, models.resolve_precision(cfg.precision, device))


def load_base_model(cfg: TrainConfig, rt: Runtime) -> tuple[nn.Module, Any, str, Any]:
    """The base model, its tokenizer and name, and the loader of its decoder blocks (None when
    the model is loaded whole, not yet on the device). A quantized run leaves the blocks to be
    loaded one at a time while patching, each quantized before the next is read (the load peak
    is the quantized model plus one block); the band "auto" first probes the full-precision
    model, so it loads it whole."""
    if cfg.midblock.quantize == "none" or cfg.midblock.band == "auto":
        return (*models.load_model(cfg.model, dtype=rt.dtype), None)
    model, tokenizer, name, load_block = models.load_model_blockwise(cfg.model, rt.dtype, rt.device)
    if load_block.note is not None:
        log(f"note: {load_block.note}")
    return model, tokenizer, name, load_block


def resolve_batch(
    cfg: TrainConfig, rt: Runtime, model: nn.Module, adapter_cfg: MidBlockConfig, resumed: Any
) -> tuple[TrainConfig, BatchChoice | None]:
    """``cfg`` with ``batch_tokens: auto`` made a number (and the choice, when the device's
    memory decided it): the checkpoint's sizes on --resume, ``CPU_BATCH_TOKENS`` on CPU, and on
    CUDA the largest micro-batch that fits the free memory (``fastmid.recipe.estimate``), with
    ``grad_accum`` set so an optimizer step still holds ``CPU_BATCH_TOKENS x grad_accum``
    tokens, as the same flags give on a CPU."""
    if cfg.batch_tokens != AUTO_BATCH:
        return cfg, None
    if resumed is not None:
        sizes = {k: resumed["config"][k] for k in ("batch_tokens", "grad_accum")}
        return replace(cfg, **sizes), None
    if not rt.cuda:
        return replace(cfg, batch_tokens=max(CPU_BATCH_TOKENS, cfg.max_length)), None
    from fastmid.recipe.estimate import choose_batch_tokens

    # Blocks the caching allocator holds but does not use are free for the run too. Every rank
    # must pack the same batches: all take the tightest rank's figure.
    free, _ = torch.cuda.mem_get_info(rt.device)
    free += torch.cuda.memory_reserved(rt.device) - torch.cuda.memory_allocated(rt.device)
    free = distributed.min_over_ranks(free)
    log("batch auto: estimating the memory of a training step ...")
    step_tokens = CPU_BATCH_TOKENS * cfg.grad_accum
    choice = choose_batch_tokens(model.config, adapter_cfg, free, step_tokens, cfg.max_length)
    return replace(cfg, batch_tokens=choice.batch_tokens, grad_accum=choice.grad_accum), choice


@contextlib.contextmanager
def out_of_memory_as_user_error(cfg: TrainConfig, choice: BatchChoice | None) -> Iterator[None]:
    """A device out-of-memory error while training becomes one line naming the micro-batch
    and what to lower (the checkpoint of the last save stays resumable)."""
    try:
        yield
    except torch.OutOfMemoryError:
        how = "chosen by --batch-tokens auto" if choice else "--batch-tokens"
        raise UserError(
            f"out of device memory training micro-batches of {cfg.batch_tokens} tokens ({how}); "
            f"lower --batch-tokens (e.g. {max(cfg.batch_tokens // 2, cfg.max_length)}) and "
            "raise --grad-accum to keep the step, or lower --max-length"
        ) from None


def describe_run(
    rt: Runtime,
    model_name: str,
    parallel: str,
    state: Any,
    params: list[nn.Parameter],
    plan: StepPlan,
    examples: list[Example],
    band_reason: str | None,
) -> dict[str, Any]:
    """What the run resolved its automatic choices to (summary.json and config.yaml)."""
    resolved = {
        "model_name": model_name,
        "device": str(rt.device),
        "precision": rt.precision,
        "parallel": parallel,
        "world_size": rt.world,
        "layers": list(state.layers),
        "num_layers": state.num_layers,
        "rank": state.rank,
        "scale": float(state.scale),
        "adapter_parameters": sum(p.numel() for p in params),
        "total_steps": plan.total_steps,
        "warmup_steps": plan.warmup_steps,
        "micro_batches_per_epoch": plan.micro_per_epoch,
        "train_examples": len(examples),
    }
    if band_reason is not None:
        resolved["band_reason"] = band_reason
    if state.rank_note is not None:
        resolved["rank_note"] = state.rank_note
    return resolved


def format_header(resolved: dict[str, Any]) -> str:
    """The opening line of a run: model, band, rank, adapter size, precision, data, length
    (after a line saying so when the budget's rank was clamped to a layer's width)."""
    r = resolved
    note = f"note: {r['rank_note']}\n" if "rank_note" in r else ""
    batch = ""
    if "batch_fits_tokens" in r:
        batch = (
            f"\nbatch auto: {r['batch_tokens']:,} tokens per micro-batch x {r['grad_accum']} "
            f"(up to {r['batch_fits_tokens']:,} fit in {r['batch_free_gib']:.1f} GiB free)"
        )
    return (
        note + f"fastmid train: {r['model_name']} | layers {r['layers'][0]}-{r['layers'][-1]} of "
        f"{r['num_layers']} | rank {r['rank']} | {r['adapter_parameters']:,} adapter params | "
        f"{r['precision']} | {r['train_examples']} examples, {r['micro_batches_per_epoch']} "
        f"micro-batches/epoch | {r['total_steps']} steps" + batch
    )


def log(message: str) -> None:
    """Print on rank 0 only (every rank runs the same recipe)."""
    if distributed.is_main():
        print(message, flush=True)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (model loading and adapter init draw from them)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_output_dir(cfg: TrainConfig) -> Path:
    """Refuse to mix runs: a non-empty dir needs --overwrite, --resume needs a checkpoint."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output dir {out} exists and is not a directory")
    if cfg.resume:
        if find_checkpoint(out / CHECKPOINT_DIR) is None:
            raise UserError(f"--resume: no checkpoint in {out} (nothing to resume)")
        return out
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
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
    # batch_tokens auto takes the checkpoint's sizes (resolve_batch), whatever it chose then.
    chosen = ("batch_tokens", "grad_accum") if cfg.batch_tokens == AUTO_BATCH else ()
    for key, value in saved.items():
        if may_change_on_resume(key) or key not in now or key in chosen:
            continue
        if now[key] != value:
            raise UserError(
                f"--resume: {key} is {now[key]!r} but the checkpoint was trained with {value!r}"
            )


@dataclass
class EvalSet:
    """What evaluation runs on: accuracy records and held-out perplexity texts."""

    records: list[dict] | None
    heldout: list[str] | None

    def describe(self) -> str:
        parts = [f"{len(self.records)} records"] if self.records else []
        parts += [f"{len(self.heldout)} held-out texts"] if self.heldout else []
        return " and ".join(parts)


def load_eval_set(cfg: TrainConfig) -> EvalSet | None:
    """Accuracy records (bundled test split unless given) and held-out perplexity texts; None
    when there is nothing to evaluate."""
    from fastmid.recipe import data
    from fastmid.recipe import evaluate as ev

    if not cfg.eval:
        return None
    eval_path = cfg.eval_data
    if eval_path is None and cfg.data is None:
        eval_path = str(data.bundled_path("test"))
    records = data.load_records(eval_path, cfg.fields) if eval_path is not None else None
    heldout = ev.heldout_texts()
    if cfg.eval_limit is not None:
        records = records[: cfg.eval_limit] if records is not None else None
        heldout = heldout[: cfg.eval_limit]
    return EvalSet(records, heldout) if records or heldout else None


def split_heldout(cfg: TrainConfig, records: Any) -> tuple[Any, Any]:
    """(training records, held-out loss records): the eval_split_ratio share of ``records``
    held out, else (with eval_every) the eval data; None when no held-out loss is asked for."""
    if cfg.eval_split_ratio > 0:
        return data.split_records(records, cfg.eval_split_ratio, cfg.seed)
    if not cfg.eval_every:
        return records, None
    eval_path = cfg.eval_data
    if eval_path is None and cfg.data is None:
        eval_path = str(data.bundled_path("test"))
    if eval_path is None:
        raise UserError("--eval-every needs held-out records: --eval-split-ratio or --eval-data")
    return records, data.load_records(eval_path, cfg.fields)


@dataclass
class HeldoutLoss:
    """The held-out answer loss, every ``every`` steps and at the last one."""

    examples: list[Example]
    pad_id: int
    every: int

    @classmethod
    def build(cls, cfg: TrainConfig, records: Any, tokenizer: Any) -> HeldoutLoss | None:
        if records is None:
            return None
        examples = data.tokenize_records(
            records, tokenizer, fmt=cfg.format, max_length=cfg.max_length, loss_on="response"
        )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return cls(examples, pad, cfg.eval_every)

    def due(self, step: int, total_steps: int) -> bool:
        return step == total_steps or (self.every > 0 and step % self.every == 0)

    def __call__(
        self, model: nn.Module, autocast: Callable[[], contextlib.AbstractContextManager]
    ) -> float:
        from fastmid.recipe.heldout import answer_nll

        with autocast():
            return answer_nll(model, self.examples, self.pad_id)


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    eval_set: EvalSet | None,
    cfg: TrainConfig,
    autocast: Callable[[], contextlib.AbstractContextManager],
    tuned: bool = False,
) -> tuple[dict[str, float], list[dict]]:
    """Accuracy and held-out perplexity of ``model`` on ``eval_set``, and its predictions."""
    from fastmid.recipe import evaluate as ev

    if eval_set is None:
        return {}, []
    log(f"evaluating the {'tuned' if tuned else 'base'} model on {eval_set.describe()} ...")
    result: dict[str, float] = {}
    predictions: list[dict] = []
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast():
        if eval_set.records:
            acc, predictions = ev.gsm_accuracy(
                model,
                tokenizer,
                eval_set.records,
                batch_size=cfg.eval_batch_size,
                max_new_tokens=cfg.max_new_tokens,
            )
            result["accuracy"] = float(acc)
        if eval_set.heldout:
            ppl = ev.perplexity(model, tokenizer, eval_set.heldout, max_length=cfg.max_length)
            result["heldout_ppl"] = float(ppl)
    model.train(was_training)
    if not tuned:
        log("before: " + _format_eval(result))
    return result, predictions


def choose_band(
    cfg: MidBlockConfig,
    lr: float,
    max_quality_gap: float,
    model: nn.Module,
    tokenizer: Any,
    examples: list[Example],
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> tuple[MidBlockConfig, str | None]:
    """``cfg`` as given, or with the band "auto" picks on the untuned model (short probe runs of
    candidate windows with this run's adapters and learning rate ``lr``; all layers when the best
    window gives up more than ``max_quality_gap`` of the all-layer gain), and its reason."""
    if cfg.band != "auto":
        return cfg, None
    from fastmid.recipe.bandgain import WINDOW_STEPS, choose_auto_band

    log(f"choosing the band: candidate windows, each tuned for {WINDOW_STEPS} steps ...")
    with autocast():
        layers, info = choose_auto_band(
            model, tokenizer, examples, adapter=cfg, lr=lr, max_quality_gap=max_quality_gap
        )
    reason = str(info.get("reason", ""))
    if "tradeoff_line" in info:
        log(info["tradeoff_line"])
    log(f"band auto → layers {layers[0]}-{layers[-1]}: {reason}")
    return dataclasses.replace(cfg, band=list(layers)), reason


def make_equalizer(model: nn.Module) -> Any:
    """The per-layer update equalizer (``--equalize-updates``)."""
    from fastmid.engine.equalize import UpdateEqualizer

    return UpdateEqualizer(model)


# --------------------------------------------------------------------------------------------
# Step plan and schedule (pure)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepPlan:
    """How long the run is: optimizer steps, micro-batches, warmup."""

    micro_per_epoch: int
    grad_accum: int
    total_steps: int
    total_micro: int
    warmup_steps: int

    def micro_ids(self, step: int) -> range:
        """Global micro-batch numbers of optimizer step ``step`` (the last step may be short)."""
        first = step * self.grad_accum
        return range(first, min(first + self.grad_accum, self.total_micro))


def plan_steps(micro_per_epoch: int, cfg: TrainConfig) -> StepPlan:
    """The run's length from the data size and the config: ``max_steps`` steps of
    ``grad_accum`` micro-batches, else every micro-batch of ``epochs`` epochs."""
    if cfg.max_steps is not None:
        total_steps = cfg.max_steps
        total_micro = total_steps * cfg.grad_accum
    else:
        total_micro = micro_per_epoch * (cfg.epochs or 1)
        total_steps = math.ceil(total_micro / cfg.grad_accum)
    warmup = cfg.warmup_steps
    if warmup is None:
        warmup = math.ceil(cfg.warmup_ratio * total_steps)
    return StepPlan(micro_per_epoch, cfg.grad_accum, total_steps, total_micro, warmup)


def lr_lambda(total_steps: int, warmup_steps: int, schedule: str) -> Callable[[int], float]:
    """Multiplier of the peak lr at each step: linear warmup, then linear/cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return factor


def make_scheduler(
    optimizer: torch.optim.Optimizer, plan: StepPlan, schedule: str
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup then ``schedule`` decay over the planned steps (see :func:`lr_lambda`)."""
    factor = lr_lambda(plan.total_steps, plan.warmup_steps, schedule)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class EpochBatches:
    """Packed micro-batches (example indices) per epoch. Each epoch's order is a pure function
    of (seed, epoch), so a resumed run rebuilds exactly the batches it would have had."""

    def __init__(self, examples: list[Example], batch_tokens: int, seed: int) -> None:
        self._examples = examples
        self._batch_tokens = batch_tokens
        self._seed = seed
        self._cached: tuple[int, list[list[int]]] | None = None

    def epoch(self, epoch: int) -> list[list[int]]:
        from fastmid.recipe.data import pack_batches

        if self._cached is None or self._cached[0] != epoch:
            bins = pack_batches(self._examples, self._batch_tokens, self._seed, epoch=epoch)
            self._cached = (epoch, bins)
        return self._cached[1]

    def for_step(self, plan: StepPlan, step: int) -> list[list[int]]:
        """The micro-batches of optimizer step ``step``, in order."""
        per = plan.micro_per_epoch
        return [self.epoch(g // per)[g % per] for g in plan.micro_ids(step)]


# --------------------------------------------------------------------------------------------
# One optimizer step
# --------------------------------------------------------------------------------------------


@dataclass
class StepResult:
    """What one optimizer step computed: each micro-batch's summed loss (this rank's), the
    label tokens of the whole step (all ranks), this rank's tokens and the lr it used."""

    losses: list[torch.Tensor]
    labels: int
    tokens: int
    lr: float
    # The global gradient norm before clipping (None when clipping is off).
    grad_norm: torch.Tensor | None = None


def micro_batch_seed(run_seed: int, step: int, index: int) -> int:
    """The RNG seed of micro-batch ``index`` of optimizer step ``step``: a pure function of the
    three, so whichever rank computes a micro-batch draws the same dropout masks for it."""
    words = [run_seed & (2**64 - 1), step, index]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> 1)


def train_step(
    dp: distributed.ParallelStep,
    step_batches: list[list[Example]],
    update: Callable[[], tuple[float, torch.Tensor | None]],
    rt: Runtime,
    seed_and_step: tuple[int, int],
) -> StepResult:
    """Forward and backward over this rank's micro-batches of one step, then ``update()``
    (clip, optimizer, schedule; returns the lr used and the gradient norm). The loss is
    normalised by every label token of the step, so accumulation (and any number of ranks)
    equals one big batch.

    Before each micro-batch torch's RNG is seeded from (run seed, step, the micro-batch's
    number in the step), which the kernels draw their dropout seeds from: N ranks take exactly
    the steps one process takes, dropout included.
    """
    from fastmid.recipe.data import batch_to, collate_packed

    labels = sum(e.num_loss_tokens for batch in step_batches for e in batch)
    losses: list[torch.Tensor] = []
    tokens = 0
    for (index, batch_examples), grad_sync in dp.micro_batches(list(enumerate(step_batches))):
        torch.manual_seed(micro_batch_seed(*seed_and_step, index))
        batch = batch_to(collate_packed(batch_examples), rt.device)
        with grad_sync:
            with rt.autocast():
                loss_sum, _ = dp.forward_loss(batch)
            (loss_sum / labels).backward()
        losses.append(loss_sum.detach())
        tokens += batch["input_ids"].numel()
    dp.reduce_gradients()
    lr, grad_norm = update()
    return StepResult(losses, labels, tokens, lr, grad_norm)


def optimizer_update(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    max_grad_norm: float,
    equalizer: Any,
) -> Callable[[], tuple[float, torch.Tensor | None]]:
    """The update after the gradients: clip, (equalize), AdamW, schedule; returns the lr and
    the gradient norm before clipping (None without clipping)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def update() -> tuple[float, torch.Tensor | None]:
        grad_norm = None
        if max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        if equalizer is not None:
            equalizer.before_step()
        optimizer.step()
        if equalizer is not None:
            equalizer.after_step()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return lr, grad_norm

    return update


# --------------------------------------------------------------------------------------------
# Progress, metrics, checkpoints
# --------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Where the run is; all of it goes into a checkpoint."""

    step: int = 0
    totals: dict[str, float] = field(
        default_factory=lambda: {"tokens": 0, "label_tokens": 0, "train_seconds": 0.0}
    )
    loss_first: float | None = None
    loss_last: float | None = None
    eval_before: dict[str, float] = field(default_factory=dict)

    def summary(self, plan: StepPlan, resolved: dict[str, Any], interrupted: bool) -> dict:
        """The run's summary so far (summary.json adds the evaluation after training)."""
        return {
            "interrupted": interrupted,
            "steps": self.step,
            "total_steps": plan.total_steps,
            "loss_first": self.loss_first,
            "loss_last": self.loss_last,
            "tokens_per_s": self.totals["tokens"] / max(self.totals["train_seconds"], 1e-9),
            "train_seconds": self.totals["train_seconds"],
            # torch.compile (--compile) is lazy: its time is inside the first steps' time.
            "compile_seconds": compile_seconds(),
            "eval_before": self.eval_before,
            "resolved": resolved,
        }


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_rss_bytes() / 2**30


class Stopwatch:
    """Seconds since it was made, when called."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start


class MetricsWindow:
    """Sums since the last log line; each flush writes one metrics.jsonl record and shows it:
    one line per flush, or (stdout a terminal) a progress bar with ETA that carries it."""

    def __init__(
        self,
        device: torch.device,
        out: Path,
        progress: Progress,
        plan: StepPlan,
        cfg: TrainConfig,
        resolved: dict[str, Any],
        heldout: HeldoutLoss | None,
    ) -> None:
        self.device = device
        self.path = out / "metrics.jsonl"
        self.total_steps = total_steps = plan.total_steps
        self.log_every = cfg.log_every
        self.heldout = heldout
        # Only rank 0 reports to a tracker, as it alone writes metrics.jsonl.
        self.tracker = tracking.make_tracker(
            cfg.report_to if distributed.is_main() else "none",
            out,
            resumed_at=progress.step if cfg.resume else None,
        )
        self.tracker.open({**cfg.to_dict(), "resolved": resolved})
        first_step = progress.step
        self.loss = torch.zeros((), device=device)
        self.labels = 0
        self.tokens = 0
        self.bar = None
        if distributed.is_main() and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps, initial=first_step, unit="step", file=sys.stdout, leave=True
            )
        self.restart_clock()

    def __enter__(self) -> MetricsWindow:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
        self.tracker.close()

    def step_done(
        self,
        progress: Progress,
        result: StepResult,
        heldout_loss: Callable[[], float] | None,
        force: bool,
    ) -> None:
        """Flush at log steps, held-out-loss steps, the last step, or when ``force``d: a
        checkpoint follows, and flushing before it makes a resumed run log exactly the lines an
        uninterrupted one does. The flushed record also goes to the tracker."""
        step = progress.step
        evaluating = self.heldout is not None and self.heldout.due(step, self.total_steps)
        if force or evaluating or step % self.log_every == 0 or step == self.total_steps:
            extra = {"eval_loss": heldout_loss()} if evaluating and heldout_loss else {}
            record = self.flush(progress, result.lr, result.grad_norm, extra)
            self.tracker.log(step, tracking.namespaced(record))

    def restart_clock(self) -> None:
        self.start = time.perf_counter()

    def add(self, result: StepResult) -> None:
        for loss in result.losses:
            self.loss += loss
        self.labels += result.labels
        self.tokens += result.tokens
        if self.bar is not None:
            self.bar.update(1)

    def flush(
        self,
        progress: Progress,
        lr: float,
        grad_norm: torch.Tensor | None = None,
        extra: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        """Close the window at ``progress.step``: sum over ranks, update ``progress``, log
        (with the last step's gradient norm and ``extra`` numbers such as the eval loss)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - self.start
        # Each rank summed its own micro-batches; self.labels is already global.
        loss_sum, all_tokens = distributed.all_reduce_sum(self.loss, self.tokens)
        tokens = int(all_tokens)
        loss = loss_sum / max(1, self.labels)
        totals = progress.totals
        totals["tokens"] += tokens
        totals["label_tokens"] += self.labels
        totals["train_seconds"] += seconds
        progress.loss_first = loss if progress.loss_first is None else progress.loss_first
        progress.loss_last = loss
        record = {
            "step": progress.step,
            "loss": loss,
            "lr": lr,
            "tokens_per_s": tokens / max(seconds, 1e-9),
            "tokens": totals["tokens"],
            "mem_gb": _memory_gb(self.device),
            "elapsed_s": totals["train_seconds"],
        }
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        record.update(extra or {})
        if distributed.is_main():
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        line = (
            f"loss {loss:.4f} | lr {lr:.2e} | tok/s {record['tokens_per_s']:,.0f} | "
            f"mem {record['mem_gb']:.2f} GB"
        )
        if self.bar is not None:
            self.bar.set_postfix_str(line, refresh=True)
        else:
            log(f"step {progress.step}/{self.total_steps} | {line}")
        self.loss.zero_()
        self.labels = self.tokens = 0
        self.restart_clock()
        return record


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
    if distributed.is_main():
        _truncate_metrics(out / "metrics.jsonl", progress.step)
    log(f"resumed from {out / CHECKPOINT_DIR} at step {progress.step}/{plan.total_steps}")
    return progress


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


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines logged after the checkpoint we resume from (they will be redone)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in kept))


class StopFlag:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop after the current step.

    A second SIGINT while stopping raises KeyboardInterrupt as usual.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log(f"{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping")

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopFlag]:
        # Signal handlers can only be set from the main thread (tests may run elsewhere).
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)


# --------------------------------------------------------------------------------------------
# The finished run
# --------------------------------------------------------------------------------------------


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


def save_curve(metrics_path: Path, png_path: Path) -> None:
    """Plot loss and learning rate per logged step (metrics.jsonl) into a PNG, atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines()]
    steps = [r["step"] for r in records]
    fig, loss_ax = plt.subplots(figsize=(7, 4))
    loss_ax.plot(steps, [r["loss"] for r in records], marker=".", color="tab:blue")
    loss_ax.set_xlabel("optimizer step")
    loss_ax.set_ylabel("training loss", color="tab:blue")
    lr_ax = loss_ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in records], color="tab:orange")
    lr_ax.set_ylabel("learning rate", color="tab:orange")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    write_bytes_atomic(png_path, buffer.getvalue())


def _save_adapter_atomic(model: nn.Module, adapter_dir: Path, model_name: str) -> None:
    from fastmid.engine.adapters import save_adapter

    tmp = Path(tempfile.mkdtemp(dir=adapter_dir.parent, prefix=".adapter.tmp-"))
    try:
        save_adapter(model, tmp, base_model_name_or_path=model_name)
        if adapter_dir.exists():
            shutil.rmtree(adapter_dir)
        os.replace(tmp, adapter_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _format_eval(result: dict[str, float]) -> str:
    parts = []
    if "accuracy" in result:
        parts.append(f"accuracy {result['accuracy']:.3f}")
    if "heldout_ppl" in result:
        parts.append(f"held-out ppl {result['heldout_ppl']:.2f}")
    return ", ".join(parts) or "(no eval)"


def format_summary(summary: dict[str, Any]) -> str:
    """The closing lines of a run: loss, accuracy, speed, wall time and where the adapter is."""

    def arrow(key: str, fmt: str) -> str | None:
        before = summary.get("eval_before", {}).get(key)
        after = summary.get("eval_after", {}).get(key)
        if before is None or after is None:
            return None
        return f"{before:{fmt}} → {after:{fmt}}"

    lines = ["", "summary"]
    if summary.get("loss_first") is not None:
        lines.append(f"  loss        {summary['loss_first']:.4f} → {summary['loss_last']:.4f}")
    acc = arrow("accuracy", ".3f")
    if acc:
        lines.append(f"  accuracy    {acc}")
    ppl = arrow("heldout_ppl", ".2f")
    if ppl:
        # Perplexity on general text the run never saw: its rise is what tuning cost the
        # model elsewhere (forgetting), the price paid for the gain above.
        before, after = summary["eval_before"]["heldout_ppl"], summary["eval_after"]["heldout_ppl"]
        lines.append(f"  forgetting  held-out perplexity {ppl} ({after / before - 1:+.1%})")
    lines.append(f"  throughput  {summary['tokens_per_s']:,.0f} tok/s")
    if summary.get("compile_seconds"):
        lines.append(f"  compile     {summary['compile_seconds']:.0f} s (in the first steps)")
    lines.append(f"  wall time   {summary.get('wall_seconds', 0.0):.0f} s")
    lines.append(f"  adapter     {summary.get('adapter')}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fastmid train``: one per config field (see :mod:`fastmid.recipe.config`)."""
    from fastmid.recipe.config import add_arguments as add_config_arguments

    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """``fastmid train``: build the config from --config and flags, train, print the summary."""
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "command")}
    cfg = build_config(args.config, overrides)
    if cfg.nproc > 1 and not distributed.under_torchrun():
        # Run this command again as nproc torchrun workers, each given the resolved config.
        return distributed.launch(cfg.nproc, ["train"], config={**cfg.to_dict(), "nproc": 1})
    summary = train(cfg)
    # 130 = the conventional exit status of a run stopped by SIGINT; the checkpoint is saved.
    code = INTERRUPTED_EXIT if summary["interrupted"] else 0
    if summary["interrupted"]:
        # Tell --nproc's launcher now, not only at exit: torchrun ends its workers a grace
        # period after passing the signal on, which can fall inside the teardown below.
        record_exit(code)
    distributed.shutdown()
    return code
