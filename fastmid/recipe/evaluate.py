"""Evaluation: GSM8K-style accuracy (the paper's protocol) and held-out perplexity.

Accuracy: prompt ``Question: {q}\\nAnswer:``, left-padded batched greedy decoding for at most
64 new tokens, prediction = the last number in the generated text, gold = the ``#### N`` value
of the reference answer, correct when they differ by less than 1e-3. Perplexity on a held-out
general-text sample shows how much general language modelling a tune costs.

``fastmid eval`` runs both from the command line. A training run evaluates the base and the
tuned model and takes a held-out loss while it trains (:func:`evaluate_model`,
:class:`HeldoutLoss`): that is why evaluation belongs to the recipe, below the study tools.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from fastmid.engine.loss import IGNORE_INDEX
from fastmid.engine.quantize import QUANTIZE_METHODS
from fastmid.errors import UserError
from fastmid.fileio import write_text_atomic
from fastmid.outdir import holds_output_dir
from fastmid.recipe.config import TrainConfig
from fastmid.recipe.data import (
    QA_PROMPT,
    Example,
    bundled_path,
    load_records,
    split_records,
    tokenize_records,
)
from fastmid.recipe.distributed import log
from fastmid.recipe.heldout import answer_nll
from fastmid.recipe.inputs import add_data_argument, add_model_argument

_NUMBER = re.compile(r"-?[\d,]*\d\.?\d*")


def extract_last_number(text: str) -> float | None:
    """The last number in ``text`` (commas removed), or None if there is none."""
    for match in reversed(_NUMBER.findall(text)):
        try:
            return float(match.replace(",", "").rstrip("."))
        except ValueError:
            continue
    return None


def gold_answer(answer: str) -> float | None:
    """The gold value of a reference answer: the ``#### N`` value, else its last number."""
    if "####" in answer:
        return extract_last_number(answer.rsplit("####", 1)[1])
    return extract_last_number(answer)


def _question_and_gold(record: dict, index: int) -> tuple[str, float | None]:
    if "question" in record and "answer" in record:
        return record["question"], gold_answer(str(record["answer"]))
    if "prompt" in record and "response" in record:
        return record["prompt"], gold_answer(str(record["response"]))
    raise UserError(f"record {index}: accuracy needs question/answer or prompt/response records")


def _stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokenizer's EOS first, then any other end tokens the model's generation config has."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    for i in extra if isinstance(extra, list) else [extra]:
        if i is not None and i not in ids:
            ids.append(i)
    if not ids:
        raise UserError("the tokenizer has no EOS token to stop generation at")
    return ids


@torch.inference_mode()
def gsm_accuracy(
    model: Any,
    tokenizer: Any,
    records: list[dict],
    batch_size: int = 32,
    max_new_tokens: int = 64,
    progress: bool = False,
) -> tuple[float, list[dict]]:
    """Greedy-decode every question and score the last number; returns (accuracy, predictions).

    Each prediction is ``{"question", "gold", "output", "prediction", "correct"}`` in the order
    of ``records``. Prompts are batched by length (less padding); a batch stops as soon as
    every row has produced EOS. ``progress`` shows a progress bar on stderr.
    """
    if not records:
        raise UserError("no records to evaluate")
    items = [_question_and_gold(r, i) for i, r in enumerate(records)]
    prompts = [QA_PROMPT.format(question=q) for q, _ in items]
    lengths = [len(tokenizer(p).input_ids) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    device = next(model.parameters()).device
    eos = _stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    outputs: dict[int, str] = {}
    bar = tqdm(total=len(order), desc="eval", unit="q", disable=not progress, leave=False)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True)
            enc = {k: v.to(device) for k, v in enc.items()}
            generated = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=pad,
                use_cache=True,
            )
            new = generated[:, enc["input_ids"].shape[1] :]
            for i, row in zip(idx, new.tolist(), strict=True):
                outputs[i] = tokenizer.decode(row, skip_special_tokens=True)
            bar.update(len(idx))
    finally:
        bar.close()
        tokenizer.padding_side = side
        model.train(was_training)
    predictions = []
    for i, (question, gold) in enumerate(items):
        value = extract_last_number(outputs[i])
        correct = value is not None and gold is not None and abs(value - gold) < 1e-3
        predictions.append(
            {
                "question": question,
                "gold": gold,
                "output": outputs[i],
                "prediction": value,
                "correct": correct,
            }
        )
    accuracy = sum(p["correct"] for p in predictions) / len(predictions)
    return accuracy, predictions


def heldout_texts(path: str | Path | None = None) -> list[str]:
    """Paragraphs of a plain-text file (default: the bundled held-out sample)."""
    path = Path(path) if path is not None else bundled_path("heldout")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read text file {path}: {err}") from None
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n")]
    return [p for p in paragraphs if p]


# Held-out perplexity is taken over windows of this many tokens whatever length a run trained
# on, so one adapter has one number in the train summary and in `fastmid eval`.
PPL_WINDOW = 256


@torch.inference_mode()
def perplexity(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    max_length: int = PPL_WINDOW,
    batch_size: int = 8,
) -> float:
    """Token-level perplexity of ``model`` on ``texts``, each cut into ``max_length`` chunks."""
    chunks = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True).input_ids
        chunks += [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    chunks = [c for c in chunks if len(c) > 1]
    if not chunks:
        raise UserError("no text to compute perplexity on")

    # Every token but the first is predicted: the targets are the ids, shifted by one.
    examples = [Example(c, [*c[1:], IGNORE_INDEX]) for c in chunks]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return math.exp(answer_nll(model, examples, pad, batch_size))


def heldout_perplexity(model: Any, tokenizer: Any) -> float:
    """The held-out perplexity that ``fastmid train`` and ``fastmid eval`` report: the whole
    bundled held-out sample, in :data:`PPL_WINDOW`-token windows."""
    return perplexity(model, tokenizer, heldout_texts())


def write_predictions(predictions: list[dict], path: str | Path) -> None:
    """Write predictions as JSONL atomically (temp file + rename)."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise UserError(f"output directory does not exist: {path.parent}")
    write_text_atomic(path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))


# --------------------------------------------------------------------------------------------
# Evaluation inside a training run


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
    if not cfg.eval:
        return None
    eval_path = cfg.eval_data
    if eval_path is None and cfg.data is None:
        eval_path = str(bundled_path("test"))
    records = load_records(eval_path, cfg.fields) if eval_path is not None else None
    # The held-out sample is always whole (it is short): one adapter, one perplexity.
    heldout = heldout_texts()
    if cfg.eval_limit is not None and records is not None:
        records = records[: cfg.eval_limit]
    return EvalSet(records, heldout) if records or heldout else None


def split_heldout(cfg: TrainConfig, records: Any) -> tuple[Any, Any]:
    """(training records, held-out loss records): the eval_split_ratio share of ``records``
    held out, else (with eval_every) the eval data; None when no held-out loss is asked for."""
    if cfg.eval_split_ratio > 0:
        return split_records(records, cfg.eval_split_ratio, cfg.seed)
    if not cfg.eval_every:
        return records, None
    eval_path = cfg.eval_data
    if eval_path is None and cfg.data is None:
        eval_path = str(bundled_path("test"))
    if eval_path is None:
        raise UserError("--eval-every needs held-out records: --eval-split-ratio or --eval-data")
    return records, load_records(eval_path, cfg.fields)


@dataclass
class HeldoutLoss:
    """The held-out answer loss, every ``every`` steps and at the last one."""

    examples: list[Example]
    pad_id: int
    every: int

    @classmethod
    def build(
        cls, cfg: TrainConfig, records: Any, tokenizer: Any, cache_dir: Path | None = None
    ) -> HeldoutLoss | None:
        if records is None:
            return None
        examples = tokenize_records(
            records,
            tokenizer,
            fmt=cfg.format,
            max_length=cfg.max_length,
            loss_on="response",
            cache_dir=cache_dir,
        )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return cls(examples, pad, cfg.eval_every)

    def due(self, step: int, total_steps: int) -> bool:
        return step == total_steps or (self.every > 0 and step % self.every == 0)

    def __call__(
        self, model: nn.Module, autocast: Callable[[], contextlib.AbstractContextManager]
    ) -> float:
        with autocast():
            return answer_nll(model, self.examples, self.pad_id)


def evaluate_model(
    model: nn.Module,
    tokenizer: Any,
    eval_set: EvalSet | None,
    cfg: TrainConfig,
    autocast: Callable[[], contextlib.AbstractContextManager],
    tuned: bool = False,
) -> tuple[dict[str, float], list[dict]]:
    """Accuracy and held-out perplexity of ``model`` on ``eval_set``, and its predictions."""

    if eval_set is None:
        return {}, []
    log(f"evaluating the {'tuned' if tuned else 'base'} model on {eval_set.describe()} ...")
    result: dict[str, float] = {}
    predictions: list[dict] = []
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast():
        if eval_set.records:
            acc, predictions = gsm_accuracy(
                model,
                tokenizer,
                eval_set.records,
                batch_size=cfg.eval_batch_size,
                max_new_tokens=cfg.max_new_tokens,
            )
            result["accuracy"] = float(acc)
        if eval_set.heldout:
            ppl = heldout_perplexity(model, tokenizer)
            result["heldout_ppl"] = float(ppl)
    model.train(was_training)
    if not tuned:
        log("before: " + _format_eval(result))
    return result, predictions


def _format_eval(result: dict[str, float]) -> str:
    parts = []
    if "accuracy" in result:
        parts.append(f"accuracy {result['accuracy']:.3f}")
    if "heldout_ppl" in result:
        parts.append(f"held-out ppl {result['heldout_ppl']:.2f}")
    return ", ".join(parts) or "(no eval)"


# --------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fastmid eval``."""
    add_model_argument(parser)
    parser.add_argument(
        "--adapter",
        default=None,
        help="adapter directory (PEFT format) or a `fastmid train` output dir "
        "(default: none, the base model alone)",
    )
    add_data_argument(parser, "test", records="JSONL test records")
    parser.add_argument(
        "--fields",
        default=None,
        help="columns of another record shape: prompt=COL,response=COL, as for fastmid train "
        "(default: none, records have question/answer or prompt/response)",
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="evaluate the first N records (default: all)"
    )
    parser.add_argument(
        "--output", default=None, help="write predictions to this JSONL file (default: not written)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="prompts per batched generation (default: %(default)s)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=64,
        help="greedy tokens per answer (default: %(default)s)",
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "bf16", "fp32"],
        help="compute dtype; auto = bf16 where matmul is native in bf16, else fp32 "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--quantize",
        default="none",
        choices=QUANTIZE_METHODS,
        help="frozen decoder linears stored quantized, as the adapter was trained (default: none)",
    )
    parser.add_argument(
        "--perplexity",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also report perplexity on the bundled held-out text (default: on)",
    )


def _output_dir(args: argparse.Namespace) -> Path | None:
    """The directory ``--output`` writes into (locked while eval runs), or None."""
    if args.output is None:
        return None
    parent = Path(args.output).resolve().parent
    if not parent.is_dir():
        raise UserError(f"output directory does not exist: {Path(args.output).parent}")
    return parent


@holds_output_dir(_output_dir)
def run(args: argparse.Namespace) -> int:
    """``fastmid eval``: print accuracy (and perplexity); optionally write predictions."""
    from fastmid.engine.adapters import load_adapter, resolve_adapter_dir
    from fastmid.engine.models import (
        load_model,
        load_model_blockwise,
        resolve_dtype,
        select_attention,
    )
    from fastmid.engine.quantize import quantize_frozen

    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be positive, got {args.limit}")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise UserError("--batch-size and --max-new-tokens must be positive")
    source = args.data if args.data is not None else bundled_path("test")
    records = load_records(source, args.fields)
    if args.limit is not None:
        records = records[: args.limit]
    adapter = None
    if args.adapter is not None:
        adapter = resolve_adapter_dir(args.adapter)
        if not adapter.is_dir():
            raise UserError(f"adapter directory not found: {args.adapter}")
    dtype = resolve_dtype(args.precision)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quantize == "none":
        model, tokenizer, name = load_model(args.model, dtype=dtype)
        model.to(device)
        if adapter is not None:
            load_adapter(model, adapter)
    else:
        # Each block is loaded, patched and quantized before the next is read.
        model, tokenizer, name, load_block = load_model_blockwise(args.model, dtype, device)
        if adapter is not None:
            load_adapter(model, adapter, args.quantize, load_block)
        else:
            quantize_frozen(model, args.quantize, load_block=load_block)
    # The attention fastmid train evaluates with: the same adapter gets the same numbers.
    select_attention(model)
    evaluated = f"{name} + adapter {adapter}" if adapter is not None else f"{name} (no adapter)"
    print(f"fastmid eval: {evaluated}", flush=True)

    # Adapters keep fp32 weights beside the bf16 base; autocast runs both in the compute dtype.
    def autocast() -> torch.autocast:
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    start = time.perf_counter()
    with autocast():
        accuracy, predictions = gsm_accuracy(
            model,
            tokenizer,
            records,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            progress=True,
        )
    seconds = time.perf_counter() - start
    correct = sum(p["correct"] for p in predictions)
    print(f"accuracy {accuracy:.4f} ({correct}/{len(predictions)}) in {seconds:.1f}s")
    if args.perplexity:
        with autocast():
            ppl = heldout_perplexity(model, tokenizer)
        print(f"held-out perplexity {ppl:.2f}")
    if args.output is not None:
        write_predictions(predictions, args.output)
        print(f"predictions written to {args.output}")
    return 0
