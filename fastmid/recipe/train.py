"""The training recipe and the ``fastmid train`` command.

:func:`train` reads top to bottom as named steps: check the output dir → load data → load the
model → choose the band → patch it (:func:`fastmid.engine.models.prepare_model`) → evaluate the
base model → AdamW over the adapter parameters only and a schedule sized by the step plan
(:mod:`fastmid.recipe.batches`) → the loop of :func:`train_step` over packed token-budget
batches, logged through a metrics window (:mod:`fastmid.recipe.metrics`) and checkpointed on a
:class:`~fastmid.recipe.checkpoint.CheckpointSchedule` → evaluate again
(:mod:`fastmid.recipe.evaluate`) → save the adapter (PEFT format), the resolved config and a
summary. This module keeps the recipe and the steps only it takes. Checkpoints make
``--resume`` continue exactly where the run stopped: written atomically every
``save_every_minutes`` (10 by default), every ``save_every`` steps, and on SIGINT/SIGTERM.
The output directory (its layout, resume, the finished run's files) is
:mod:`fastmid.recipe.output_dir`'s.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import random
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastmid.engine import models
from fastmid.engine.loss import forward_loss
from fastmid.engine.midblock import MidBlockConfig, adapter_parameters, format_band
from fastmid.errors import INTERRUPTED_EXIT, UserError, record_exit
from fastmid.outdir import hold_output_dir
from fastmid.recipe import data, distributed, tracking
from fastmid.recipe.batches import (
    EpochBatches,
    StepPlan,
    make_scheduler,
    micro_batch_seed,
    plan_steps,
)
from fastmid.recipe.checkpoint import (
    CheckpointSchedule,
)
from fastmid.recipe.config import (
    AUTO_BATCH,
    CPU_BATCH_TOKENS,
    TrainConfig,
    build_config,
    quantized_fsdp_error,
)
from fastmid.recipe.data import Example
from fastmid.recipe.distributed import log
from fastmid.recipe.estimate import BatchChoice
from fastmid.recipe.evaluate import HeldoutLoss, evaluate_model, load_eval_set, split_heldout
from fastmid.recipe.metrics import (
    MetricsWindow,
    StepResult,
    Stopwatch,
)
from fastmid.recipe.output_dir import (
    check_output_dir,
    finish_outputs,
    read_resume_point,
    save_progress,
    start_or_resume,
)

# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------


def one_run_per_output_dir(
    run: Callable[[TrainConfig], dict[str, Any]],
) -> Callable[[TrainConfig], dict[str, Any]]:
    """Hold the output dir's lock around ``run(cfg)``: a second run there refuses at once.
    Rank 0 holds it for all ranks of one run (they start before the process group exists,
    hence torchrun's RANK)."""

    @functools.wraps(run)
    def locked(cfg: TrainConfig) -> dict[str, Any]:
        rank0 = int(os.environ.get("RANK", "0")) == 0
        with hold_output_dir(cfg.validate().output_dir, enabled=rank0):
            return run(cfg)

    return locked


@one_run_per_output_dir
def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run one training job described by ``cfg``; returns the summary (also summary.json).

    On SIGINT/SIGTERM the loop checkpoints and returns early with ``summary["interrupted"]``
    set; ``--resume`` then continues with the same losses an uninterrupted run would have.
    """
    wall = Stopwatch()
    recipe = cfg.validate().recipe()
    cfg = cfg.resolved()
    out = check_output_dir(cfg)
    resumed = read_resume_point(cfg, out)
    rt = init_runtime(cfg)
    # Data first: a bad file should fail in a second, not after loading a model.
    # A file read without error before is only hashed: its tokens come from the cache, unparsed.
    token_cache = models.cache_root() / "tokenized"
    source = cfg.data or str(data.bundled_path("train"))
    records = data.load_records(source, cfg.fields, cache_dir=token_cache)
    records, loss_records = split_heldout(cfg, records)
    eval_set = load_eval_set(cfg)
    seed_everything(cfg.seed)
    model, tokenizer, model_name, parallel, weight_files, load_block = load_base_model(cfg, rt)
    # Under FSDP only each rank's shard goes to the device; a block loader puts each block there.
    if parallel != "fsdp" and load_block is None:
        model.to(rt.device)
    examples = data.tokenize_records(
        records,
        tokenizer,
        fmt=cfg.format,
        max_length=cfg.max_length,
        loss_on=cfg.loss_on,
        cache_dir=token_cache,
    )
    heldout = HeldoutLoss.build(cfg, loss_records, tokenizer, token_cache)
    adapter_cfg, band_reason = choose_band(
        cfg.midblock, cfg.lr, cfg.max_quality_gap, model, tokenizer, examples, rt.autocast
    )
    # FSDP shards each linear's own weight; fused groups read a concatenated copy.
    fuse = adapter_cfg.fuse_groups and parallel != "fsdp"
    adapter_cfg = dataclasses.replace(adapter_cfg, fuse_groups=fuse)
    torch.manual_seed(cfg.seed)
    state = models.prepare_model(model, adapter_cfg, rt.device, load_block)
    # One process: a pass-through. Several: DDP or FSDP, this rank's micro-batches, grad sums.
    dp = distributed.ParallelStep(model, parallel, forward_loss, rt.device, weight_files)
    requested, (cfg, batch_choice) = cfg, resolve_batch(cfg, rt, model, adapter_cfg, resumed)
    # Freshly patched adapters have lora_B = 0, so this is exactly the base model's output;
    # patching first makes a bad band/rank/target fail before minutes of generation.
    eval_before = resumed["eval_before"] if resumed else None
    if eval_before is None:
        eval_before, _ = evaluate_model(model, tokenizer, eval_set, cfg, rt.autocast)
    params = adapter_parameters(model)
    optimizer = torch.optim.AdamW(params, cfg.lr, weight_decay=cfg.weight_decay, fused=rt.cuda)
    batches = EpochBatches(examples, cfg.batch_tokens, cfg.seed)
    plan = plan_steps(len(batches.epoch(0)), cfg)
    scheduler = make_scheduler(optimizer, plan, cfg.schedule)
    equalizer = make_equalizer(model) if cfg.equalize_updates else None
    resolved = describe_run(rt, model_name, parallel, state, params, plan, examples, band_reason)
    resolved.update(batch_tokens=cfg.batch_tokens, grad_accum=cfg.grad_accum)
    resolved.update(lr=cfg.lr, schedule=cfg.schedule, recipe=recipe)
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
        eval_after, predictions = evaluate_model(
            model, tokenizer, eval_set, cfg, rt.autocast, tuned=True
        )
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
    if world > 1 and quantize != "none" and cfg.parallel == "fsdp":
        raise UserError(quantized_fsdp_error(quantize))
    distributed.barrier()
    if world > 1 and cfg.grad_accum % world:
        log(f"note: grad_accum {cfg.grad_accum} is not a multiple of {world} ranks; some idle")
    return Runtime(device, world, models.resolve_precision(cfg.precision, device))


def load_base_model(
    cfg: TrainConfig, rt: Runtime
) -> tuple[nn.Module, Any, str, str, list[Path], Any]:
    """``(model, tokenizer, name, parallel mode, weight files, block loader)``.

    Under FSDP from a local safetensors directory the model is built on the meta device and
    ``weight_files`` are returned: each rank later reads only its own shards, so no rank holds
    a whole copy. A quantized run (one process, or DDP: each rank quantizes its own copy) leaves
    the decoder blocks to the block loader: each is loaded while patching and quantized before
    the next is read, so the load peak is the quantized model plus one block. Otherwise (DDP
    without quantization, a GGUF or hub model, or a band "auto" picks by training the
    full-precision model) the weights are loaded here, not yet on the device,
    ``weight_files`` is empty and the loader None.
    """
    band_auto = cfg.midblock.band == "auto"
    quantized = cfg.midblock.quantize != "none"
    if rt.world > 1 and not band_auto and not quantized:
        empty = models.load_empty_model(cfg.model, dtype=rt.dtype)
        if empty is not None:
            model, tokenizer, name, files = empty
            parallel = distributed.resolve_parallel(cfg.parallel, model, rt.device, rt.world)
            if parallel == "fsdp":
                return model, tokenizer, name, parallel, files, None
    # Each DDP rank quantizes its own copy; FSDP cannot shard quantized weights.
    mode = "ddp" if quantized and cfg.parallel == "auto" else cfg.parallel
    if quantized and not band_auto:
        model, tokenizer, name, load_block = models.load_model_blockwise(
            cfg.model, rt.dtype, rt.device
        )
        if load_block.note is not None:
            log(f"note: {load_block.note}")
        parallel = distributed.resolve_parallel(mode, model, rt.device, rt.world)
        return model, tokenizer, name, parallel, [], load_block
    model, tokenizer, name = models.load_model(cfg.model, dtype=rt.dtype)
    parallel = distributed.resolve_parallel(mode, model, rt.device, rt.world)
    return model, tokenizer, name, parallel, [], None


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
    """The opening lines of a run: model, band, rank, adapter size, precision, data, length,
    then the lr, its schedule and which recipe chose them (after a line saying so when the
    budget's rank was clamped to a layer's width)."""
    r = resolved
    note = f"note: {r['rank_note']}\n" if "rank_note" in r else ""
    batch = ""
    if "batch_fits_tokens" in r:
        batch = (
            f"\nbatch auto: {r['batch_tokens']:,} tokens per micro-batch x {r['grad_accum']} "
            f"(up to {r['batch_fits_tokens']:,} fit in {r['batch_free_gib']:.1f} GiB free)"
        )
    steps = r["total_steps"]
    return (
        note + f"fastmid train: {r['model_name']} | layers {r['layers'][0]}-{r['layers'][-1]} of "
        f"{r['num_layers']} | rank {r['rank']} | {r['adapter_parameters']:,} adapter params | "
        f"{r['precision']} | {r['train_examples']} examples, {r['micro_batches_per_epoch']} "
        f"micro-batches/epoch | {steps} step{'' if steps == 1 else 's'}\n"
        f"lr {r['lr']:g}, {r['warmup_steps']} warmup step{'' if r['warmup_steps'] == 1 else 's'}"
        f" then {r['schedule']} | recipe: {r['recipe']}" + batch
    )


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (model loading and adapter init draw from them)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
# One optimizer step
# --------------------------------------------------------------------------------------------


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
# Stopping on a signal
# --------------------------------------------------------------------------------------------


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


def format_summary(summary: dict[str, Any]) -> str:
    """The closing lines of a run: loss, accuracy, speed, wall time and where the adapter is."""

    def arrow(key: str, fmt: str) -> str | None:
        before = summary.get("eval_before", {}).get(key)
        after = summary.get("eval_after", {}).get(key)
        if before is None or after is None:
            return None
        return f"{before:{fmt}} → {after:{fmt}}"

    rows: list[tuple[str, str]] = []
    if summary.get("loss_first") is not None:
        rows.append(("loss", f"{summary['loss_first']:.4f} → {summary['loss_last']:.4f}"))
    held = summary.get("eval_losses") or []
    if held:
        steps = f"step {held[0][0]}" if len(held) == 1 else f"steps {held[0][0]}-{held[-1][0]}"
        rows.append(("held-out loss", f"{held[0][1]:.4f} → {held[-1][1]:.4f} ({steps})"))
    acc = arrow("accuracy", ".3f")
    if acc:
        rows.append(("accuracy", acc))
    ppl = arrow("heldout_ppl", ".2f")
    if ppl:
        # Perplexity on general text the run never saw: its rise is what tuning cost the
        # model elsewhere (forgetting), the price paid for the gain above.
        before, after = summary["eval_before"]["heldout_ppl"], summary["eval_after"]["heldout_ppl"]
        rows.append(("forgetting", f"held-out perplexity {ppl} ({after / before - 1:+.1%})"))
    rows.append(("throughput", f"{summary['tokens_per_s']:,.0f} tok/s"))
    if summary.get("compile_seconds"):
        rows.append(("compile", f"{summary['compile_seconds']:.0f} s (in the first steps)"))
    rows.append(("wall time", f"{summary.get('wall_seconds', 0.0):.0f} s"))
    rows.append(("adapter", str(summary.get("adapter"))))
    width = max(len(label) for label, _ in rows)
    lines = ["", "summary", *(f"  {label:<{width}}  {value}" for label, value in rows)]
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
