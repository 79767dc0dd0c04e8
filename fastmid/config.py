"""Training configuration: one typed dataclass, a YAML file, CLI overrides, validated once.

``build_config(yaml_path, overrides)`` is the single entry point: YAML values first, then the
overrides (CLI flags the user actually gave), then :meth:`TrainConfig.validate`. Every problem
is a :class:`fastmid.errors.UserError` with one line naming the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fastmid.compile import COMPILE_MODES
from fastmid.errors import UserError
from fastmid.fileio import write_text_atomic

SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
FORMATS = ("qa", "chat")
LOSS_ON = ("response", "all")
PARALLEL = ("auto", "ddp", "fsdp")

PAPER_LR = 1e-4
# `fastmid train` with no arguments: a run of about five minutes on a 2-core CPU in which the
# embedded model visibly learns the bundled task (the paper's 1e-4 needs far more steps).
DEMO: dict[str, Any] = {"max_steps": 16, "lr": 1e-3}

# A parsed band: fractions of depth, every layer, explicit layer indices, or ask the probe.
Band = tuple[float, float] | str | list[int]


@dataclass
class TrainConfig:
    """Everything one ``fastmid train`` run needs; saved as ``<output-dir>/config.yaml``."""

    # --- model and data ---
    # Local HF dir, .gguf file or hub id; None = the embedded SmolLM2-135M-Instruct.
    model: str | None = None
    # JSONL training records; None = the bundled synthetic GSM-style train split.
    data: str | None = None
    # JSONL with gold "#### N" answers for accuracy; None = bundled test split (default data only).
    eval_data: str | None = None
    # "qa" = the paper's "Question: …\nAnswer: …" + EOS; "chat" = the tokenizer's chat template.
    format: str = "qa"
    # Examples are truncated to this many tokens (the paper uses 128).
    max_length: int = 256
    # "response" = loss on answer tokens only; "all" = every token (the paper's setting).
    loss_on: str = "response"
    # Where the adapter, checkpoints, metrics and summary go.
    output_dir: str = "./fastmid-out"

    # --- Mid-Block LoRA ---
    # "0.2,0.8" (fractions of depth), "all", "6-23" (inclusive layer range), "3,5,7", or "auto".
    band: str = "0.2,0.8"
    # LoRA rank of the active layers; None = budget-matched from rank_budget.
    rank: int | None = None
    # Uniform-LoRA rank whose parameter count the band's adapters match (the paper's 64).
    rank_budget: int = 64
    # LoRA alpha; scale = alpha / rank (or alpha / sqrt(rank) with use_rslora).
    alpha: float = 128.0
    # LoRA dropout on the adapter input.
    dropout: float = 0.05
    # Linear layers inside each active block that get adapters.
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # Rank-stabilised scaling alpha / sqrt(rank).
    use_rslora: bool = False
    # Run q/k/v (and gate/up) through one fused kernel sharing the input read.
    fuse_groups: bool = True
    # Recompute activations of the active blocks in backward instead of storing them.
    gradient_checkpointing: bool = False
    # torch.compile the decoder blocks: "on", "off", or "auto" (where the bench shows a win;
    # see fastmid.compile.resolve_compile).
    compile: str = "auto"

    # --- optimisation ---
    # "auto" = bf16 mixed precision on CUDA or CPUs with native bf16 matmul, else fp32.
    precision: str = "auto"
    # Peak AdamW learning rate; None = 1e-4 (the paper's), or DEMO["lr"] for the bundled demo.
    lr: float | None = None
    # AdamW weight decay on the adapters.
    weight_decay: float = 0.0
    # Linear warmup length in optimizer steps; None = warmup_ratio of the run.
    warmup_steps: int | None = None
    # Warmup as a fraction of the total optimizer steps, rounded up (when warmup_steps is None).
    warmup_ratio: float = 0.05
    # Learning-rate decay after warmup: linear to 0 (the paper), cosine to 0, or constant.
    schedule: str = "linear"
    # Token budget of one packed micro-batch (whole examples, no padding); 1024 holds about 11
    # bundled examples, and small packs keep the block-diagonal attention cheap on CPU.
    batch_tokens: int = 1024
    # Micro-batches per optimizer step (3 x 1024 tokens ≈ the paper's 32 examples per step);
    # the loss is normalised over all their label tokens.
    grad_accum: int = 3
    # Global gradient-norm clip; 0 disables clipping.
    max_grad_norm: float = 1.0
    # Passes over the data; None = 1 (the paper's), or DEMO["max_steps"] for the bundled demo.
    epochs: int | None = None
    # Stop after this many optimizer steps (also sizes the schedule); None = run all epochs.
    max_steps: int | None = None
    # Seed for data order, adapter init and dropout.
    seed: int = 0
    # Rescale each layer's update so ‖ΔW‖/‖W‖ is equal across layers after every step.
    equalize_updates: bool = False

    # --- many devices ---
    # Processes (one per GPU) that `fastmid train` starts with torchrun; 1 = just this one.
    nproc: int = 1
    # How ranks hold the frozen model: "ddp" (whole copy each), "fsdp" (decoder blocks sharded),
    # "auto" (fsdp when the weights exceed half of one GPU's memory).
    parallel: str = "auto"

    # --- logging, checkpoints, evaluation ---
    # Print a progress line and append to metrics.jsonl every this many optimizer steps.
    log_every: int = 1
    # Write a resumable checkpoint every this many optimizer steps; 0 = only on interrupt.
    save_every: int = 0
    # Continue from <output-dir>/checkpoint exactly where it stopped.
    resume: bool = False
    # Allow writing into a non-empty output dir (its previous results are replaced).
    overwrite: bool = False
    # Evaluate accuracy and held-out perplexity before and after training.
    eval: bool = True
    # Evaluate on at most this many records (greedy generation is the slow part on a CPU:
    # 32 problems take about a minute there); None = all of them.
    eval_limit: int | None = 32
    # Prompts per batched greedy generation.
    eval_batch_size: int = 32
    # Greedy tokens generated per eval prompt (the GSM8K protocol uses 64).
    max_new_tokens: int = 64

    def validate(self) -> TrainConfig:
        """Check every field once; raise UserError naming the first bad one. Returns self."""
        _one_of("format", self.format, FORMATS)
        _one_of("loss_on", self.loss_on, LOSS_ON)
        _one_of("precision", self.precision, PRECISIONS)
        _one_of("schedule", self.schedule, SCHEDULES)
        _one_of("compile", self.compile, COMPILE_MODES)
        parse_band(self.band)
        if self.rank is not None and self.rank < 1:
            raise UserError(f"rank must be a positive integer, got {self.rank}")
        _positive("rank_budget", self.rank_budget)
        _positive("alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise UserError("targets must name at least one linear layer, e.g. q_proj,v_proj")
        for name in self.targets:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise UserError(f"target {name!r} is not a module name (e.g. q_proj)")
        if len(set(self.targets)) != len(self.targets):
            raise UserError(f"targets repeat a name: {','.join(self.targets)}")
        _positive("max_length", self.max_length)
        if self.lr is not None:
            _positive("lr", self.lr)
        if self.weight_decay < 0:
            raise UserError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise UserError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise UserError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        _positive("batch_tokens", self.batch_tokens)
        if self.batch_tokens < self.max_length:
            raise UserError(
                f"batch_tokens ({self.batch_tokens}) must be at least max_length "
                f"({self.max_length}) so every example fits in a batch"
            )
        _positive("grad_accum", self.grad_accum)
        if self.max_grad_norm < 0:
            raise UserError(f"max_grad_norm must be >= 0, got {self.max_grad_norm}")
        if self.epochs is not None:
            _positive("epochs", self.epochs)
        if self.max_steps is not None:
            _positive("max_steps", self.max_steps)
        _positive("nproc", self.nproc)
        _one_of("parallel", self.parallel, PARALLEL)
        _positive("log_every", self.log_every)
        if self.save_every < 0:
            raise UserError(f"save_every must be >= 0, got {self.save_every}")
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite exclude each other")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise UserError(f"eval_limit must be a positive integer, got {self.eval_limit}")
        _positive("eval_batch_size", self.eval_batch_size)
        _positive("max_new_tokens", self.max_new_tokens)
        if not self.output_dir:
            raise UserError("output_dir must not be empty")
        return self

    @property
    def is_demo(self) -> bool:
        """No data, no run length and no lr given: the short demo on the bundled data."""
        return (
            self.data is None and self.epochs is None and self.max_steps is None and self.lr is None
        )

    def resolved(self) -> TrainConfig:
        """A copy with every None default that depends on the run filled in (lr, length)."""
        if self.is_demo:
            return dataclasses.replace(self, lr=DEMO["lr"], max_steps=DEMO["max_steps"])
        return dataclasses.replace(
            self,
            lr=PAPER_LR if self.lr is None else self.lr,
            epochs=1 if self.epochs is None and self.max_steps is None else self.epochs,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-safe dict of every field."""
        return dataclasses.asdict(self)


def parse_band(band: str) -> Band:
    """Parse a band spec: "0.2,0.8" → (0.2, 0.8); "all"; "auto"; "6-23" / "3,5,7" → layer list."""
    text = str(band).strip().replace(" ", "")
    if text in ("all", "auto"):
        return text
    range_match = re.fullmatch(r"(\d+)-(\d+)", text)
    if range_match:
        lo, hi = int(range_match[1]), int(range_match[2])
        if lo > hi:
            raise UserError(f"band {band!r}: range start {lo} is after its end {hi}")
        return list(range(lo, hi + 1))
    parts = text.split(",")
    if all(re.fullmatch(r"\d+", p) for p in parts):
        layers = sorted({int(p) for p in parts})
        return layers
    if len(parts) == 2 and all(re.fullmatch(r"\d*\.?\d+", p) for p in parts):
        lo_f, hi_f = float(parts[0]), float(parts[1])
        if not 0.0 <= lo_f < hi_f <= 1.0:
            raise UserError(f"band {band!r}: fractions must satisfy 0 <= start < end <= 1")
        return (lo_f, hi_f)
    raise UserError(
        f"band {band!r} is not one of: 0.2,0.8 (fractions) | all | auto | 6-23 | 3,5,7 (layers)"
    )


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping of TrainConfig fields (dashes or underscores in keys)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read config file {p}: {err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        raise UserError(f"{where}: not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{p}: expected a mapping of config keys, got {type(data).__name__}")
    # A saved config.yaml carries a read-only "resolved" section (what auto choices became).
    data.pop("resolved", None)
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_config(
    yaml_path: str | os.PathLike[str] | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """YAML file (optional) then overrides, coerced to the field types and validated once."""
    values: dict[str, Any] = {}
    if yaml_path is not None:
        values.update(load_yaml(yaml_path))
    values.update(overrides or {})
    hints = typing.get_type_hints(TrainConfig)
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in hints:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"unknown config key {key!r}{hint}")
        kwargs[key] = _coerce(key, value, hints[key])
    return TrainConfig(**kwargs).validate()


def save_yaml(data: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write a mapping as YAML atomically (temp file in the same dir, then rename)."""
    write_text_atomic(Path(path), yaml.safe_dump(data, sort_keys=False))


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise a one-line UserError."""
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        hint = next(a for a in args if a is not type(None))
    if name == "band" and isinstance(value, (list, tuple)):
        # YAML lists of layer indices are accepted as well as the string forms.
        value = ",".join(str(v) for v in value)
    if typing.get_origin(hint) is list:
        if isinstance(value, str):
            value = [v for v in value.replace(" ", "").split(",") if v]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise UserError(f"{name} must be a list of names, got {value!r}")
        return list(value)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.lower() in ("true", "yes", "1")
            raise ValueError
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if hint is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        pass
    type_name = getattr(hint, "__name__", str(hint))
    raise UserError(f"{name} must be {type_name}, got {value!r}")


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"{name} must be one of {'|'.join(allowed)}, got {value!r}")


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise UserError(f"{name} must be positive, got {value}")
