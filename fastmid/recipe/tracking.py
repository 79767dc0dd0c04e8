"""Experiment trackers behind one small interface: ``open(config)``, ``log(step, metrics)``,
``close()``.

``--report-to`` picks one: ``none`` (the default; ``metrics.jsonl`` is always written anyway),
``tensorboard`` (event files under ``<output-dir>/tensorboard``; needs the ``tensorboard``
package, which ``torch.utils.tensorboard`` writes through) or ``wandb`` (Weights & Biases; runs
offline into ``<output-dir>/wandb`` unless ``WANDB_MODE`` says otherwise, so nothing needs a
network or an account until the user syncs). Both are optional extras:
``pip install 'fastmid[track]'``.

Metric names are grouped by their prefix, e.g. ``train/loss`` and ``eval/loss``.

A run resumed from a checkpoint continues the same tracker run: TensorBoard drops the events
logged after the checkpoint (they are logged again), W&B reopens the run whose id the first
part kept in ``<output-dir>/wandb/run-id``.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, Protocol

from fastmid.errors import UserError
from fastmid.fileio import write_text_atomic

REPORT_TO = ("none", "tensorboard", "wandb")
# What each tracker needs installed, for the one-line error when it is missing.
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


class Tracker(Protocol):
    """What the training loop calls; every method is cheap and never raises for a metric."""

    def open(self, config: dict[str, Any]) -> None:
        """Start the run and record its resolved config."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record scalar ``metrics`` at optimizer step ``step``."""

    def close(self) -> None:
        """Flush and finish the run."""


class NoTracker:
    """``--report-to none``: nothing beyond metrics.jsonl."""

    def open(self, config: dict[str, Any]) -> None:
        pass

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """Event files in ``log_dir``: one scalar per metric, the config as a text summary.

    ``resumed_at``: the checkpoint's step when the run resumes; events the first part logged
    after it are purged (TensorBoard drops them on reading), as metrics.jsonl is cut back.
    """

    def __init__(self, log_dir: Path, resumed_at: int | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.resumed_at = resumed_at
        self._writer: Any = None

    def open(self, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        continued = self.resumed_at is not None and any(self.log_dir.glob("events.out.*"))
        purge = self.resumed_at + 1 if continued else None
        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge)
        if continued:
            return  # the first part wrote the config
        # Indented JSON as a Markdown code block: readable in TensorBoard's text tab.
        text = "```\n" + json.dumps(config, indent=2, default=str) + "\n```"
        self._writer.add_text("config", text, global_step=0)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(name, float(value), global_step=step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class WandbTracker:
    """A Weights & Biases run, offline by default (``WANDB_MODE`` overrides).

    The run id is kept in ``run_dir/run-id``; with ``resume`` the run continues under it (W&B
    drops the steps it already has), so a resumed training is one W&B run.
    """

    def __init__(self, run_dir: Path, name: str | None = None, resume: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.name = name
        self.resume = resume
        self._run: Any = None

    def open(self, config: dict[str, Any]) -> None:
        import wandb

        self.run_dir.mkdir(parents=True, exist_ok=True)
        id_file = self.run_dir / "run-id"
        # A first part that ran without W&B kept no id: the resumed part starts the run.
        continued = self.resume and id_file.is_file()
        run_id = id_file.read_text(encoding="utf-8").strip() if continued else ""
        if not run_id:
            run_id = secrets.token_hex(6)  # W&B allows letters and digits in ids
            write_text_atomic(id_file, run_id + "\n")
        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "fastmid"),
            name=self.name,
            id=run_id,
            resume="allow" if continued else None,
            dir=str(self.run_dir),
            config=config,
            mode=os.environ.get("WANDB_MODE", "offline"),
            reinit="create_new",
        )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._run.log({k: float(v) for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        if self._run is not None:
            import wandb

            self._run.finish()
            self._run = None
            # finish() can return before W&B's service has written the last records to the
            # run file; shutting the service down waits for that.
            wandb.teardown()


def namespaced(metrics: dict[str, Any], default: str = "train") -> dict[str, float]:
    """``{"loss": …, "eval_loss": …}`` → ``{"train/loss": …, "eval/loss": …}``: numbers only,
    ``eval_``-prefixed names under ``eval/``, the rest under ``default/``."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or key == "step":
            continue
        group, name = ("eval", key[5:]) if key.startswith("eval_") else (default, key)
        out[f"{group}/{name}"] = float(value)
    return out


def check_available(kind: str) -> None:
    """UserError (one line, with the install command) if ``kind`` is unknown or not installed."""
    from importlib.util import find_spec

    if kind not in REPORT_TO:
        raise UserError(f"report_to must be one of {'|'.join(REPORT_TO)}, got {kind!r}")
    package = _PACKAGES.get(kind)
    if package is not None and find_spec(package) is None:
        raise UserError(
            f"--report-to {kind} needs the {package} package: pip install 'fastmid[track]'"
        )


def make_tracker(kind: str, output_dir: str | Path, resumed_at: int | None = None) -> Tracker:
    """The tracker ``--report-to kind`` asks for, writing under ``output_dir``; ``resumed_at``
    is the checkpoint's step when the run resumes (the tracker continues the first part)."""
    check_available(kind)
    out = Path(output_dir)
    if kind == "tensorboard":
        return TensorBoardTracker(out / "tensorboard", resumed_at)
    if kind == "wandb":
        return WandbTracker(out / "wandb", name=out.resolve().name, resume=resumed_at is not None)
    return NoTracker()
