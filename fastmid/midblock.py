"""Mid-Block patching: LoRA adapters inside a depth band, everything else frozen and skipped.

``apply_midblock(model, cfg)`` turns a Hugging Face causal LM into a Mid-Block model in place:

- the decoder blocks are found by one generic walk (any ``nn.ModuleList`` holding
  ``config.num_hidden_layers`` blocks), so Llama, Mistral, Qwen2/3, OLMo2 and Gemma2 share
  one code path;
- in the band, every target ``nn.Linear`` becomes a :class:`LoraLinear` backed by
  ``fastmid.kernels`` (it takes over the frozen weight and bias, nothing is copied);
- when q, k and v are all targets their frozen weights are concatenated once and the three
  modules' weights become views into that matrix, so one ``lora_qkv`` call serves the three
  projections; a SwiGLU MLP whose gate and up are targets runs ``lora_gate_up`` then ``down``;
- every other parameter is frozen, the embeddings and the blocks below the band run under
  ``torch.no_grad()`` (nothing saved for backward, no backward), and the blocks above the band
  only propagate input gradients because they own no trainable parameter.

Everything is patched on module *instances*; the model's classes are never touched.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastmid import kernels
from fastmid.compile import COMPILE_MODES, compile_blocks, resolve_compile
from fastmid.errors import UserError
from fastmid.loss import install_label_only_loss

# A band: (lo, hi) fractions of depth, "all", explicit layer indices, or "auto" (probe runs pick).
Band = tuple[float, float] | str | list[int]

KNOWN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QKV = ("q_proj", "k_proj", "v_proj")

# Instance attribute names used to remember what a patch replaced, so merge() can undo it.
_ORIG_FORWARD = "_fastmid_orig_forward"
# The concatenated frozen [W_gate; W_up] of a fused SwiGLU MLP (a plain attribute: gate and up
# already own the matrix, as views).
_GATE_UP_WEIGHT = "_fastmid_gate_up_weight"


# The paper's setting (arXiv 2604.11838): LoRA on q/k/v/o of the 20%-80% depth band, alpha 128,
# dropout 0.05, rank budget-matched to uniform LoRA of rank 64 on every layer.
PAPER_BAND = (0.2, 0.8)
PAPER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
PAPER_ALPHA = 128.0
PAPER_DROPOUT = 0.05
PAPER_RANK_BUDGET = 64
# How quantize_frozen may store the frozen linears (fastmid.quantize).
QUANTIZE_METHODS = ("none", "nf4", "int8")


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


def _num_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "num_hidden_layers", None)


def find_layers_with_path(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, list) of the decoder blocks: the ModuleList of num_hidden_layers same-class blocks."""
    expected = _num_layers(model)
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    for name, mlist in lists:
        if (expected is None or len(mlist) == expected) and len({type(b) for b in mlist}) == 1:
            return name, mlist
    found = ", ".join(f"{n or '<root>'}[{len(m)}]" for n, m in lists) or "none"
    raise UserError(
        f"unknown model layout for {type(model).__name__}: no list of "
        f"num_hidden_layers={expected} decoder blocks (module lists found: {found})"
    )


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder blocks of a HF causal LM (e.g. ``model.model.layers``)."""
    return find_layers_with_path(model)[1]


def _linear_names(block: nn.Module) -> list[str]:
    return [n for n, m in block.named_modules() if isinstance(m, (nn.Linear, LoraLinear))]


def _find_target(block: nn.Module, target: str) -> str | None:
    """Path inside ``block`` of the linear named ``target`` (e.g. 'self_attn.q_proj')."""
    hits = [n for n in _linear_names(block) if n == target or n.endswith("." + target)]
    if len(hits) > 1:
        raise UserError(f"target {target!r} is ambiguous in {type(block).__name__}: {hits}")
    return hits[0] if hits else None


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``path`` inside ``root``."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


# --------------------------------------------------------------------------------------------
# The LoRA module


class DropoutSeed:
    """The LoRA dropout seed of one model: one 0-dim int64 tensor drawn from torch's generator
    at the start of each training forward (a forward pre-hook), shared by every adapter, each
    adding its own layer offset (`LoraLinear.seed_offset`) in the kernels. So no adapter call
    draws from the generator, and the masks are reproducible under ``torch.manual_seed``.

    ``current`` is None until the first training forward of the whole model; an adapter called
    on its own then draws a seed per call (as the functional ops do). A checkpointed block
    recomputes with the seed its forward saw (``_checkpointed_forward``), so run each
    micro-batch's backward before the next micro-batch's forward, as every training loop does.
    """

    def __init__(self, probe: nn.Parameter) -> None:
        self.probe = probe  # an adapter: the seed lives on its device
        self.current: torch.Tensor | None = None

    def draw(self, model: nn.Module, _args: Any) -> None:
        if model.training:
            self.current = torch.randint(
                0, 2**31 - 1, (), device=self.probe.device, dtype=torch.int64
            )


def _seed_of(module: LoraLinear) -> torch.Tensor | None:
    seeds = module._seeds
    return None if seeds is None else seeds.current


class _QKVGroup:
    """q/k/v of one attention sharing a frozen ``cat([Wq, Wk, Wv])`` and one kernel call.

    The attention code still calls q_proj(x), k_proj(x), v_proj(x) one after the other. The
    first of the three calls computes all projections with ``lora_qkv`` and keeps the other two
    outputs, keyed by the identity of ``x`` (and the grad mode); the next calls on the same
    tensor take theirs and the stash is dropped once empty. A call that finds no matching stash
    (another input, or a module called twice) computes the three projections afresh.
    """

    def __init__(self, modules: dict[str, LoraLinear], weight: torch.Tensor, bias: Any) -> None:
        self.modules = modules
        self.weight = weight
        self.bias = bias
        self._x: torch.Tensor | None = None
        self._grad_mode = False
        self._outputs: dict[str, torch.Tensor] = {}

    def take(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        if self._x is x and self._grad_mode == torch.is_grad_enabled() and name in self._outputs:
            out = self._outputs.pop(name)
            if not self._outputs:
                self._x = None
            return out
        return None

    def compute(self, name: str, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (self.modules[n] for n in QKV)
        outs = kernels.lora_qkv(
            x,
            self.weight,
            q.lora_A,
            k.lora_A,
            v.lora_A,
            q.lora_B,
            k.lora_B,
            v.lora_B,
            (q.scale, k.scale, v.scale),
            bias_qkv=self.bias,
            dropout_p=q.dropout_p if q.training else 0.0,
            seed=_seed_of(q),
            seed_offset=q.seed_offset,
        )
        self._outputs = {n: o for n, o in zip(QKV, outs, strict=True) if n != name}
        self._x, self._grad_mode = x, torch.is_grad_enabled()
        return outs[QKV.index(name)]


class LoraLinear(nn.Module):
    """A frozen linear plus a LoRA adapter: ``y = x Wᵀ + b + scale·(drop(x) Aᵀ) Bᵀ``.

    ``weight`` and ``bias`` are the original linear's (frozen) tensors; ``lora_A`` (r, K) and
    ``lora_B`` (N, r) are fp32 parameters whatever the base dtype. Under autocast the kernels
    keep their compute-dtype copies until the optimizer changes them; gradients come back in
    fp32 for autograd to accumulate into ``.grad`` (see ``fastmid.kernels._lora``).
    ``seed_offset`` is this adapter's offset to the model's dropout seed (``DropoutSeed``).
    """

    def __init__(
        self, base: nn.Linear, rank: int, scale: float, dropout_p: float, name: str = ""
    ) -> None:
        super().__init__()
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.name = name
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        # Same init as PEFT: A Kaiming-uniform, B zero, so the patched model starts unchanged.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = scale
        self.dropout_p = dropout_p
        self.seed_offset = 0
        self._seeds: DropoutSeed | None = None
        self._group: _QKVGroup | None = None

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self._group
        if group is not None:
            out = group.take(self.name, x)
            return out if out is not None else group.compute(self.name, x)
        return kernels.lora_linear(
            x,
            self.weight,
            self.lora_A,
            self.lora_B,
            self.scale,
            bias=self.bias,
            dropout_p=self.dropout_p if self.training else 0.0,
            seed=_seed_of(self),
            seed_offset=self.seed_offset,
        )

    def merged_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ``W + scale·B·A`` folded in (in fp32, cast back)."""
        w = self.weight.detach()
        delta = self.scale * (self.lora_B.detach().float() @ self.lora_A.detach().float())
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device="meta"
        )
        # A fresh contiguous tensor: grouped weights are views into one shared matrix, which
        # save_pretrained would refuse as shared storage.
        linear.weight = nn.Parameter((w.float() + delta).to(w.dtype), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, scale={self.scale:g}, dropout={self.dropout_p:g}"
        )


# --------------------------------------------------------------------------------------------
# Instance-level forward wrappers


class _WrappedForward:
    """An instance-level forward built by ``make(module, inner_forward)``.

    ``copy.deepcopy`` of a patched model rebuilds the wrapper around the copy (a plain closure
    would keep calling the original module and leave the copy's parameters without grads).
    """

    def __init__(self, module: nn.Module, make: ForwardMaker, inner: Any) -> None:
        self.module, self.make, self.inner = module, make, inner
        self.run: Callable[..., Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Built on first call: during a deepcopy the module's copy has no attributes yet.
        if self.run is None:
            inner = self.inner or type(self.module).forward.__get__(self.module)
            self.run = self.make(self.module, inner)
        return self.run(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> _WrappedForward:
        # The module's copy is in `memo` already: copy registers it before copying its state.
        module = memo.get(id(self.module), self.module)
        return _WrappedForward(module, self.make, copy.deepcopy(self.inner, memo))


ForwardMaker = Callable[[nn.Module, Callable[..., Any]], Callable[..., Any]]


def wrap_forward(module: nn.Module, make: ForwardMaker) -> None:
    """Replace ``module.forward`` on this instance only with ``make(module, forward)``,
    remembering what was there."""
    if _ORIG_FORWARD not in module.__dict__:
        setattr(module, _ORIG_FORWARD, module.__dict__.get("forward"))
    module.forward = _WrappedForward(module, make, module.__dict__.get("forward"))


def unwrap_forward(module: nn.Module) -> None:
    """Undo :func:`wrap_forward` on this instance (no-op when it was never wrapped)."""
    if _ORIG_FORWARD not in module.__dict__:
        return
    orig = module.__dict__.pop(_ORIG_FORWARD)
    module.__dict__.pop("forward", None)
    if orig is not None:
        module.forward = orig


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


def _swiglu_forward(mlp: nn.Module, recompute: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    gate, up = mlp.gate_proj, mlp.up_proj

    def forward(x: torch.Tensor) -> torch.Tensor:
        h = kernels.lora_gate_up(
            x,
            # Read per call: quantize_frozen may replace the matrix after patching.
            mlp._fastmid_gate_up_weight,
            gate.lora_A,
            up.lora_A,
            gate.lora_B,
            up.lora_B,
            (gate.scale, up.scale),
            dropout_p=gate.dropout_p if mlp.training else 0.0,
            seed=_seed_of(gate),
            seed_offset=gate.seed_offset,
            recompute=recompute,
        )
        return mlp.down_proj(h)

    return forward


def _is_swiglu(mlp: nn.Module) -> bool:
    """True when ``mlp`` computes down(silu(gate(x)) * up(x)) with bias-free gate and up.

    Checked numerically once on a small probe input rather than trusted from the class name,
    so a family with another MLP formula keeps its own forward.
    """
    gate, up, down = (getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
    if not all(isinstance(m, LoraLinear) for m in (gate, up)) or down is None:
        return False
    if gate.bias is not None or up.bias is not None:
        return False
    if not is_silu(getattr(mlp, "act_fn", None)):
        return False
    w = gate.weight
    with torch.no_grad():
        x = torch.randn(2, gate.in_features, dtype=w.dtype, device=w.device)
        expected = down(torch.nn.functional.silu(x @ w.T) * (x @ up.weight.T))
        got = type(mlp).forward(mlp, x)
    return torch.allclose(got.float(), expected.float(), rtol=1e-2, atol=1e-3)


def is_silu(act: Any) -> bool:
    """True for SiLU activation modules (torch's and transformers' own class)."""
    return isinstance(act, nn.SiLU) or type(act).__name__ in {"SiLU", "SiLUActivation"}


# --------------------------------------------------------------------------------------------
# Patching


def apply_midblock(model: nn.Module, cfg: MidBlockConfig | None = None) -> nn.Module:
    """Patch ``model`` in place into a Mid-Block model (see the module docstring); returns it."""
    cfg = cfg or MidBlockConfig()
    if getattr(model, "fastmid_state", None) is not None:
        raise UserError("model is already patched by apply_midblock")
    if getattr(model, "fastmid_quantize", "none") != "none":
        raise UserError("patch the model before quantizing it (MidBlockConfig(quantize=...))")
    cfg.validate()
    layers_path, blocks = find_layers_with_path(model)
    num_layers = len(blocks)
    layers = resolve_band(cfg.band, num_layers)
    rank = resolve_rank(cfg.rank, cfg.rank_budget, num_layers, len(layers))

    # Locate every target first so that a bad config fails before anything is modified.
    found: dict[int, dict[str, str]] = {}
    narrowest: tuple[int, int, str, nn.Linear] | None = None
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
                narrowest = (min(lin.in_features, lin.out_features), i, t, lin)
        found[i] = paths  # type: ignore[assignment]
    width, i, t, lin = narrowest
    rank_note = None
    if rank > width:
        shape = f"{t} of layer {i} ({lin.out_features}x{lin.in_features})"
        if cfg.rank is not None:
            raise UserError(f"rank {rank} is larger than {shape}; use rank <= {width}")
        # A derived rank must never fail on a valid model: the budget asks for more than the
        # layer can hold, so the adapter takes the full width.
        rank_note = f"rank {rank} from the budget is wider than {shape}; using rank {width}"
        rank = width

    for p in model.parameters():
        p.requires_grad_(False)

    scale = lora_scale(cfg.alpha, rank, cfg.use_rslora)
    module_paths: list[str] = []
    seeds: DropoutSeed | None = None
    for i in layers:
        block = blocks[i]
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
            _fuse_qkv(mods)
            _fuse_gate_up(block, found[i], mods, cfg.gate_up_recompute)
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
    if cfg.use_liger:
        from fastmid.liger import apply_liger_to_frozen

        frozen = [blocks[i] for i in range(num_layers) if i not in set(layers)]
        apply_liger_to_frozen(frozen)
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
        from fastmid.quantize import quantize_frozen

        quantize_frozen(model, cfg.quantize)
    return model


def _fuse_qkv(mods: dict[str, LoraLinear]) -> None:
    """Share one frozen cat([Wq, Wk, Wv]) between q, k and v (weights become views into it)."""
    if not all(n in mods for n in QKV):
        return
    q, k, v = (mods[n] for n in QKV)
    if len({m.weight.dtype for m in (q, k, v)}) != 1 or len({m.rank for m in (q, k, v)}) != 1:
        return
    has_bias = [m.bias is not None for m in (q, k, v)]
    if any(has_bias) and not all(has_bias):
        return
    weight = torch.cat([m.weight.detach() for m in (q, k, v)], 0)
    bias = torch.cat([m.bias.detach() for m in (q, k, v)], 0) if all(has_bias) else None
    start = 0
    for m in (q, k, v):
        n = m.out_features
        m.weight = nn.Parameter(weight[start : start + n], requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(bias[start : start + n], requires_grad=False)
        start += n
    group = _QKVGroup({n: mods[n] for n in QKV}, weight, bias)
    for m in (q, k, v):
        m._group = group


def _fuse_gate_up(
    block: nn.Module, paths: dict[str, str], mods: dict[str, LoraLinear], recompute: bool
) -> None:
    """Run a SwiGLU MLP as lora_gate_up + down when gate and up are both targets."""
    if "gate_proj" not in mods or "up_proj" not in mods:
        return
    mlp_path = paths["gate_proj"].rpartition(".")[0]
    if paths["up_proj"].rpartition(".")[0] != mlp_path:
        return
    mlp = block.get_submodule(mlp_path) if mlp_path else block
    if not _is_swiglu(mlp):
        return
    gate, up = mods["gate_proj"], mods["up_proj"]
    if gate.weight.dtype != up.weight.dtype or gate.rank != up.rank:
        return
    weight = torch.cat([gate.weight.detach(), up.weight.detach()], 0)
    gate.weight = nn.Parameter(weight[: gate.out_features], requires_grad=False)
    up.weight = nn.Parameter(weight[gate.out_features :], requires_grad=False)
    setattr(mlp, _GATE_UP_WEIGHT, weight)
    wrap_forward(mlp, lambda module, _forward: _swiglu_forward(module, recompute))


def fused_weights(block: nn.Module) -> list[tuple[Any, str, list[LoraLinear]]]:
    """Each frozen concatenated weight of ``block`` as (holder, attribute name, member modules
    in row order): q/k/v's shared matrix and a fused SwiGLU's gate/up matrix. A later pass
    (quantization) replaces the matrix and the members' row views of it together."""
    out: list[tuple[Any, str, list[LoraLinear]]] = []
    for module in block.modules():
        group = module._group if isinstance(module, LoraLinear) else None
        if group is not None and all(g is not group for g, _, _ in out):
            out.append((group, "weight", [group.modules[n] for n in QKV]))
        if "_fastmid_gate_up_weight" in module.__dict__:
            out.append((module, "_fastmid_gate_up_weight", [module.gate_proj, module.up_proj]))
    return out


def unpatch_forwards(model: nn.Module) -> None:
    """Remove every instance-level forward wrapper apply_midblock installed."""
    for module in model.modules():
        unwrap_forward(module)
        module.__dict__.pop(_GATE_UP_WEIGHT, None)
        if isinstance(module, LoraLinear):
            module._group = None
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


def is_fused(model: nn.Module) -> bool:
    """True when q/k/v or gate/up of some block run from one concatenated frozen weight.

    FSDP cannot shard such a copy; it needs a model patched with ``fuse_groups=False``.
    """
    for module in model.modules():
        if isinstance(module, LoraLinear) and module._group is not None:
            return True
        if _GATE_UP_WEIGHT in vars(module):
            return True
    return False


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Exactly the trainable parameters: every lora_A and lora_B, in layer order."""
    return [p for _, _, m in lora_modules(model) for p in (m.lora_A, m.lora_B)]


def midblock_state(model: nn.Module) -> MidBlockState:
    """What apply_midblock did to ``model``; UserError when it was never patched."""
    state = getattr(model, "fastmid_state", None)
    if state is None:
        raise UserError("model is not patched; call fastmid.apply_midblock(model, cfg) first")
    return state
