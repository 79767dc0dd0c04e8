"""What a run reports while it trains: the progress a checkpoint keeps, the metrics window
behind each metrics.jsonl line (and the tracker's), and the loss curve of a finished run."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastmid.engine.compile import compile_seconds
from fastmid.fileio import write_bytes_atomic, write_text_atomic
from fastmid.memory import peak_rss_bytes
from fastmid.recipe import distributed, tracking
from fastmid.recipe.batches import StepPlan
from fastmid.recipe.config import TrainConfig
from fastmid.recipe.distributed import log
from fastmid.recipe.evaluate import HeldoutLoss


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
    # [step, held-out loss] at each --eval-every step.
    eval_losses: list[list[float]] = field(default_factory=list)

    def summary(self, plan: StepPlan, resolved: dict[str, Any], interrupted: bool) -> dict:
        """The run's summary so far (summary.json adds the evaluation after training)."""
        return {
            "interrupted": interrupted,
            "steps": self.step,
            "total_steps": plan.total_steps,
            "loss_first": self.loss_first,
            "loss_last": self.loss_last,
            "eval_losses": self.eval_losses,
            # The steps' own rate: logging, held-out losses and checkpoints are not timed.
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
            seconds = self.elapsed()  # the steps' own time, without the held-out loss
            extra = {}
            if evaluating and heldout_loss:
                extra["eval_loss"] = heldout_loss()
                progress.eval_losses.append([step, extra["eval_loss"]])
            record = self.flush(progress, result.lr, result.grad_norm, extra, seconds)
            self.tracker.log(step, tracking.namespaced(record))

    def restart_clock(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since the window's clock started, the device's queued work included."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - self.start

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
        seconds: float | None = None,
    ) -> dict[str, Any]:
        """Close the window at ``progress.step``: sum over ranks, update ``progress``, log
        (with the last step's gradient norm and ``extra`` numbers such as the eval loss).
        ``seconds``: the window's training time, if taken before other work (default: now)."""
        seconds = self.elapsed() if seconds is None else seconds
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
        if "eval_loss" in record:
            line += f" | held-out loss {record['eval_loss']:.4f}"
        if self.bar is not None:
            self.bar.set_postfix_str(line, refresh=True)
        else:
            log(f"step {progress.step}/{self.total_steps} | {line}")
        self.loss.zero_()
        self.labels = self.tokens = 0
        self.restart_clock()
        return record


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines logged after the checkpoint we resume from (they will be redone)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def save_curve(metrics_path: Path, png_path: Path) -> None:
    """Plot loss and learning rate per logged step (metrics.jsonl) into a PNG, atomically."""
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
