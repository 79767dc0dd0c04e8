"""Shared setup for every benchmark: the base model, identical data, and the three providers.

Providers (all train the same examples, in the same order, with AdamW at the paper's lr):

- ``peft_all``   standard LoRA as the paper's baseline runs it: PEFT ``LoraConfig`` with the
  paper's rank, alpha, dropout and q/k/v/o targets (``fastmid.engine.midblock.PAPER_*``) on every
  layer, right-padded
  batches (HF's usual collator), loss on every non-pad token through ``model(labels=...)``;
- ``peft_all_gc`` the same with non-reentrant gradient checkpointing, as PEFT users enable it;
- ``peft_mid``   PEFT on fastmid's band with the budget-matched rank (``layers_to_transform``),
  padded batches, loss on every token: what the band alone gives with stock kernels;
- ``fastmid``    ``fastmid.engine.models.prepare_model`` (the trainer's own patching and attention
  choice) + the trainer's packing (one row, positions restarting per example) + the trainer's
  loss (LM head only where a label exists, the trainer's ``loss_on``).

Precision ``fp32`` runs everything in fp32. ``bf16`` is mixed precision the way PEFT users run
it: frozen weights cast to bf16, adapters and optimizer state in fp32, the step under
``torch.autocast(bf16)``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fastmid.engine.loss import IGNORE_INDEX
from fastmid.engine.midblock import (
    PAPER_ALPHA,
    PAPER_BAND,
    PAPER_DROPOUT,
    PAPER_RANK_BUDGET,
    PAPER_TARGETS,
    MidBlockConfig,
    adapter_parameters,
    resolve_band,
    resolve_rank,
)
from fastmid.engine.models import DTYPES, prepare_model
from fastmid.errors import UserError
from fastmid.recipe.config import PAPER_LR
from fastmid.recipe.data import (
    Example,
    batch_to,
    bundled_path,
    collate_packed,
    collate_padded,
    load_records,
    pack_batches,
    tokenize_records,
)


@dataclass(frozen=True)
class ProviderSpec:
    """What a provider is, before any model is built: its name, what it runs, and how it
    batches a step (``packed``: one row of whole examples with no pad, as fastmid's trainer
    does; otherwise right-padded ``(B, T)`` as HF's collator does)."""

    name: str
    description: str
    packed: bool
    # Provider whose useful-FLOP count this one shares: gradient checkpointing recomputes the
    # forward, and recomputed FLOPs are not useful work.
    useful_twin: str | None = None

    def step_shape(self, rows: int, row_tokens: int) -> tuple[int, int]:
        """(B, T) of a step of ``rows`` sequences of ``row_tokens`` tokens in this layout."""
        return (1, rows * row_tokens) if self.packed else (rows, row_tokens)

    def shape(self, workload: Workload, step: int) -> str:
        """ "BxT" of step ``step`` of ``workload`` as this provider executes it."""
        b, t = (1, workload.real_tokens(step)) if self.packed else workload.padded_shape(step)
        return f"{b}x{t}"

    def executed_tokens(self, workload: Workload, step: int) -> int:
        """Positions this provider computes for step ``step`` (real tokens plus its pads)."""
        b, t = (1, workload.real_tokens(step)) if self.packed else workload.padded_shape(step)
        return b * t


SPECS = {
    s.name: s
    for s in (
        ProviderSpec(
            "peft_all",
            "PEFT LoRA r=64 on q/k/v/o of every layer, padded, loss on all tokens",
            packed=False,
        ),
        ProviderSpec(
            "peft_all_gc",
            "peft_all + non-reentrant gradient checkpointing",
            packed=False,
            useful_twin="peft_all",
        ),
        ProviderSpec(
            "peft_mid",
            "PEFT LoRA on the same band, budget-matched rank, padded, loss on all tokens",
            packed=False,
        ),
        ProviderSpec(
            "fastmid",
            "prepare_model (as fastmid train) + packing + label-only LM head",
            packed=True,
        ),
    )
}
PROVIDERS = tuple(SPECS)
# Every ratio in the reports is against this provider (standard LoRA).
REFERENCE = "peft_all"
# Band placements of the sweep: three of the five 20% depth segments, or every layer.
BANDS: dict[str, Any] = {
    "bottom": (0.0, 0.6),
    "middle": PAPER_BAND,
    "top": (0.4, 1.0),
    "all": "all",
}


def device() -> torch.device:
    """CUDA when present, else CPU: every provider runs on the same device."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------------------------
# Base model


def tiny_config(vocab_size: int) -> Any:
    """A 10-layer, 128-wide Llama (SmolLM2's family) for quick runs; random init, no download."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=10,
        # head_dim 64: k/v projections stay 128 wide, enough for the band's budget rank 106.
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )


def load_base(quick: bool) -> tuple[nn.Module, Any, str]:
    """(fp32 model on CPU in train mode, tokenizer, name): the embedded SmolLM2, or a tiny twin.

    ``quick`` keeps the embedded tokenizer (so the data is the real token stream) but swaps the
    135M model for :func:`tiny_config` so the whole machinery runs in seconds.
    """
    from fastmid.engine.models import default_model_dir, load_model

    if not quick:
        model, tokenizer, name = load_model(None, dtype=torch.float32)
        return model.train(), tokenizer, name
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir()))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(len(tokenizer)), dtype=torch.float32)
    return model.train(), tokenizer, "tiny-llama-10L-128"


# --------------------------------------------------------------------------------------------
# Data: one tokenization, one grouping, two collations


@dataclass
class Workload:
    """Identical data for every provider: the same examples grouped into the same steps."""

    examples: list[Example]
    # Example indices of each benchmarked step (whole examples, token budget per step).
    groups: list[list[int]]
    pad_id: int
    # Non-pad tokens of the whole training split: the size of one epoch.
    epoch_tokens: int
    max_length: int
    batch_tokens: int
    loss_on: str
    extra: dict[str, Any] = field(default_factory=dict)

    def step_examples(self, i: int) -> list[Example]:
        return [self.examples[j] for j in self.groups[i % len(self.groups)]]

    def real_tokens(self, i: int) -> int:
        return sum(len(e) for e in self.step_examples(i))

    def padded_shape(self, i: int) -> tuple[int, int]:
        exs = self.step_examples(i)
        return len(exs), max(len(e) for e in exs)


def make_workload(
    tokenizer: Any,
    num_steps: int,
    batch_tokens: int = 1024,
    max_length: int | None = None,
    loss_on: str | None = None,
    seed: int = 0,
) -> Workload:
    """Tokenize the bundled train split with the trainer's defaults and pick ``num_steps`` steps.

    Steps are the trainer's own packing bins (``pack_batches``, token budget ``batch_tokens``);
    the PEFT providers pad the same examples, so every provider sees identical real tokens.
    """
    from fastmid.recipe.config import TrainConfig

    defaults = TrainConfig()
    max_length = max_length or defaults.max_length
    loss_on = loss_on or defaults.loss_on
    records = load_records(bundled_path("train"))
    examples = tokenize_records(
        records, tokenizer, fmt="qa", max_length=max_length, loss_on=loss_on
    )
    bins = pack_batches(examples, max_tokens=batch_tokens, seed=seed, shuffle=True)
    # Skip the first-fit tail bins that hold a few leftovers: a step is a full token budget.
    full = [b for b in bins if sum(len(examples[i]) for i in b) >= 0.9 * batch_tokens]
    groups = (full or bins)[:num_steps]
    if len(groups) < num_steps:
        raise UserError(f"the bundled data gives only {len(groups)} steps of {batch_tokens} tokens")
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    return Workload(
        examples=examples,
        groups=groups,
        pad_id=pad_id,
        epoch_tokens=sum(len(e) for e in examples),
        max_length=max_length,
        batch_tokens=batch_tokens,
        loss_on=loss_on,
    )


def padded_batch(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """HF-collator batch: right-padded ids, attention mask, labels = ids with pads ignored."""
    b = collate_padded(examples, pad_id)
    labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, IGNORE_INDEX)
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": labels}


def packed_batch(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """The trainer's batch: one packed row, positions restarting per example, shifted targets."""
    del pad_id
    return collate_packed(examples)


# --------------------------------------------------------------------------------------------
# Providers


def _peft_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch, use_cache=False).loss


def _fastmid_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from fastmid.engine.loss import forward_loss

    loss_sum, n_tokens = forward_loss(model, batch)
    return loss_sum / max(n_tokens, 1)


@dataclass
class Provider:
    """A model set up one way, its optimizer, and how it batches and computes the loss."""

    name: str
    spec: ProviderSpec
    dtype: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    collate: Callable[[list[Example], int], dict[str, torch.Tensor]]
    # Layers that carry adapters and their rank, for the report.
    layers: list[int]
    rank: int
    device: torch.device

    @property
    def packed(self) -> bool:
        return self.spec.packed

    def shape(self, workload: Workload, step: int) -> str:
        return self.spec.shape(workload, step)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def batch(self, examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
        return batch_to(self.collate(examples, pad_id), self.device)

    def forward_backward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Loss and backward (gradients left in place)."""
        with self.autocast():
            loss = self.loss_fn(self.model, batch)
        loss.backward()
        return loss.detach()

    def train_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One full optimizer step: forward, backward, AdamW update, gradients released."""
        loss = self.forward_backward(batch)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


def peft_model(base: nn.Module, rank: int, layers: list[int] | None, gc: bool) -> nn.Module:
    """PEFT LoRA as its users set it up (the paper's targets, alpha and dropout), optionally on
    `layers` only and with non-reentrant gradient checkpointing."""
    from peft import LoraConfig, get_peft_model

    if gc:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = LoraConfig(
        r=rank,
        lora_alpha=PAPER_ALPHA,
        lora_dropout=PAPER_DROPOUT,
        target_modules=list(PAPER_TARGETS),
        layers_to_transform=layers,
        bias="none",
        task_type="CAUSAL_LM",
    )
    # PEFT keeps the adapters in fp32 over a bf16 base (autocast_adapter_dtype, its default).
    return get_peft_model(base, cfg)


def build_provider(
    name: str,
    base: nn.Module,
    dtype: str = "fp32",
    band: Any = PAPER_BAND,
    seed: int = 0,
    inplace: bool = False,
    on: str | None = None,
    compile: str = "off",
) -> Provider:
    """``base`` set up as provider ``name`` in precision ``dtype``.

    A deep copy unless ``inplace`` (then ``base`` itself is patched: used where one process
    measures one provider and a second copy of the weights would distort its memory). ``on``
    overrides the device (FLOPs are counted on CPU, where every op is visible to torch).
    ``compile`` is fastmid's ``MidBlockConfig.compile`` (the providers compare eager blocks;
    the ``compile`` workload sets it).
    """
    spec = SPECS.get(name)
    if spec is None:
        raise UserError(f"unknown provider {name!r}; expected one of {', '.join(PROVIDERS)}")
    if dtype not in DTYPES:
        raise UserError(f"unknown precision {dtype!r}; expected one of {', '.join(DTYPES)}")
    torch.manual_seed(seed)
    dev = torch.device(on) if on else device()
    model = (base if inplace else copy.deepcopy(base)).to(device=dev, dtype=DTYPES[dtype]).train()
    num_layers = model.config.num_hidden_layers
    if spec.packed:
        # Set up exactly as fastmid train does (patch, attention for packed rows).
        state = prepare_model(model, MidBlockConfig(band=band, compile=compile), dev)
        params = adapter_parameters(model)
        layers, rank, loss_fn, collate = state.layers, state.rank, _fastmid_loss, packed_batch
    else:
        if name == "peft_mid":
            layers = resolve_band(band, num_layers)
            rank = resolve_rank(None, PAPER_RANK_BUDGET, num_layers, len(layers))
            model = peft_model(model, rank, layers, gc=False)
        else:
            layers, rank = list(range(num_layers)), PAPER_RANK_BUDGET
            model = peft_model(model, rank, None, gc=name == "peft_all_gc")
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        loss_fn, collate = _peft_loss, padded_batch
    optimizer = torch.optim.AdamW(params, lr=PAPER_LR)
    return Provider(name, spec, dtype, model, optimizer, loss_fn, collate, list(layers), rank, dev)
