"""Adapters in PEFT's on-disk format: save, load (fastmid- or PEFT-written), merge.

A saved adapter is a directory with

- ``adapter_config.json``: a PEFT ``LoraConfig`` (``peft_type: LORA``, ``r``, ``lora_alpha``,
  ``target_modules``, ``layers_to_transform``, …), uniform rank so ``rank_pattern`` and
  ``alpha_pattern`` are empty;
- ``adapter_model.safetensors``: ``base_model.model.<module path>.lora_A.weight`` (r, K) and
  ``….lora_B.weight`` (N, r), fp32,

so ``peft.PeftModel.from_pretrained(base, path)`` and vLLM load it as they load any LoRA.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fastmid.engine.blocks import find_layers_with_path, set_submodule
from fastmid.engine.lora import LoraLinear
from fastmid.engine.midblock import (
    KNOWN_TARGETS,
    MidBlockConfig,
    apply_midblock,
    lora_scale,
    midblock_state,
    unpatch_forwards,
)
from fastmid.engine.quantize import dequantize_frozen, quantized_method
from fastmid.errors import UserError
from fastmid.fileio import replace_atomic

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# PEFT drops the adapter name when saving ("lora_A.weight") but older files may keep it
# ("lora_A.default.weight"); both are accepted.
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")
# Layer-list names PEFT recognises by itself when layers_pattern is left empty.
_COMMON_LAYER_NAMES = ("layers", "h", "blocks", "layer")


def _module_paths(model: nn.Module) -> dict[str, LoraLinear]:
    """Module path relative to the model (PEFT's key stem) -> LoraLinear."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def adapter_config(model: nn.Module, base_model_name_or_path: str | None = None) -> dict:
    """The ``adapter_config.json`` contents (a PEFT LoraConfig) for a patched model."""
    state = midblock_state(model)
    layers_name = state.layers_path.rpartition(".")[2]
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model.config, "_name_or_path", None) or None
    targets = [t for t in KNOWN_TARGETS if t in state.targets]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": state.rank,
        "lora_alpha": state.alpha,
        "lora_dropout": state.dropout,
        "target_modules": targets,
        # None means every layer to PEFT; a list restricts adapters to those layers.
        "layers_to_transform": None if len(state.layers) == state.num_layers else state.layers,
        "layers_pattern": None if layers_name in _COMMON_LAYER_NAMES else layers_name,
        "use_rslora": state.config.use_rslora,
        "rank_pattern": {},
        "alpha_pattern": {},
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": False,
        "lora_bias": False,
        "revision": None,
    }


def save_adapter(
    model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None
) -> Path:
    """Save the adapters of a patched ``model`` to directory ``path`` in PEFT format.

    Each file is written atomically; the config is written last, so a directory holding a
    config always holds the matching weights. Returns the directory.
    """
    out = Path(path)
    config = adapter_config(model, base_model_name_or_path)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in _module_paths(model).items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = module.lora_A.detach().float().contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = module.lora_B.detach().float().contiguous()
    tensors = {k: v.cpu() for k, v in tensors.items()}
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create adapter directory {out}: {e.strerror}") from None
    replace_atomic(out / WEIGHTS_NAME, lambda f: save_file(tensors, f, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    replace_atomic(out / CONFIG_NAME, lambda f: Path(f).write_text(text))
    return out


def _read_adapter(path: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(config, {module path: {"A": tensor, "B": tensor}}) of the adapter in ``path``."""
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_file.is_file():
        raise UserError(f"no adapter at {path}: {CONFIG_NAME} not found")
    if not weights_file.is_file():
        raise UserError(f"adapter {path} has no {WEIGHTS_NAME} (only safetensors are loaded)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{config_file}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise UserError(f"{config_file}: not a LoRA adapter (peft_type must be LORA)")
    if config.get("use_dora"):
        raise UserError(f"{config_file}: DoRA adapters are not supported")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise UserError(f"{config_file}: per-module ranks (rank_pattern) are not supported")
    if not isinstance(config.get("r"), int) or config["r"] <= 0:
        raise UserError(f"{config_file}: 'r' must be a positive integer")
    try:
        tensors = load_file(weights_file)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{weights_file}: unreadable safetensors file ({e})") from None
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        stem = key.removeprefix(_PREFIX)
        match = _KEY.match(stem)
        if match is None:
            raise UserError(f"{weights_file}: unsupported tensor {key!r} (only LoRA A/B weights)")
        modules.setdefault(match["module"], {})[match["which"]] = value
    incomplete = [m for m, ab in modules.items() if len(ab) != 2]
    if incomplete:
        raise UserError(f"{weights_file}: {incomplete[0]} has lora_A or lora_B but not both")
    if not modules:
        raise UserError(f"{weights_file}: holds no LoRA weights")
    return config, modules


def _patch_for(
    model: nn.Module,
    config: dict,
    modules: dict[str, Any],
    where: Path,
    quantize: str,
    load_block: Callable[[int], None] | None,
) -> None:
    """apply_midblock with the band, targets and rank the adapter was trained with."""
    layers_path, blocks = find_layers_with_path(model)
    pattern = re.compile(rf"^{re.escape(layers_path)}\.(\d+)\.(.+)$")
    layers: set[int] = set()
    targets: set[str] = set()
    for name in modules:
        match = pattern.match(name)
        if match is None:
            raise UserError(f"adapter {where} targets {name}, which is not in a decoder block")
        layer, target = int(match[1]), match[2].rpartition(".")[2]
        if layer >= len(blocks):
            raise UserError(
                f"adapter {where} targets layer {layer}, the model has {len(blocks)} layers"
            )
        if target not in KNOWN_TARGETS:
            raise UserError(f"adapter {where} targets {name}, which fastmid cannot adapt")
        layers.add(layer)
        targets.add(target)
    cfg = MidBlockConfig(
        band=sorted(layers),
        targets=tuple(t for t in KNOWN_TARGETS if t in targets),
        rank=config["r"],
        alpha=config.get("lora_alpha", 8),
        dropout=config.get("lora_dropout", 0.0),
        use_rslora=bool(config.get("use_rslora", False)),
        quantize=quantize,
    )
    apply_midblock(model, cfg, load_block=load_block)


def resolve_adapter_dir(path: str | os.PathLike) -> Path:
    """The adapter directory ``path`` names: ``path`` itself, or for the output dir of a
    ``fastmid train`` run, its ``adapter/``."""
    where = Path(path)
    if not (where / CONFIG_NAME).is_file() and (where / "adapter" / CONFIG_NAME).is_file():
        return where / "adapter"
    return where


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    quantize: str = "none",
    load_block: Callable[[int], None] | None = None,
) -> nn.Module:
    """Load a fastmid- or PEFT-written LoRA adapter into ``model``; returns the model.

    ``path`` is an adapter directory or the output dir of a ``fastmid train`` run.

    An unpatched model is first patched with the adapter's layers, targets, rank and alpha,
    its frozen weights stored as ``quantize`` says (``"nf4"``, ``"int8"`` or ``"none"``), each
    decoder block loaded by ``load_block`` just before it is patched when that is given (see
    :func:`fastmid.engine.models.load_model_blockwise`). The adapter and the model must adapt
    the same modules, with tensors of the same shapes.
    """
    where = resolve_adapter_dir(path)
    config, modules = _read_adapter(where)
    patched = getattr(model, "fastmid_state", None) is not None
    if patched and (quantize != "none" or load_block is not None):
        raise ValueError("quantize and load_block apply when load_adapter patches the model")
    if not patched:
        _patch_for(model, config, modules, where, quantize, load_block)
    state = midblock_state(model)
    present = _module_paths(model)
    missing = [name for name in modules if name not in present]
    if missing:
        raise UserError(
            f"adapter {where} has weights for {missing[0]}, which the model does not adapt "
            f"(adapted layers: {state.layers})"
        )
    # Loading into only some adapted modules would leave the others with their old weights.
    extra = [name for name in present if name not in modules]
    if extra:
        raise UserError(
            f"adapter {where} has no weights for {extra[0]} ({len(extra)} of the model's "
            f"{len(present)} adapted modules); load it into an unpatched model"
        )
    rank = config["r"]
    scale = lora_scale(config.get("lora_alpha", 8), rank, bool(config.get("use_rslora")))
    for name, ab in modules.items():
        module = present[name]
        for which, param in (("A", module.lora_A), ("B", module.lora_B)):
            if tuple(ab[which].shape) != tuple(param.shape):
                raise UserError(
                    f"adapter {where}: {name}.lora_{which} has shape {tuple(ab[which].shape)}, "
                    f"the model's is {tuple(param.shape)} (different rank or model?)"
                )
    with torch.no_grad():
        for name, ab in modules.items():
            module = present[name]
            module.lora_A.copy_(ab["A"])
            module.lora_B.copy_(ab["B"])
            module.scale = scale
    state.alpha = config.get("lora_alpha", state.alpha)
    state.scale = scale
    return model


def merge(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Fold every adapter into its base weight (``W += scale·B·A`` in fp32, cast back).

    Returns the same model object as a plain Hugging Face model: LoraLinear modules replaced
    by ``nn.Linear``, every instance-level wrapper removed, ``fastmid_state`` deleted, so
    ``save_pretrained`` works. The base parameters stay frozen.

    A quantized base (``fastmid.engine.quantize``) is refused unless ``dequantize=True``: then every
    frozen weight is dequantized first and the adapters are folded into those values, so the
    merged model computes what the quantized base plus adapters did, at full-precision size.
    """
    midblock_state(model)  # a clear error for a model that was never patched
    method = quantized_method(model)
    if method != "none":
        if not dequantize:
            raise UserError(
                f"cannot merge adapters into a {method}-quantized base; "
                "merge(model, dequantize=True) folds them into the dequantized weights"
            )
        dequantize_frozen(model)
    unpatch_forwards(model)
    for name, module in list(_module_paths(model).items()):
        set_submodule(model, name, module.merged_linear())
    del model.fastmid_state
    return model
