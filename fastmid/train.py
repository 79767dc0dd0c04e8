"""The training loop and the ``fastmid train`` command.

Reads top to bottom: build the config → load data and model → evaluate the base model →
patch the mid-block band → AdamW over the adapter parameters only → loop over packed
token-budget batches → evaluate again → save the adapter (PEFT format), the resolved config and
a summary. Checkpoints (every ``save_every`` steps and on SIGINT/SIGTERM) make ``--resume``
continue exactly where the run stopped.

Output directory layout::

    <output-dir>/adapter/         PEFT adapter (adapter_config.json + adapter_model.safetensors)
    <output-dir>/config.yaml      resolved config (feed it back with --config)
    <output-dir>/metrics.jsonl    one JSON object per logged step
    <output-dir>/summary.json     loss first → last, accuracy before → after, tok/s, wall time
    <output-dir>/predictions.jsonl  eval generations of the tuned model
    <output-dir>/checkpoint/      only while a run is unfinished (interrupted or in progress)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import resource
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastmid import distributed
from fastmid.checkpoint import CHECKPOINT_DIR, find_checkpoint, load_checkpoint, read_extra
from fastmid.checkpoint import save_checkpoint as _save_checkpoint
from fastmid.compile import CompileTimer
from fastmid.config import (
    DEMO,
    PAPER_LR,
    TrainConfig,
    build_config,
    parse_band,
    save_yaml,
)
from fastmid.errors import UserError
from fastmid.fileio import write_text_atomic
from fastmid.loss import forward_loss

# Files a run writes; --overwrite removes exactly these and nothing else the user keeps there.
OUTPUT_ENTRIES = (
    "adapter",
    "config.yaml",
    "metrics.jsonl",
    "summary.json",
    "predictions.jsonl",
    CHECKPOINT_DIR,
    CHECKPOINT_DIR + ".old",
)
# Config fields that may differ between an interrupted run and its --resume.
RESUME_MAY_CHANGE = {
    "resume",
    "overwrite",
    "output_dir",
    "log_every",
    "save_every",
    "eval",
    "eval_limit",
    "eval_batch_size",
    "max_new_tokens",
    "nproc",
    "parallel",
}


# --------------------------------------------------------------------------------------------
# Precision, schedule, small process helpers
# --------------------------------------------------------------------------------------------


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn "auto" into "bf16" (CUDA with bf16, or a CPU with native bf16 matmul) or "fp32"."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    from fastmid.models import native_bf16

    return "bf16" if native_bf16() else "fp32"


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


def rank() -> int:
    """This process's rank under torchrun (0 when not distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Only rank 0 writes files and prints progress."""
    return rank() == 0


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is in KiB on Linux: the process's peak resident memory.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _log(message: str) -> None:
    if is_main_process():
        print(message, flush=True)


class _StopFlag:
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
        _log(f"{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping")

    @contextlib.contextmanager
    def installed(self) -> Iterator[_StopFlag]:
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
# Output directory
# --------------------------------------------------------------------------------------------


def _check_output_dir(cfg: TrainConfig) -> Path:
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


def _clear_previous_outputs(out: Path) -> None:
    for name in OUTPUT_ENTRIES:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def _check_resume_compatible(cfg: TrainConfig, saved: dict[str, Any]) -> None:
    now = cfg.to_dict()
    for key, value in saved.items():
        if key in RESUME_MAY_CHANGE or key not in now:
            continue
        if now[key] != value:
            raise UserError(
                f"--resume: {key} is {now[key]!r} but the checkpoint was trained with {value!r}"
            )


def _write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


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


# --------------------------------------------------------------------------------------------
# Evaluation around training
# --------------------------------------------------------------------------------------------


def _evaluate(
    model: nn.Module,
    tokenizer: Any,
    eval_records: list[dict] | None,
    heldout_texts: list[str] | None,
    cfg: TrainConfig,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> tuple[dict[str, float], list[dict]]:
    from fastmid import evaluate

    result: dict[str, float] = {}
    predictions: list[dict] = []
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast():
        if eval_records:
            acc, predictions = evaluate.gsm_accuracy(
                model,
                tokenizer,
                eval_records,
                batch_size=cfg.eval_batch_size,
                max_new_tokens=cfg.max_new_tokens,
            )
            result["accuracy"] = float(acc)
        if heldout_texts:
            result["heldout_ppl"] = float(
                evaluate.perplexity(model, tokenizer, heldout_texts, max_length=cfg.max_length)
            )
    model.train(was_training)
    return result, predictions


def _load_eval_inputs(cfg: TrainConfig) -> tuple[list[dict] | None, list[str] | None]:
    """Accuracy records (bundled test split unless given) and held-out perplexity texts."""
    from fastmid import data, evaluate

    if not cfg.eval:
        return None, None
    eval_path = cfg.eval_data
    if eval_path is None and cfg.data is None:
        eval_path = str(data.bundled_path("test"))
    records = data.load_records(eval_path) if eval_path is not None else None
    if records is not None and cfg.eval_limit is not None:
        records = records[: cfg.eval_limit]
    heldout = evaluate.heldout_texts()
    if cfg.eval_limit is not None:
        heldout = heldout[: cfg.eval_limit]
    return records, heldout


# --------------------------------------------------------------------------------------------
# train()
# --------------------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run one training job described by ``cfg``; returns the summary (also summary.json).

    On SIGINT/SIGTERM the loop checkpoints and returns early with ``summary["interrupted"]``
    set; ``--resume`` then continues with the same losses an uninterrupted run would have.
    """
    from fastmid import data, models, patch

    wall_start = time.perf_counter()
    cfg = cfg.validate().resolved()
    out = _check_output_dir(cfg)
    ckpt_dir = out / CHECKPOINT_DIR
    resumed_extra = read_extra(ckpt_dir) if cfg.resume else None
    if resumed_extra is not None:
        _check_resume_compatible(cfg, resumed_extra["config"])

    device = _device()
    # Under torchrun: join the process group. Every rank has passed the output-dir checks
    # above before rank 0 may write there.
    world = distributed.init_distributed(device).world_size
    distributed.barrier()
    precision = resolve_precision(cfg.precision, device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=precision == "bf16")

    # --- data first: a bad file should fail in a second, not after loading a model ---
    data_path = cfg.data if cfg.data is not None else str(data.bundled_path("train"))
    records = data.load_records(data_path)
    eval_records, heldout_texts = _load_eval_inputs(cfg)

    # --- model and tokenizer ---
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model, tokenizer, model_name = models.load_model(cfg.model, dtype=dtype)
    parallel = distributed.resolve_parallel(cfg.parallel, model, device, world)
    if parallel != "fsdp":  # under FSDP only each rank's shard goes to the device
        model.to(device)
    examples = data.tokenize_records(
        records, tokenizer, fmt=cfg.format, max_length=cfg.max_length, loss_on=cfg.loss_on
    )

    # --- band: explicit, or measured by the probe on the untuned model ---
    band = parse_band(cfg.band)
    band_reason = None
    if band == "auto":
        from fastmid import probe

        _log("probing layer sensitivity to choose the band ...")
        with autocast():
            band, probe_info = probe.recommend_band(model, tokenizer, examples[:64])
        band_reason = str(probe_info.get("reason", ""))
        _log(f"band auto → layers {band[0]}-{band[-1]}: {band_reason}")

    # --- patch: adapters in the band, everything else frozen ---
    mid_cfg = patch.MidBlockConfig(
        band=band,
        targets=tuple(cfg.targets),
        rank=cfg.rank,
        rank_budget=cfg.rank_budget,
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        use_rslora=cfg.use_rslora,
        # FSDP shards each linear's own weight; fused groups read a concatenated copy.
        fuse_groups=cfg.fuse_groups and parallel != "fsdp",
        gradient_checkpointing=cfg.gradient_checkpointing,
        compile=cfg.compile,
    )
    torch.manual_seed(cfg.seed)
    patch.apply_midblock(model, mid_cfg)
    # Packed rows attend within each example instead of over the whole masked T×T square:
    # flash-attn's varlen kernels on CUDA where installed (half precision only), else
    # fastmid's per-example SDPA.
    from importlib.util import find_spec

    from fastmid.attention import enable_varlen_attention

    half = model.dtype in (torch.bfloat16, torch.float16)
    if device.type == "cuda" and half and find_spec("flash_attn") is not None:
        model.set_attn_implementation("flash_attention_2")
    else:
        enable_varlen_attention(model)
    state = model.fastmid_state
    params = patch.adapter_parameters(model)
    n_params = sum(p.numel() for p in params)
    # One process: a pass-through. Several: DDP or FSDP, this rank's micro-batches, grad sums.
    dp = distributed.DataParallel(model, parallel, forward_loss, device)
    if world > 1 and cfg.grad_accum % world:
        _log(f"note: grad_accum {cfg.grad_accum} is not a multiple of {world} ranks; some idle")

    # --- evaluate the base model (skipped on resume: the checkpoint remembers it) ---
    # Freshly patched adapters have lora_B = 0, so this is exactly the base model's output;
    # patching first makes a bad band/rank/target fail before minutes of generation.
    if resumed_extra is not None:
        eval_before = resumed_extra["eval_before"]
    elif cfg.eval and (eval_records or heldout_texts):
        _log(f"evaluating the base model on {len(eval_records or [])} records ...")
        eval_before, _ = _evaluate(model, tokenizer, eval_records, heldout_texts, cfg, autocast)
        _log("before: " + _format_eval(eval_before))
    else:
        eval_before = {}

    # --- optimizer and schedule ---
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda"
    )
    plans: dict[int, list[list[int]]] = {}

    def plan(epoch: int) -> list[list[int]]:
        # Each epoch's packing order is a pure function of (seed, epoch): resuming rebuilds it.
        if epoch not in plans:
            plans.clear()
            plans[epoch] = data.pack_batches(examples, cfg.batch_tokens, seed=cfg.seed + epoch)
        return plans[epoch]

    micro_per_epoch = len(plan(0))
    if cfg.max_steps is not None:
        total_steps = cfg.max_steps
    else:
        total_steps = math.ceil(micro_per_epoch * (cfg.epochs or 1) / cfg.grad_accum)
    total_micro = (
        total_steps * cfg.grad_accum
        if cfg.max_steps is not None
        else micro_per_epoch * (cfg.epochs or 1)
    )
    warmup = (
        cfg.warmup_steps
        if cfg.warmup_steps is not None
        else math.ceil(cfg.warmup_ratio * total_steps)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, warmup, cfg.schedule)
    )
    equalizer = None
    if cfg.equalize_updates:
        from fastmid.equalize import UpdateEqualizer

        equalizer = UpdateEqualizer(model)

    resolved = {
        "model_name": model_name,
        "device": str(device),
        "precision": precision,
        "parallel": parallel,
        "world_size": world,
        "layers": list(state.layers),
        "num_layers": state.num_layers,
        "rank": state.rank,
        "scale": float(state.scale),
        "adapter_parameters": n_params,
        "total_steps": total_steps,
        "warmup_steps": warmup,
        "micro_batches_per_epoch": micro_per_epoch,
        "train_examples": len(examples),
    }
    if band_reason is not None:
        resolved["band_reason"] = band_reason

    # --- resume or start fresh ---
    step = 0
    totals = {"tokens": 0, "label_tokens": 0, "train_seconds": 0.0}
    loss_first: float | None = None
    loss_last: float | None = None
    if cfg.resume:
        extra = load_checkpoint(ckpt_dir, model, optimizer, scheduler)
        step = int(extra["step"])
        totals = extra["totals"]
        loss_first, loss_last = extra["loss_first"], extra["loss_last"]
        if is_main_process():
            _truncate_metrics(out / "metrics.jsonl", step)
        _log(f"resumed from {ckpt_dir} at step {step}/{total_steps}")
    elif is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        _clear_previous_outputs(out)

    config_dump = cfg.to_dict()
    if band_reason is not None:
        # Record what "auto" chose, so feeding this config back reproduces the run.
        config_dump["band"] = ",".join(str(i) for i in state.layers)

    def checkpoint_extra() -> dict[str, Any]:
        return {
            "step": step,
            "totals": totals,
            "loss_first": loss_first,
            "loss_last": loss_last,
            "eval_before": eval_before,
            "config": cfg.to_dict(),
        }

    def save_checkpoint() -> None:
        if is_main_process():
            _save_checkpoint(ckpt_dir, model, optimizer, scheduler, checkpoint_extra())

    _log(
        f"fastmid train: {model_name} | layers {state.layers[0]}-{state.layers[-1]} of "
        f"{state.num_layers} | rank {state.rank} | {n_params:,} adapter params | {precision} | "
        f"{len(examples)} examples, {micro_per_epoch} micro-batches/epoch | {total_steps} steps"
    )

    # --- the loop ---
    # torch.compile (--compile) is lazy: its time accrues in the first steps and is logged once.
    compile_timer = CompileTimer()
    compile_s = 0.0
    model.train()
    interrupted = False
    window_loss = torch.zeros((), device=device)
    window_labels = 0
    window_tokens = 0
    window_start = time.perf_counter()
    metrics_path = out / "metrics.jsonl"
    with _StopFlag().installed() as stop:
        while step < total_steps:
            first_micro = step * cfg.grad_accum
            micro_ids = range(first_micro, min(first_micro + cfg.grad_accum, total_micro))
            micro_batches = [plan(g // micro_per_epoch)[g % micro_per_epoch] for g in micro_ids]
            # Normalise by every label token of the step, so accumulation equals one big batch.
            step_labels = sum(examples[i].num_loss_tokens for b in micro_batches for i in b)
            for indices, grad_sync in dp.micro_batches(micro_batches):
                batch = data.collate_packed([examples[i] for i in indices])
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                with grad_sync:
                    with autocast():
                        loss_sum, _ = dp.forward_loss(batch)
                    (loss_sum / step_labels).backward()
                window_loss += loss_sum.detach()
                window_tokens += batch["input_ids"].numel()
            window_labels += step_labels
            dp.reduce_gradients()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if equalizer is not None:
                equalizer.before_step()
            optimizer.step()
            if equalizer is not None:
                equalizer.after_step()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            # A signal may reach the ranks at different steps: all stop at the same one.
            stop.requested = distributed.any_rank(stop.requested)

            # A checkpoint (periodic or on a signal) also flushes the log window, so a resumed
            # run logs exactly the lines an uninterrupted one does.
            saving = stop.requested or (cfg.save_every and step % cfg.save_every == 0)
            saving = bool(saving) and step < total_steps
            if step % cfg.log_every == 0 or step == total_steps or saving:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                now = time.perf_counter()
                seconds = now - window_start
                # Each rank summed its own micro-batches; window_labels is already global.
                window_sum, all_tokens = distributed.all_reduce_sum(window_loss, window_tokens)
                window_tokens = int(all_tokens)
                loss = window_sum / max(1, window_labels)
                totals["tokens"] += window_tokens
                totals["label_tokens"] += window_labels
                totals["train_seconds"] += seconds
                loss_first = loss if loss_first is None else loss_first
                loss_last = loss
                record = {
                    "step": step,
                    "loss": loss,
                    "lr": lr,
                    "tokens_per_s": window_tokens / max(seconds, 1e-9),
                    "tokens": totals["tokens"],
                    "mem_gb": _memory_gb(device),
                    "elapsed_s": totals["train_seconds"],
                }
                if is_main_process():
                    with metrics_path.open("a", encoding="utf-8") as f:
                        f.write(json.dumps(record) + "\n")
                _log(
                    f"step {step}/{total_steps} | loss {loss:.4f} | lr {lr:.2e} | "
                    f"tok/s {record['tokens_per_s']:,.0f} | mem {record['mem_gb']:.2f} GB"
                )
                if compile_timer.seconds() > 0 and not compile_s:
                    compile_s = compile_timer.seconds()
                    _log(f"torch.compile: {compile_s:.0f} s, included in the first steps' time")
                window_loss.zero_()
                window_labels = window_tokens = 0
                window_start = time.perf_counter()

            if saving:
                save_checkpoint()
                window_start = time.perf_counter()  # checkpoint time is not training time
            if saving and stop.requested:
                interrupted = True
                _log(f"stopped at step {step}; continue with --resume (checkpoint {ckpt_dir})")
                break

    summary: dict[str, Any] = {
        "interrupted": interrupted,
        "steps": step,
        "total_steps": total_steps,
        "loss_first": loss_first,
        "loss_last": loss_last,
        "tokens_per_s": totals["tokens"] / max(totals["train_seconds"], 1e-9),
        "train_seconds": totals["train_seconds"],
        "compile_seconds": compile_s,
        "eval_before": eval_before,
        "resolved": resolved,
    }
    if interrupted:
        return summary

    # --- evaluate the tuned model, then save everything atomically ---
    eval_after: dict[str, float] = {}
    predictions: list[dict] = []
    if cfg.eval and (eval_records or heldout_texts):
        _log(f"evaluating the tuned model on {len(eval_records or [])} records ...")
        eval_after, predictions = _evaluate(
            model, tokenizer, eval_records, heldout_texts, cfg, autocast
        )
    adapter_dir = out / "adapter"
    summary.update(
        eval_after=eval_after,
        adapter=str(adapter_dir),
        wall_seconds=time.perf_counter() - wall_start,
    )
    if is_main_process():
        _save_adapter_atomic(model, adapter_dir, model_name)
        save_yaml({**config_dump, "resolved": resolved}, out / "config.yaml")
        if predictions:
            write_text_atomic(
                out / "predictions.jsonl",
                "".join(json.dumps(p) + "\n" for p in predictions),
            )
        _write_json_atomic(out / "summary.json", summary)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    _log(format_summary(summary))
    return summary


def _save_adapter_atomic(model: nn.Module, adapter_dir: Path, model_name: str) -> None:
    from fastmid.adapters import save_adapter

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
        lines.append(f"  held-out ppl {ppl}")
    lines.append(f"  throughput  {summary['tokens_per_s']:,.0f} tok/s")
    lines.append(f"  wall time   {summary.get('wall_seconds', 0.0):.0f} s")
    lines.append(f"  adapter     {summary.get('adapter')}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fastmid train``; each overrides the same key of ``--config`` when given."""
    # SUPPRESS keeps flags the user did not type out of the namespace, so they cannot
    # clobber values from the YAML file with argparse defaults.
    S = argparse.SUPPRESS
    defaults = TrainConfig()

    group: Any = parser

    def add(flag: str, help_text: str, **kw: Any) -> None:
        key = flag.lstrip("-").replace("-", "_")
        default = getattr(defaults, key, None)
        if isinstance(default, list):
            default = ",".join(default)
        if "default:" not in help_text:
            help_text = f"{help_text} (default: {default})"
        group.add_argument(flag, default=S, help=help_text, **kw)

    parser.add_argument("--config", default=None, help="YAML file of config keys; flags win")
    group = parser.add_argument_group("model and data")
    add("--model", "local HF dir, .gguf file or hub id; default: embedded SmolLM2-135M-Instruct")
    add(
        "--data",
        "training JSONL ({prompt,response} | {question,answer} | {messages}); "
        "default: the bundled GSM-style train split",
    )
    add(
        "--eval-data",
        "JSONL with gold '#### N' answers for accuracy; default: the bundled test split "
        "when --data is not given, else none",
    )
    add("--format", "prompt format", choices=["qa", "chat"])
    add("--max-length", "max tokens per example", type=int)
    add("--loss-on", "which tokens carry loss", choices=["response", "all"])
    add("--output-dir", "where adapter, config, metrics and summary go")
    group = parser.add_argument_group("mid-block LoRA")
    add("--band", "0.2,0.8 | all | 6-23 | 3,5,7 | auto")
    add("--rank", "LoRA rank of active layers; default: budget-matched", type=int)
    add("--rank-budget", "uniform-LoRA rank whose parameter count is matched", type=int)
    add("--alpha", "LoRA alpha", type=float)
    add("--dropout", "LoRA dropout", type=float)
    add("--targets", "comma-separated linear layers, e.g. q_proj,k_proj,v_proj,o_proj")
    add("--use-rslora", "scale alpha/sqrt(rank)", action="store_true")
    add("--gradient-checkpointing", "recompute active blocks in backward", action="store_true")
    add("--compile", "torch.compile the decoder blocks", choices=["auto", "on", "off"])
    group = parser.add_argument_group("optimisation")
    add("--precision", "auto | bf16 | fp32", choices=["auto", "bf16", "fp32"])
    demo_lr = DEMO["lr"]
    add("--lr", f"peak lr; default: {PAPER_LR:g}, or {demo_lr:g} in the demo", type=float)
    add("--weight-decay", "AdamW weight decay", type=float)
    add("--warmup-steps", "warmup optimizer steps; default: --warmup-ratio of the run", type=int)
    add("--warmup-ratio", "warmup as a fraction of all steps", type=float)
    add("--schedule", "lr decay after warmup", choices=["linear", "cosine", "constant"])
    add("--batch-tokens", "token budget of one packed micro-batch", type=int)
    add("--grad-accum", "micro-batches per optimizer step", type=int)
    add("--max-grad-norm", "gradient clipping norm (0 = off)", type=float)
    add("--epochs", "passes over the data; default: 1", type=int)
    add(
        "--max-steps",
        "stop after this many optimizer steps (overrides --epochs); default: all epochs, "
        f"or {DEMO['max_steps']} in the no-argument demo",
        type=int,
    )
    add("--seed", "random seed", type=int)
    add("--equalize-updates", "equal ‖ΔW‖/‖W‖ across layers each step", action="store_true")
    group = parser.add_argument_group("many devices")
    add("--nproc", "processes (one per GPU) to start with torchrun", type=int)
    add("--parallel", "ddp: model copy per rank; fsdp: sharded", choices=["auto", "ddp", "fsdp"])
    group = parser.add_argument_group("logging, checkpoints, evaluation")
    add("--log-every", "progress line every N steps", type=int)
    add("--save-every", "checkpoint every N steps (0 = only on interrupt)", type=int)
    add("--resume", "continue from <output-dir>/checkpoint", action="store_true")
    add("--overwrite", "replace the results in a non-empty output dir", action="store_true")
    add("--eval", "evaluate before and after training", action=argparse.BooleanOptionalAction)
    add("--eval-limit", "evaluate on at most N records", type=int)
    add("--eval-batch-size", "prompts per generation batch", type=int)
    add("--max-new-tokens", "greedy tokens per eval prompt", type=int)


def run(args: argparse.Namespace) -> int:
    """``fastmid train``: build the config from --config and flags, train, print the summary."""
    from transformers.utils import logging as hf_logging

    # Our own progress line replaces the weight-loading bars; stderr stays for errors only.
    hf_logging.disable_progress_bar()
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "command")}
    cfg = build_config(args.config, overrides)
    if cfg.nproc > 1 and not distributed.under_torchrun():
        # Run this command again as nproc torchrun workers, each given the resolved config.
        return distributed.launch(cfg.nproc, ["train"], config={**cfg.to_dict(), "nproc": 1})
    summary = train(cfg)
    distributed.shutdown()
    # 130 = the conventional exit status of a run stopped by SIGINT; the checkpoint is saved.
    return 130 if summary["interrupted"] else 0
