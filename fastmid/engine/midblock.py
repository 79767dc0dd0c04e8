"""Mid-Block patching: LoRA adapters inside a depth band, everything else frozen and skipped.

``apply_midblock(model, cfg)`` turns a Hugging Face causal LM into a Mid-Block model in place:

- the decoder blocks are found by one generic walk (any ``nn.ModuleList`` holding
  ``config.num_hidden_layers`` blocks), so Llama, Mistral, Qwen2/3, OLMo2 and Gemma2 share
  one code path;
- in the band, every target ``nn.Linear`` becomes a :class:`~fastmid.engine.lora.LoraLinear`
  backed by ``fastmid.kernels`` (it takes over the frozen weight and bias, nothing is copied);
- when q, k and v are all targets their frozen weights are concatenated once and the three
  modules' weights become views into that matrix, so one ``lora_qkv`` call serves the three
  projections; a SwiGLU MLP whose gate and up are targets runs ``lora_gate_up`` then ``down``;
- every other parameter is frozen, the embeddings and the blocks below the band run under
  ``torch.no_grad()`` (nothing saved for backward, no backward), and the blocks above the band
  only propagate input gradients because they own no trainable parameter.

Everything is patched on module *instances*; the model's classes are never touched. This module
decides what goes where; the pieces it places sit below it: the LoRA layers and fused groups
(:mod:`fastmid.engine.lora`), finding blocks and wrapping forwards (:mod:`fastmid.engine.blocks`),
Liger, quantization, the label-only loss and compilation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastmid.engine.blocks import find_layers_with_path, set_submodule, unwrap_forward, wrap_forward
from fastmid.engine.compile import COMPILE_MODES, compile_blocks, resolve_compile
from fastmid.engine.liger import apply_liger_to_frozen
from fastmid.engine.lora import DropoutSeed, LoraLinear, fuse_gate_up, fuse_qkv, unfuse
from fastmid.engine.loss import install_label_only_loss
from fastmid.engine.quantize import (
    QUANTIZE_METHODS,
    check_quantizable,
    quantize_block,
    quantized_method,
    set_quantized_method,
)
from fastmid.errors import UserError

# A band: (lo, hi) fractions of depth, "all", explicit layer indices, or "auto" (probe runs pick).
Band = tuple[float, float] | str | list[int]

KNOWN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# The paper's setting (arXiv 2604.11838): LoRA on q/k/v/o of the 20%-80% depth band, alpha 128,
# dropout 0.05, rank budget-matched to uniform LoRA of rank 64 on every layer.
PAPER_BAND = (0.2, 0.8)
PAPER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
PAPER_ALPHA = 128.0
PAPER_DROPOUT = 0.05
PAPER_RANK_BUDGET = 64


@dataclass
class MidBlockConfig:
    """Where and how to place LoRA adapters. The defaults are the paper's setting.

    Each field's ``help`` is its documentation, the ``fastmid train`` flag's help and the
    config file's meaning at once.
    """

    band: Band = field(
        default=PAPER_BAND,
        metadata={
            "help": "depth band: 0.2,0.8 (fractions, layers [floor(lo*L), floor(hi*L))) | "
            "all | 6-23 | 3,5,7 | auto (short probe runs of candidate windows pick it)",
            "group": "mid-block LoRA",
        },
    )
    targets: tuple[str, ...] = field(
        default=PAPER_TARGETS,
        metadata={"help": f"comma-separated linear layers of a block: {','.join(KNOWN_TARGETS)}"},
    )
    rank: int | None = field(
        default=None,
        metadata={"help": "LoRA rank of the adapted layers; default: budget-matched"},
    )
    rank_budget: int = field(
        default=PAPER_RANK_BUDGET,
        metadata={
            "help": "budget matching: rank = floor(rank_budget * L / n_active), the parameter "
            "count of uniform LoRA of this rank on all L layers"
        },
    )
    alpha: float = field(
        default=PAPER_ALPHA,
        metadata={"help": "LoRA alpha; scale = alpha / rank (alpha / sqrt(rank) with rsLoRA)"},
    )
    dropout: float = field(
        default=PAPER_DROPOUT,
        metadata={"help": "dropout on the adapter input (the frozen path never sees it)"},
    )
    use_rslora: bool = field(
        default=False, metadata={"help": "rank-stabilised scale alpha / sqrt(rank)"}
    )
    fuse_groups: bool = field(
        default=True,
        metadata={"help": "one kernel call for q/k/v and for gate/up when all are targets"},
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "recompute the band and the blocks above it in backward"},
    )
    gate_up_recompute: bool = field(
        default=False,
        metadata={
            "help": "memory mode of a fused SwiGLU MLP: backward recomputes gate and up (one "
            "more GEMM of the forward's size) instead of keeping them from forward"
        },
    )
    use_liger: bool = field(
        default=True,
        metadata={
            "help": "Liger's RMSNorm and SiLU-mul kernels in the frozen blocks (CUDA with "
            "liger_kernel installed; ignored otherwise)"
        },
    )
    quantize: str = field(
        default="none",
        metadata={
            "help": "frozen linears of every decoder block stored quantized: nf4 (4-bit "
            "NormalFloat, QLoRA's), int8 (per-channel) or none; adapters stay fp32",
            "choices": QUANTIZE_METHODS,
        },
    )
    compile: str = field(
        default="off",
        metadata={
            "help": "torch.compile every decoder block (dynamic shapes, so packed batches of "
            "new lengths reuse the graphs); auto = on CPU when dropout is 0",
            "choices": COMPILE_MODES,
        },
    )

    def validate(self) -> MidBlockConfig:
        """Check every field that does not depend on the model; UserError names the first bad
        one. Returns self. The band and rank are checked against the model when patching."""
        if self.band != "auto":
            check_band(self.band)
        if isinstance(self.targets, str) or not self.targets:
            raise UserError("targets must name at least one linear layer, e.g. q_proj,v_proj")
        unknown = [t for t in self.targets if t not in KNOWN_TARGETS]
        if unknown:
            raise UserError(f"unknown target {unknown[0]!r}; known: {', '.join(KNOWN_TARGETS)}")
        if len(set(self.targets)) != len(self.targets):
            raise UserError(f"targets list a module twice: {','.join(self.targets)}")
        if self.rank is not None:
            _positive_int("rank", self.rank)
        _positive_int("rank_budget", self.rank_budget)
        if not self.alpha > 0:
            raise UserError(f"alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.compile not in COMPILE_MODES:
            raise UserError(
                f"compile must be one of {'|'.join(COMPILE_MODES)}, got {self.compile!r}"
            )
        if self.quantize not in QUANTIZE_METHODS:
            raise UserError(
                f"quantize must be one of {'|'.join(QUANTIZE_METHODS)}, got {self.quantize!r}"
            )
        return self


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class MidBlockState:
    """What apply_midblock did, stored on the model as ``model.fastmid_state``."""

    layers: list[int]
    rank: int
    num_layers: int
    targets: tuple[str, ...]
    alpha: float
    dropout: float
    scale: float
    config: MidBlockConfig
    # Dotted path of the decoder-block list inside the model, e.g. "model.layers".
    layers_path: str = "model.layers"
    # Module paths (relative to the model) of every LoraLinear, in layer order.
    module_paths: list[str] = field(default_factory=list)
    # Set when the budget-matched rank was wider than a target and was clamped to it.
    rank_note: str | None = None


# --------------------------------------------------------------------------------------------
# Band and rank


def _fraction(value: Any, what: str) -> Fraction:
    """Exact fraction from the decimal a user wrote: 0.6 is 3/5, so 0.6 * 10 is exactly 6."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Fraction)):
        raise UserError(f"band {what} must be a number in [0, 1], got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"band {what} must be a number in [0, 1], got {value!r}")
    frac = Fraction(repr(value)) if isinstance(value, float) else Fraction(value)
    if not 0 <= frac <= 1:
        raise UserError(f"band {what} must be in [0, 1], got {value}")
    return frac


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
        return sorted({int(p) for p in parts})
    if len(parts) == 2 and all(re.fullmatch(r"\d*\.?\d+", p) for p in parts):
        lo_f, hi_f = float(parts[0]), float(parts[1])
        if not 0.0 <= lo_f < hi_f <= 1.0:
            raise UserError(f"band {band!r}: fractions must satisfy 0 <= start < end <= 1")
        return (lo_f, hi_f)
    raise UserError(
        f"band {band!r} is not one of: 0.2,0.8 (fractions) | all | auto | 6-23 | 3,5,7 (layers)"
    )


def format_band(band: Band) -> str:
    """The spec :func:`parse_band` reads back as ``band``: (0.2, 0.8) → "0.2,0.8"."""
    if isinstance(band, str):
        return band
    if isinstance(band, tuple):
        return ",".join(f"{float(x):g}" for x in band)
    return ",".join(str(i) for i in band)


def _is_pair(band: Band) -> bool:
    # A tuple is always (lo, hi); so is a two-element list holding a float (YAML has no tuple).
    return isinstance(band, tuple) or (
        isinstance(band, list) and len(band) == 2 and any(isinstance(b, float) for b in band)
    )


def check_band(band: Band) -> None:
    """Reject a band that is malformed whatever the model (UserError, one line)."""
    usage = "band must be (lo, hi) fractions, a list of layer indices or 'all'"
    if isinstance(band, str):
        if band != "all":
            raise UserError(f"{usage}, got {band!r}")
    elif _is_pair(band):
        if len(band) != 2:
            raise UserError(f"{usage}, got {band!r}")
        if _fraction(band[0], "start") >= _fraction(band[1], "end"):
            raise UserError(f"band start must be below its end, got ({band[0]}, {band[1]})")
    elif isinstance(band, list):
        if not band:
            raise UserError("band is an empty list of layers")
        bad = [i for i in band if isinstance(i, bool) or not isinstance(i, int)]
        if bad:
            raise UserError(f"band layer indices must be integers, got {bad[0]!r}")
        if any(i < 0 for i in band):
            raise UserError(f"band layer {min(band)} is negative")
        if len(set(band)) != len(band):
            raise UserError(f"band lists a layer twice: {band}")
    else:
        raise UserError(f"{usage}, got {band!r}")


def resolve_band(band: Band, num_layers: int) -> list[int]:
    """Layer indices adapted for ``band`` in a model with ``num_layers`` decoder blocks.

    ``(lo, hi)`` gives ``[floor(lo*L), floor(hi*L))`` (L=32, (0.2, 0.8) -> 6..24);
    ``"all"`` gives every layer; a list of ints is checked and returned sorted.
    """
    if num_layers <= 0:
        raise UserError(f"model has no decoder layers (num_layers={num_layers})")
    check_band(band)
    if isinstance(band, str):
        return list(range(num_layers))
    if _is_pair(band):
        lo, hi = _fraction(band[0], "start"), _fraction(band[1], "end")
        layers = list(range(math.floor(lo * num_layers), math.floor(hi * num_layers)))
        if not layers:
            raise UserError(
                f"band ({band[0]}, {band[1]}) selects no layer of a {num_layers}-layer model"
            )
        return layers
    out = [i for i in band if i >= num_layers]
    if out:
        raise UserError(f"band layer {out[0]} is outside the layers 0..{num_layers - 1}")
    return sorted(band)


def resolve_rank(rank: int | None, rank_budget: int, num_layers: int, num_active: int) -> int:
    """Explicit ``rank``, or the budget-matched ``floor(rank_budget * L / n_active)``."""
    if rank is None:
        _positive_int("rank_budget", rank_budget)
        rank = (rank_budget * num_layers) // num_active
    _positive_int("rank", rank)
    return rank


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """LoRA output scale: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return float(alpha) / (math.sqrt(rank) if use_rslora else rank)


# --------------------------------------------------------------------------------------------
# Finding the decoder blocks


def _linear_names(block: nn.Module) -> list[str]:
    return [n for n, m in block.named_modules() if isinstance(m, (nn.Linear, LoraLinear))]


def _find_target(block: nn.Module, target: str) -> str | None:
    """Path inside ``block`` of the linear named ``target`` (e.g. 'self_attn.q_proj')."""
    hits = [n for n in _linear_names(block) if n == target or n.endswith("." + target)]
    if len(hits) > 1:
        raise UserError(f"target {target!r} is ambiguous in {type(block).__name__}: {hits}")
    return hits[0] if hits else None


# --------------------------------------------------------------------------------------------
# The LoRA module


# --------------------------------------------------------------------------------------------
# Instance-level forward wrappers


def _no_grad_forward(module: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return forward(*args, **kwargs)

    return run


_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")


def _checkpointed_forward(module: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
    seeds = next((m._seeds for m in module.modules() if isinstance(m, LoraLinear)), None)

    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        # The recomputation would append this block's keys and values to a KV cache a second
        # time; a cache has no use in a training step, so it is left out (as HF does). The
        # argument was renamed across transformers releases (`cache` from 5.24 on).
        for name in _CACHE_KWARGS:
            if kwargs.get(name) is not None:
                kwargs[name] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        if seeds is None:
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        seed = seeds.current

        def replay(*a: Any, **kw: Any) -> Any:
            # The recomputation draws the forward's dropout masks: the seed it saw.
            outer, seeds.current = seeds.current, seed
            try:
                return forward(*a, **kw)
            finally:
                seeds.current = outer

        return checkpoint(replay, *args, use_reentrant=False, **kwargs)

    return run


# --------------------------------------------------------------------------------------------
# Patching


def apply_midblock(
    model: nn.Module,
    cfg: MidBlockConfig | None = None,
    *,
    load_block: Callable[[int], None] | None = None,
) -> nn.Module:
    """Patch ``model`` in place into a Mid-Block model (see the module docstring); returns it.

    The blocks are patched (and, with ``cfg.quantize``, quantized) one at a time, bottom up.
    ``load_block(i)``, when given, is called just before block ``i`` is: a model whose blocks
    are still on the meta device (:func:`fastmid.engine.models.load_model_blockwise`) then
    never holds more than one block in full precision.
    """
    cfg = cfg or MidBlockConfig()
    if getattr(model, "fastmid_state", None) is not None:
        raise UserError("model is already patched by apply_midblock")
    if quantized_method(model) != "none":
        raise UserError("patch the model before quantizing it (MidBlockConfig(quantize=...))")
    cfg.validate()
    layers_path, blocks = find_layers_with_path(model)
    num_layers = len(blocks)
    layers = resolve_band(cfg.band, num_layers)
    rank = resolve_rank(cfg.rank, cfg.rank_budget, num_layers, len(layers))

    # Locate every target first so that a bad config fails before anything is modified.
    found: dict[int, dict[str, str]] = {}
    # (width, layer, target, shape): no module reference, which would keep the weight that
    # block-by-block loading later puts in it alive past its quantization.
    narrowest: tuple[int, int, str, str] | None = None
    for i in layers:
        paths = {t: _find_target(blocks[i], t) for t in cfg.targets}
        missing = [t for t, p in paths.items() if p is None]
        if missing:
            raise UserError(
                f"target {missing[0]!r} not found in layer {i} ({type(blocks[i]).__name__}); "
                f"its linear layers: {', '.join(_linear_names(blocks[i])) or 'none'}"
            )
        for t, p in paths.items():
            lin = blocks[i].get_submodule(p)
            if isinstance(lin, LoraLinear):
                raise UserError(f"layer {i} {t} already has an adapter")
            if narrowest is None or min(lin.in_features, lin.out_features) < narrowest[0]:
                dims = f"{lin.out_features}x{lin.in_features}"
                narrowest = (min(lin.in_features, lin.out_features), i, t, dims)
        found[i] = paths  # type: ignore[assignment]
    del lin  # the loop's last module, likewise
    width, i, t, dims = narrowest
    rank_note = None
    if rank > width:
        shape = f"{t} of layer {i} ({dims})"
        if cfg.rank is not None:
            raise UserError(f"rank {rank} is larger than {shape}; use rank <= {width}")
        # A derived rank must never fail on a valid model: the budget asks for more than the
        # layer can hold, so the adapter takes the full width.
        rank_note = f"rank {rank} from the budget is wider than {shape}; using rank {width}"
        rank = width
    check_quantizable(model, cfg.quantize)

    for p in model.parameters():
        p.requires_grad_(False)

    scale = lora_scale(cfg.alpha, rank, cfg.use_rslora)
    module_paths: list[str] = []
    band = set(layers)
    seeds: DropoutSeed | None = None
    for i, block in enumerate(blocks):
        if load_block is not None:
            load_block(i)
        if i in band:
            mods: dict[str, LoraLinear] = {}
            for j, (t, p) in enumerate(found[i].items()):
                lora = LoraLinear(block.get_submodule(p), rank, scale, cfg.dropout, name=t)
                set_submodule(block, p, lora)
                seeds = seeds or DropoutSeed(lora.lora_A)
                # One offset per adapter of the model: every layer's mask differs.
                lora.seed_offset, lora._seeds = i * len(cfg.targets) + j, seeds
                mods[t] = lora
                module_paths.append(f"{layers_path}.{i}.{p}")
            if cfg.fuse_groups:
                fuse_qkv(mods)
                fuse_gate_up(block, found[i], mods, cfg.gate_up_recompute)
        elif cfg.use_liger:
            # Before quantizing: Liger's MLP runs only on plain linears.
            apply_liger_to_frozen([block])
        # Quantizing each block as soon as it is patched frees its full-precision weights
        # before the next block is loaded.
        quantize_block(i, block, cfg.quantize)
    if cfg.dropout > 0 and seeds is not None:
        # The one seed per micro-batch: drawn before any block runs.
        model.register_forward_pre_hook(seeds.draw)

    # Below the band: no autograd at all. The embeddings are frozen, so their output already
    # needs no grad; wrapping the blocks also guards against inputs that do require grad.
    for i in range(layers[0]):
        wrap_forward(blocks[i], _no_grad_forward)
    if cfg.gradient_checkpointing:
        for i in range(layers[0], num_layers):
            wrap_forward(blocks[i], _checkpointed_forward)
    # model(input_ids=..., labels=...) applies the LM head only where a label exists.
    install_label_only_loss(model, wrap_forward)
    if resolve_compile(cfg.compile, next(model.parameters()).device, cfg.dropout):
        compile_blocks(blocks)

    model.fastmid_state = MidBlockState(
        layers=layers,
        rank=rank,
        num_layers=num_layers,
        targets=tuple(cfg.targets),
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        scale=scale,
        config=cfg,
        layers_path=layers_path,
        module_paths=module_paths,
        rank_note=rank_note,
    )
    if cfg.quantize != "none":
        set_quantized_method(model, cfg.quantize)
    return model


def unpatch_forwards(model: nn.Module) -> None:
    """Remove every instance-level forward wrapper apply_midblock installed."""
    for module in model.modules():
        unwrap_forward(module)
        unfuse(module)
    # Found by its owner, not by a stored handle: a deep copy's handle would name the original.
    for key, hook in list(model._forward_pre_hooks.items()):
        if isinstance(getattr(hook, "__self__", None), DropoutSeed):
            del model._forward_pre_hooks[key]


# --------------------------------------------------------------------------------------------
# Queries


def lora_modules(model: nn.Module) -> Iterator[tuple[int, str, LoraLinear]]:
    """(layer index, target name, module) for every adapter, in layer order."""
    state = midblock_state(model)
    blocks = model.get_submodule(state.layers_path)
    for i in state.layers:
        for name, module in blocks[i].named_modules():
            if isinstance(module, LoraLinear):
                yield i, name.rpartition(".")[2], module


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Exactly the trainable parameters: every lora_A and lora_B, in layer order."""
    return [p for _, _, m in lora_modules(model) for p in (m.lora_A, m.lora_B)]


def midblock_state(model: nn.Module) -> MidBlockState:
    """What apply_midblock did to ``model``; UserError when it was never patched."""
    state = getattr(model, "fastmid_state", None)
    if state is None:
        raise UserError("model is not patched; call fastmid.apply_midblock(model, cfg) first")
    return state
