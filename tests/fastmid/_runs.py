"""Tiny training runs shared by the trainer, CLI and multi-process tests: a small model
directory with its own tokenizer, arithmetic records, and one set of run settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fastmid.recipe.config import TrainConfig, build_config, config_fields
from tests.fastmid._tiny import tiny_model

# Short arithmetic records: a tiny model can visibly learn them in a few steps.
RECORDS = [
    {"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}. #### {a + b}"}
    for a in range(1, 9)
    for b in range(1, 5)
]


def make_tokenizer(texts: list[str]):
    """A small byte-level BPE tokenizer trained on ``texts`` (no downloads, milliseconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def make_model_dir(root: Path, num_layers: int = 10, **overrides: Any) -> Path:
    """A tiny Llama (hidden 64, ``num_layers`` blocks; config ``overrides``) with its
    tokenizer, saved as an HF dir."""
    texts = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in RECORDS]
    tokenizer = make_tokenizer(texts)
    # A wide init lets a rank-8 adapter move the (frozen, random) LM head's logits far.
    model = tiny_model(
        "llama",
        num_layers,
        vocab_size=len(tokenizer),
        pad_token_id=0,
        initializer_range=0.2,
        **overrides,
    )
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = None
    path = root / "tiny-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def tiny_settings(model_dir: Path | str, data: Path | str, out: Path | str, **over: Any) -> dict:
    """``fastmid train`` settings of a short fp32 run on the tiny model (a flat config dict)."""
    values: dict[str, Any] = dict(
        model=str(model_dir),
        data=str(data),
        output_dir=str(out),
        precision="fp32",
        band="0.2,0.8",
        rank=8,
        alpha=16.0,
        lr=1e-2,
        batch_tokens=256,
        grad_accum=1,
        max_length=64,
        max_steps=8,
        warmup_steps=1,
        eval=False,
        log_every=1,
    )
    values.update(over)
    return values


def tiny_cfg(model_dir: Path | str, data: Path | str, out: Path | str, **over: Any) -> TrainConfig:
    """:func:`tiny_settings` as a validated config."""
    return build_config(None, tiny_settings(model_dir, data, out, **over))


def as_flags(settings: dict[str, Any]) -> list[str]:
    """The ``fastmid train`` command-line flags that give ``settings``."""
    defaults = {f.name: f.default for f in config_fields()}
    flags: list[str] = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            # A switch is given only against its default: --x (off by default), --no-x.
            if value != defaults[key]:
                flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags


def metrics(out: Path) -> list[dict]:
    """The records of ``out/metrics.jsonl``."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[float]:
    """The logged losses of a run, in order."""
    return [m["loss"] for m in metrics(out)]


def assert_adapters_close_after_adam(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float = 1e-4
) -> None:
    """Adapters after several AdamW steps on 2 ranks against 1. Adam moves a weight by about
    ±lr whatever the size of its gradient, so the odd element whose gradient is rounding noise
    (2 ranks sum in another order) lands up to ~1e-3 of the tensor's largest entry away (seen:
    1.1e-4 of 0.139); the losses, compared at 1e-5, pin the arithmetic."""
    assert got.keys() == want.keys()
    for name, want_t in want.items():
        atol = 5e-3 * float(want_t.abs().max())
        torch.testing.assert_close(got[name], want_t, rtol=rtol, atol=atol, msg=name)
