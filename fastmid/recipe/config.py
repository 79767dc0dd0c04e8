"""Training configuration: one typed dataclass, a YAML file, CLI overrides, validated once.

``build_config(yaml_path, overrides)`` is the single entry point: YAML values first, then the
overrides (CLI flags the user actually gave), then :meth:`TrainConfig.validate`. Every problem
is a :class:`fastmid.errors.UserError` with one line naming the field.

The adapter settings are :class:`fastmid.engine.midblock.MidBlockConfig`, nested as
``TrainConfig.midblock``; files and flags name all fields flat (``rank``, ``lr``), and each
field's help text is stated once, in its ``metadata``, from which ``fastmid train``'s flags are
generated.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fastmid.engine.midblock import MidBlockConfig, format_band, parse_band
from fastmid.errors import UserError
from fastmid.fileio import write_text_atomic
from fastmid.options import add_field_arguments, option
from fastmid.recipe.data import FORMATS
from fastmid.recipe.tracking import REPORT_TO

SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
LOSS_ON = ("response", "all")
PARALLEL = ("auto", "ddp", "fsdp")


def quantized_fsdp_error(method: str) -> str:
    """Why a quantized base cannot be sharded: FSDP shards plain floating-point parameters."""
    return f"--quantize {method} trains with --parallel ddp (FSDP cannot shard quantized weights)"


PAPER_LR = 1e-4
#: ``batch_tokens`` value that sizes the micro-batch to the device (fastmid.recipe.estimate).
AUTO_BATCH = "auto"
#: What ``batch_tokens: auto`` means on a CPU: small packs keep block-diagonal attention cheap.
CPU_BATCH_TOKENS = 1024
# `fastmid train` with no arguments: a run of about five minutes on a 2-core CPU in which the
# embedded model visibly learns the bundled task (the paper's 1e-4 needs far more steps).
DEMO: dict[str, Any] = {"max_steps": 16, "lr": 1e-3}
# Marks a field that may differ between an interrupted run and its --resume.
MAY_CHANGE_ON_RESUME = {"may_change_on_resume": True}


@dataclass
class TrainConfig:
    """Everything one ``fastmid train`` run needs; saved as ``<output-dir>/config.yaml``."""

    model: str | None = option(
        None,
        "local HF dir, .gguf file or hub id; default: embedded SmolLM2-135M-Instruct",
        group="model and data",
    )
    data: str | None = option(
        None,
        "training records: JSONL, .parquet, .csv, .json, a save_to_disk dir or a dataset id "
        "NAME[:CONFIG[:SPLIT]]; default: the bundled GSM-style train split",
    )
    eval_data: str | None = option(
        None,
        "records with gold '#### N' answers for accuracy (the forms of --data); default: the "
        "bundled test split when --data is not given, else none",
    )
    fields: str | None = option(
        None, "columns of another record shape: prompt=COL,response=COL or messages=COL"
    )
    format: str = option(
        "qa",
        "prompt format: qa = the paper's 'Question: …\nAnswer: …' + EOS; chat = the "
        "tokenizer's chat template",
        choices=FORMATS,
    )
    max_length: int = option(256, "examples are truncated to this many tokens (the paper: 128)")
    loss_on: str = option(
        "response",
        "which tokens carry loss: the answer only, or all (the paper's setting)",
        choices=LOSS_ON,
    )
    output_dir: str = option(
        "./fastmid-out",
        "where the adapter, checkpoints, metrics and summary go",
        **MAY_CHANGE_ON_RESUME,
    )

    # LoRA placement and shape (band, targets, rank, alpha, dropout, ...).
    midblock: MidBlockConfig = field(default_factory=MidBlockConfig)
    max_quality_gap: float = option(
        0.1,
        "--band auto trains all layers when the best window gives up more than this share of "
        "the all-layer held-out loss reduction in the same short probe runs (0.1: the band must "
        "keep nine tenths of it; 1: always a band)",
    )

    precision: str = option(
        "auto",
        "auto = bf16 mixed precision on CUDA or CPUs with native bf16 matmul, else fp32",
        choices=PRECISIONS,
        group="optimisation",
    )
    lr: float | None = option(
        None, f"peak AdamW lr; default: {PAPER_LR:g} (the paper's), or {DEMO['lr']:g} in the demo"
    )
    weight_decay: float = option(0.0, "AdamW weight decay on the adapters")
    warmup_steps: int | None = option(
        None, "linear warmup in optimizer steps; default: --warmup-ratio of the run"
    )
    warmup_ratio: float = option(0.05, "warmup as a fraction of all steps, rounded up")
    schedule: str = option(
        "linear",
        "lr decay after warmup: linear to 0 (the paper), cosine to 0, or constant",
        choices=SCHEDULES,
    )
    batch_tokens: int | str = option(
        AUTO_BATCH,
        "token budget of one packed micro-batch (whole examples, no padding), or auto: "
        f"{CPU_BATCH_TOKENS} on CPU (about 11 bundled examples; small packs keep the "
        "block-diagonal attention cheap there); on CUDA the largest micro-batch that fits the "
        f"free memory, with --grad-accum adjusted to keep {CPU_BATCH_TOKENS} x --grad-accum "
        "tokens per optimizer step",
    )
    grad_accum: int = option(
        3,
        "micro-batches per optimizer step (3 x 1024 tokens ≈ the paper's 32 examples); the "
        "loss is normalised over all their label tokens",
    )
    max_grad_norm: float = option(1.0, "global gradient-norm clip (0 = off)")
    epochs: int | None = option(None, "passes over the data; default: 1")
    max_steps: int | None = option(
        None,
        "stop after this many optimizer steps (also sizes the schedule; overrides --epochs); "
        f"default: all epochs, or {DEMO['max_steps']} in the no-argument demo",
    )
    seed: int = option(0, "seed for data order, adapter init and dropout")
    equalize_updates: bool = option(
        False, "rescale each layer's update so ‖ΔW‖/‖W‖ is equal across layers every step"
    )

    nproc: int = option(
        1,
        "processes (one per GPU) that fastmid train starts with torchrun",
        group="many devices",
        **MAY_CHANGE_ON_RESUME,
    )
    parallel: str = option(
        "auto",
        "ddp: a whole model copy per rank; fsdp: decoder blocks sharded; auto: fsdp when the "
        "weights exceed half of one GPU's memory (ddp for a quantized base)",
        choices=PARALLEL,
        **MAY_CHANGE_ON_RESUME,
    )

    log_every: int = option(
        1,
        "progress line and metrics.jsonl record every N optimizer steps",
        group="logging, checkpoints, evaluation",
        **MAY_CHANGE_ON_RESUME,
    )
    save_every: int = option(
        0, "also checkpoint every N optimizer steps (0 = off)", **MAY_CHANGE_ON_RESUME
    )
    save_every_minutes: float = option(
        10.0,
        "checkpoint after this many minutes of training since the last one, so a killed run "
        "loses at most that much (0 = off; SIGINT/SIGTERM always checkpoint)",
        **MAY_CHANGE_ON_RESUME,
    )
    resume: bool = option(
        False,
        "continue from <output-dir>/checkpoint exactly where it stopped",
        **MAY_CHANGE_ON_RESUME,
    )
    overwrite: bool = option(
        False, "replace fastmid's results in a non-empty output dir", **MAY_CHANGE_ON_RESUME
    )
    eval: bool = option(
        True,
        "evaluate accuracy and held-out perplexity before and after training",
        **MAY_CHANGE_ON_RESUME,
    )
    eval_limit: int | None = option(
        32,
        "evaluate on at most N records (greedy generation is the slow part on a CPU: 32 "
        "problems take about a minute there); none = all",
        **MAY_CHANGE_ON_RESUME,
    )
    eval_batch_size: int = option(
        32, "prompts per batched greedy generation", **MAY_CHANGE_ON_RESUME
    )
    max_new_tokens: int = option(
        64, "greedy tokens per eval prompt (the GSM8K protocol: 64)", **MAY_CHANGE_ON_RESUME
    )
    eval_split_ratio: float = option(
        0.0, "hold out this share of --data (chosen by the seed) for the held-out loss"
    )
    eval_every: int = option(
        0,
        "held-out answer loss every N optimizer steps (on the --eval-split-ratio share, else on "
        "--eval-data), logged with the training metrics; 0 = never",
        **MAY_CHANGE_ON_RESUME,
    )
    report_to: str = option(
        "none",
        "experiment tracker: tensorboard (<output-dir>/tensorboard) or wandb (offline unless "
        "WANDB_MODE says otherwise); pip install 'fastmid[track]'",
        choices=REPORT_TO,
        **MAY_CHANGE_ON_RESUME,
    )

    def validate(self) -> TrainConfig:
        """Check every field once; raise UserError naming the first bad one. Returns self."""
        for f in dataclasses.fields(self):
            if "choices" in f.metadata:
                _one_of(f.name, getattr(self, f.name), f.metadata["choices"])
        self.midblock.validate()
        _positive("max_length", self.max_length)
        if self.lr is not None:
            _positive("lr", self.lr)
        _at_least_zero("weight_decay", self.weight_decay)
        if self.warmup_steps is not None:
            _at_least_zero("warmup_steps", self.warmup_steps)
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise UserError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.max_quality_gap <= 1:
            raise UserError(f"max_quality_gap must be in [0, 1], got {self.max_quality_gap}")
        if self.batch_tokens != AUTO_BATCH:
            self._validate_batch_tokens()
        _positive("grad_accum", self.grad_accum)
        _at_least_zero("max_grad_norm", self.max_grad_norm)
        if self.epochs is not None:
            _positive("epochs", self.epochs)
        if self.max_steps is not None:
            _positive("max_steps", self.max_steps)
        _positive("nproc", self.nproc)
        if self.nproc > 1 and self.midblock.quantize != "none" and self.parallel == "fsdp":
            raise UserError(quantized_fsdp_error(self.midblock.quantize))
        _positive("log_every", self.log_every)
        _at_least_zero("save_every", self.save_every)
        _at_least_zero("save_every_minutes", self.save_every_minutes)
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite exclude each other")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise UserError(f"eval_limit must be a positive integer, got {self.eval_limit}")
        _positive("eval_batch_size", self.eval_batch_size)
        _positive("max_new_tokens", self.max_new_tokens)
        if not self.output_dir:
            raise UserError("output_dir must not be empty")
        self._validate_inputs_and_tracking()
        return self

    def _validate_batch_tokens(self) -> None:
        _positive("batch_tokens", self.batch_tokens)
        if self.batch_tokens < self.max_length:
            raise UserError(
                f"batch_tokens ({self.batch_tokens}) must be at least max_length "
                f"({self.max_length}) so every example fits in a batch"
            )

    def _validate_inputs_and_tracking(self) -> None:
        from fastmid.recipe.data import parse_fields
        from fastmid.recipe.tracking import check_available

        parse_fields(self.fields)
        if not 0.0 <= self.eval_split_ratio < 1.0:
            raise UserError(f"eval_split_ratio must be in [0, 1), got {self.eval_split_ratio}")
        _at_least_zero("eval_every", self.eval_every)
        check_available(self.report_to)

    @property
    def is_demo(self) -> bool:
        """No data, no run length and no lr given: the short demo on the bundled data."""
        return (
            self.data is None and self.epochs is None and self.max_steps is None and self.lr is None
        )

    def recipe(self) -> str:
        """Which defaults set the lr and the length, in words (the header of a run): the demo's,
        the paper's, or the user's."""
        if self.is_demo:
            return (
                f"demo (lr {DEMO['lr']:g}, {DEMO['max_steps']} steps, as no --data, --epochs, "
                f"--max-steps or --lr is given; any of them selects the paper's lr {PAPER_LR:g})"
            )
        if self.lr is None:
            return f"paper (lr {PAPER_LR:g}; pass --lr to change it)"
        return f"lr {self.lr:g} as given"

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
        """Plain YAML-safe dict of every field, flat (the keys of files and flags)."""
        return {f.name: _plain(f.name, self.get(f.name)) for f in config_fields()}

    def get(self, name: str) -> Any:
        """The value of the flat field ``name`` (a TrainConfig or MidBlockConfig field)."""
        return getattr(self.midblock if name in _MIDBLOCK_NAMES else self, name)


_MIDBLOCK_NAMES = frozenset(f.name for f in dataclasses.fields(MidBlockConfig))


def config_fields() -> list[dataclasses.Field]:
    """Every field of a run, flat, in the order of the file and the help: the nested
    MidBlockConfig's fields stand where ``midblock`` is."""
    out: list[dataclasses.Field] = []
    for f in dataclasses.fields(TrainConfig):
        out += dataclasses.fields(MidBlockConfig) if f.name == "midblock" else [f]
    return out


def may_change_on_resume(name: str) -> bool:
    """True for fields (output, logging, evaluation, processes) a --resume may change."""
    return any(f.name == name and f.metadata.get("may_change_on_resume") for f in config_fields())


def _plain(name: str, value: Any) -> Any:
    """A field's value as files and flags write it: the band as its spec, tuples as lists."""
    if name == "band":
        return format_band(value)
    return list(value) if isinstance(value, tuple) else value


def _shown(name: str, value: Any) -> str:
    """A default as a user would type it on the command line."""
    value = _plain(name, value)
    return ",".join(value) if isinstance(value, list) else str(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fastmid train``, one per config field; each overrides the same key of
    ``--config`` when given."""
    parser.add_argument("--config", default=None, help="YAML file of config keys; flags win")
    add_field_arguments(parser, config_fields(), show=_shown)


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
    hints = {**typing.get_type_hints(TrainConfig), **typing.get_type_hints(MidBlockConfig)}
    names = [f.name for f in config_fields()]
    top: dict[str, Any] = {}
    mid: dict[str, Any] = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"unknown config key {key!r}{hint}")
        (mid if key in _MIDBLOCK_NAMES else top)[key] = _coerce(key, value, hints[key])
    return TrainConfig(midblock=MidBlockConfig(**mid), **top).validate()


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
    if name == "batch_tokens" and isinstance(value, str) and value.strip().lower() == AUTO_BATCH:
        return AUTO_BATCH
    if name == "batch_tokens":
        hint = int
    if name == "band":
        # YAML lists of layer indices are accepted as well as the string forms.
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        return parse_band(str(value))
    if typing.get_origin(hint) is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace(" ", "").split(",") if v]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise UserError(f"{name} must be a list of names, got {value!r}")
        return tuple(value)
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
    if name == "batch_tokens":
        type_name = f"int or {AUTO_BATCH}"
    raise UserError(f"{name} must be {type_name}, got {value!r}")


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"{name} must be one of {'|'.join(allowed)}, got {value!r}")


def _positive(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value}")
    if value <= 0:
        raise UserError(f"{name} must be positive, got {value}")


def _at_least_zero(name: str, value: float) -> None:
    if value < 0:
        raise UserError(f"{name} must be >= 0, got {value}")
