"""Loading a model's decoder blocks one at a time, straight from its safetensors shards.

:func:`open_blockwise` builds the model on the meta device (no memory), loads what lies outside
the decoder blocks (embeddings, final norm, LM head, buffers) onto the target device, and
returns a :class:`BlockLoader`. ``apply_midblock(model, cfg, load_block=loader)`` calls it for
each block in turn, just before patching (and quantizing) that block, so a quantized model is
never held in full precision: the load peak is the quantized model plus one block.

Tensors are read from the shards in row chunks, each through a fresh ``safe_open`` handle:
safetensors maps the whole file, and every page a handle has touched counts toward this
process's resident memory until the handle is closed (reading a 0.5 GB checkpoint through one
handle adds 0.5 GB of RSS). Each chunk is copied, cast, into a tensor allocated on the target
device in the dtype the model declares, the same cast ``from_pretrained`` applies.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from fastmid.engine.blocks import find_layers_with_path
from fastmid.errors import UserError
from fastmid.memory import release_free_memory

# File bytes read per chunk: bounds the host memory of reading one tensor (an embedding
# matrix is the largest); larger chunks only save file opens.
CHUNK_BYTES = 8 * 2**20
_INDEX = "model.safetensors.index.json"


class ShardIndex:
    """Which safetensors file of a model directory holds each tensor."""

    def __init__(self, directory: Path) -> None:

        index = directory / _INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {key: directory / name for key, name in weight_map.items()}
        else:
            self.files = _tensor_files(sorted(directory.glob("*.safetensors")))

    @classmethod
    def of_files(cls, files: Sequence[Path]) -> ShardIndex:
        """The index of the tensors in safetensors ``files``."""
        index = cls.__new__(cls)
        index.files = _tensor_files(files)
        return index

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def read(self, key: str, like: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Tensor ``key`` on ``device`` in ``like``'s dtype (``like`` gives the expected shape;
        it may be a meta tensor)."""
        from safetensors import safe_open

        shape = self.shape(key)
        if shape != tuple(like.shape):
            raise UserError(
                f"{key} has shape {list(shape)} in {self.files[key]}, "
                f"the model expects {list(like.shape)}"
            )
        if not shape:
            with safe_open(str(self.files[key]), "pt") as f:
                return f.get_tensor(key).to(device=device, dtype=like.dtype)
        out = torch.empty(shape, dtype=like.dtype, device=device)
        self.read_rows(key, out)
        return out

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape tensor ``key`` has in its file."""
        from safetensors import safe_open

        with safe_open(str(self.files[key]), "pt") as f:
            return tuple(f.get_slice(key).get_shape())

    def itemsize(self, key: str) -> int:
        """Bytes per element of tensor ``key`` in its file."""
        from safetensors import safe_open

        with safe_open(str(self.files[key]), "pt") as f:
            return _file_itemsize(f.get_slice(key).get_dtype())

    def read_rows(self, key: str, out: torch.Tensor, start: int = 0) -> None:
        """Copy rows ``[start, start + len(out))`` of tensor ``key`` (at least 1-d) into
        ``out``, cast to its dtype, ``CHUNK_BYTES`` of the file at a time: no copy of the whole
        tensor (or of ``out``) is ever made on the host."""
        from safetensors import safe_open

        path = str(self.files[key])
        row_bytes = max(1, out[0].numel() * self.itemsize(key)) if len(out) else 1
        step = max(1, CHUNK_BYTES // row_bytes)
        for first in range(0, len(out), step):
            stop = min(first + step, len(out))
            # A fresh handle per chunk: closing it unmaps the pages this chunk touched.
            with safe_open(path, "pt") as f:
                out[first:stop].copy_(f.get_slice(key)[start + first : start + stop])


def _tensor_files(files: Sequence[Path]) -> dict[str, Path]:
    """Which of the safetensors ``files`` holds each tensor (read from their headers)."""
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), "pt") as f:
            where.update(dict.fromkeys(f.keys(), path))
    return where


def _file_itemsize(dtype: str) -> int:
    """Bytes per element of a safetensors dtype name ("F32", "BF16", "I64", "F8_E4M3", ...)."""
    bits = "".join(c for c in dtype.split("_")[0] if c.isdigit())
    return max(1, int(bits or 8) // 8)


def _unique_tensors(module: nn.Module) -> Iterator[tuple[list[str], bool, torch.Tensor]]:
    """(every name, is a parameter, tensor) of each distinct parameter and persistent buffer of
    ``module``; a tied tensor comes once, with all of its names."""
    names: dict[int, list[str]] = {}
    found: dict[int, tuple[bool, torch.Tensor]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
        found[id(p)] = (True, p)
    for name, b in module.named_buffers(remove_duplicate=False):
        owner, _, attr = name.rpartition(".")
        if attr in module.get_submodule(owner)._non_persistent_buffers_set:
            continue
        names.setdefault(id(b), []).append(name)
        found[id(b)] = (False, b)
    for key, (is_param, t) in found.items():
        yield names[key], is_param, t


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    module = root.get_submodule(owner)
    if isinstance(value, nn.Parameter):
        module._parameters[attr] = value
    else:
        module._buffers[attr] = value


def _materialise(
    root: nn.Module, prefix: str, index: ShardIndex, device: torch.device, skip: str | None
) -> None:
    """Load every meta tensor of ``root`` (named ``prefix`` + its name in the checkpoint) from
    ``index`` onto ``device``, leaving the submodule at ``skip`` alone; move every other tensor
    (buffers computed at construction) to ``device``."""
    for names, is_param, t in _unique_tensors(root):
        if skip is not None and names[0].startswith(skip + "."):
            continue
        key = next((prefix + n for n in names if prefix + n in index), None)
        if key is not None:
            value = index.read(key, t, device)
        elif t.is_meta:
            raise UserError(f"{prefix}{names[0]} is not in the checkpoint")
        else:
            value = t.to(device)  # a buffer the model computes itself
        if is_param:
            value = nn.Parameter(value, requires_grad=t.requires_grad)
        for name in names:  # one object under every name, so ties stay ties
            _set_tensor(root, name, value)
    for name, b in list(root.named_buffers()):
        if (skip is None or not name.startswith(skip + ".")) and b.device != device:
            owner, _, attr = name.rpartition(".")
            root.get_submodule(owner)._buffers[attr] = b.to(device)


def checkpoint_mismatch(model: nn.Module, index: ShardIndex) -> str | None:
    """The first tensor of ``model`` (a meta skeleton) missing from the checkpoint under its own
    name, or None. transformers renames the tensors of some checkpoints while loading them;
    those keep the whole-model load."""
    for names, is_param, t in _unique_tensors(model):
        if is_param and t.is_meta and not any(n in index for n in names):
            return names[0]
    return None


class BlockLoader:
    """Loads decoder block ``i`` of a model made by :func:`open_blockwise` onto its device, in
    place (``loader(i)``); every block once, in any order. A loader made by :meth:`whole`
    stands for a model loaded whole: it loads nothing, and ``note`` says why."""

    def __init__(
        self,
        model: nn.Module,
        index: ShardIndex | None,
        device: torch.device,
        note: str | None = None,
    ) -> None:
        self.index = index
        self.device = device
        self.note = note
        self.layers_path, self.blocks = find_layers_with_path(model)

    @classmethod
    def whole(cls, model: nn.Module, note: str) -> BlockLoader:
        """The loader of a model already loaded whole (``note``: why)."""
        return cls(model, None, next(model.parameters()).device, note)

    def __call__(self, i: int) -> None:
        if self.index is None:
            return
        # The previous block's full-precision weights are free by now (quantized, or moved
        # to the GPU): hand their pages back before this block's are allocated.
        release_free_memory()
        prefix = f"{self.layers_path}.{i}."
        _materialise(self.blocks[i], prefix, self.index, self.device, skip=None)


def build_skeleton(source: Path, dtype: torch.dtype) -> nn.Module:
    """The causal LM of the directory ``source`` with every weight on the meta device (buffers
    the model computes are real), in eval mode, with its generation config."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(source)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if (source / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(source)
    # Tied tensors become one parameter with several names, loaded once.
    model.tie_weights()
    return model.eval()


def open_blockwise(
    model: nn.Module, source: Path, index: ShardIndex, device: torch.device
) -> BlockLoader:
    """Load everything of the skeleton ``model`` but its decoder blocks from ``source`` onto
    ``device`` (ties restored) and return the loader of the blocks."""
    layers_path, _ = find_layers_with_path(model)
    _materialise(model, "", index, device, skip=layers_path)
    return BlockLoader(model, index, torch.device(device))
