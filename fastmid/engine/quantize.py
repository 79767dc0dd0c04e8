"""Quantized frozen base (QLoRA-style): every frozen linear of the decoder blocks stored in
4-bit NF4 or 8-bit int8, dequantized per call, never kept in full.

``quantize_frozen(model, "nf4")`` runs after :func:`fastmid.apply_midblock` (which quantizes
each block itself, right after patching it, for ``MidBlockConfig(quantize=...)``: see
:func:`quantize_block`) and replaces, in every decoder block below, inside and above the band:

- each plain ``nn.Linear`` by a :class:`QuantizedLinear` (NF4: ``fastmid.kernels.nf4_linear``,
  the Triton dequantizing GEMM on CUDA; int8: dequantize then matmul). Both save only the
  quantized weight for backward and dequantize again there;
- the frozen weight of each adapted ``LoraLinear``, and the concatenated q/k/v and gate/up
  weights of the fused groups (quantized as one matrix; the members keep row views of it), by a
  :class:`QuantizedWeight`: a tensor that dequantizes itself when cast to a float dtype. The
  fused LoRA ops cast their frozen weight in forward and again in backward and save the tensor
  they were given, so they run unchanged and autograd keeps the 4-bit form only.

Embeddings, norms and the LM head stay as they are.

Formats. NF4 is QLoRA's: torchao's quantizer (``to_nf4``: blocks of 64 values with an absmax
scale, the scales double-quantized to int8 in groups), stored as the plain tensors of
``fastmid.kernels.NF4Weight`` and dequantized bit-identically to ``NF4Tensor.to(dtype)`` but
through one 256-entry table gather per byte. int8 is a per-output-channel symmetric int8 weight
with one scale per row: torchao's ``Int8Tensor`` reaches a matmul only through its ``F.linear``
handler, while the fused LoRA ops need a weight they can dequantize in forward and again in
backward.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from importlib.util import find_spec
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from fastmid import notices
from fastmid.engine.blocks import find_decoder_layers
from fastmid.engine.lora import LoraLinear, fused_weights
from fastmid.errors import UserError
from fastmid.kernels.nf4_matmul import NF4Weight, nf4_dequantize, nf4_linear

# How quantize_frozen may store the frozen linears.
QUANTIZE_METHODS = ("none", "nf4", "int8")
# Values per NF4 block (one absmax scale each): QLoRA's choice; must divide each layer's width.
NF4_BLOCK = 64
# Upper bound on NF4 scales per double-quantization group (torchao's default); a smaller power
# of two is used where a layer's block count needs it.
NF4_SCALER_BLOCK = 256
# torchao finds each value's nearest NF4 level by comparing it with all 16 levels at once, a
# chunk of values at a time: temporaries of ~32 bytes per bf16 value of the chunk, 64 MiB at its
# default of 2**20 values. On CPU that is host memory of the order of a small model's whole
# quantized size (it set the load peak of the embedded model), so quantize in smaller chunks
# there; the result is the same, the search being per value. On CUDA the default's fewer
# launches are worth its 64 MiB of device memory.
NF4_CPU_CHUNK = 2**16

_aten = torch.ops.aten


class Int8Weight(NamedTuple):
    """A per-row symmetric int8 weight: ``w[n, k] ≈ data[n, k] · scale[n]``."""

    data: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.data.shape)


Payload = NF4Weight | Int8Weight


# --------------------------------------------------------------------------------------------
# The formats


def _nf4_scaler_block(row_blocks: list[int]) -> int:
    """Largest power of two <= NF4_SCALER_BLOCK dividing every part's NF4 block count, so each
    part of a fused matrix owns whole double-quantization groups (its rows are then a view)."""
    g = math.gcd(*row_blocks)
    return min(NF4_SCALER_BLOCK, g & -g)


def import_torchao_quietly() -> Any | None:
    """torchao's NF4 module, or None where torchao is not installed. On a CPU-only torch,
    importing torchao logs a warning per CUDA extension it cannot load (and torch one per enum
    it registers); none concerns NF4, which is plain PyTorch. transformers imports torchao
    itself whenever it is installed, so model loading calls this first."""
    if find_spec("torchao") is None:
        return None
    # transformers later imports more of torchao, registering more enums: that deprecation
    # notice is filtered for good (fastmid.notices, also installed by `import fastmid`).
    notices.install()
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)
    return nf4_tensor


def _quantize_nf4(weight: torch.Tensor, parts: list[int], block: int) -> NF4Weight:
    nf4_tensor = import_torchao_quietly()
    if nf4_tensor is None:
        raise UserError("--quantize nf4 needs torchao: pip install 'fastmid[quant]'")
    k = weight.shape[1]
    default_chunk = getattr(nf4_tensor, "CHUNK_SIZE", None)
    if weight.device.type == "cpu" and default_chunk is not None:
        nf4_tensor.CHUNK_SIZE = min(default_chunk, NF4_CPU_CHUNK)
    try:
        nf4 = nf4_tensor.to_nf4(
            weight.contiguous(), block, _nf4_scaler_block([n * k // block for n in parts])
        )
    finally:
        if default_chunk is not None:
            nf4_tensor.CHUNK_SIZE = default_chunk
    return NF4Weight(
        nf4.quantized_data,
        nf4.quantized_scalers,
        nf4.quantization_factor,
        nf4.scaler_mean,
        nf4.nf4,
        tuple(weight.shape),
        nf4.block_size,
        nf4.scaler_block_size,
    )


def _quantize_int8(weight: torch.Tensor) -> Int8Weight:
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
    data = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Weight(data, scale.to(weight.dtype))


def dequantize_payload(payload: Payload, dtype: torch.dtype) -> torch.Tensor:
    """The full (N, K) weight in ``dtype``."""
    if isinstance(payload, NF4Weight):
        return nf4_dequantize(payload, dtype)
    return payload.data.to(dtype) * payload.scale.to(dtype)[:, None]


def _rows(payload: Payload, start: int, stop: int) -> Payload:
    """Rows [start, stop) as views of ``payload``'s tensors (no copy)."""
    if isinstance(payload, Int8Weight):
        return Int8Weight(payload.data[start:stop], payload.scale[start:stop])
    k = payload.shape[1]
    qb, sb = payload.block_size, payload.scaler_block_size
    b0, b1 = start * k // qb, stop * k // qb
    return payload._replace(
        data=payload.data[start * k // 2 : stop * k // 2],
        scalers=payload.scalers[b0:b1],
        factors=payload.factors[b0 // sb : b1 // sb],
        shape=(stop - start, k),
    )


def _tensors(payload: Payload) -> list[torch.Tensor]:
    return [t for t in payload if isinstance(t, torch.Tensor)]


def stored_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``t``'s data: a quantized weight's payload, else ``[t]``."""
    return _tensors(t.payload) if isinstance(t, QuantizedWeight) else [t]


def payload_bytes(payload: Payload) -> int:
    """Bytes the quantized weight occupies (views count their own extent only)."""
    return sum(t.numel() * t.element_size() for t in _tensors(payload))


# --------------------------------------------------------------------------------------------
# The weight tensor


class QuantizedWeight(torch.Tensor):
    """A frozen (N, K) weight stored quantized. It reports the dtype it was quantized from;
    ``.to(dtype)`` (and ``.float()``, ``.double()``) return the dequantized weight. Any other
    op dequantizes it first, so it is correct everywhere and small only where it is saved."""

    payload: Payload

    @staticmethod
    def __new__(cls, payload: Payload, dtype: torch.dtype) -> QuantizedWeight:
        device = payload[0].device
        return torch.Tensor._make_wrapper_subclass(
            cls, payload.shape, dtype=dtype, device=device, requires_grad=False
        )

    def __init__(self, payload: Payload, dtype: torch.dtype) -> None:
        self.payload = payload

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full weight as a plain tensor (in its own dtype unless ``dtype`` is given).
        Always the values dequantized in its own dtype, cast after: merge and the training
        step then see the same weight."""
        w = dequantize_payload(self.payload, self.dtype)
        return w if dtype is None else w.to(dtype)

    @property
    def method(self) -> str:
        return "nf4" if isinstance(self.payload, NF4Weight) else "int8"

    def __repr__(self) -> str:
        return f"QuantizedWeight({self.method}, shape={tuple(self.shape)}, dtype={self.dtype})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # Tensor.to returns `self` when the dtype already matches, which would hand the
        # quantized wrapper to a matmul: a float dtype always means "dequantize".
        if func is torch.Tensor.to and isinstance(args[0], QuantizedWeight):
            device, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
            if dtype is not None:
                out = args[0].dequantize(dtype)
                return out if device is None else out.to(device)
            if device is not None and torch.device(device) != args[0].device:
                raise UserError("move the model to its device before quantizing it")
            return args[0]
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _aten.detach.default:
            return QuantizedWeight(args[0].payload, args[0].dtype)
        if func is _aten.clone.default:  # deepcopy of a module or parameter lands here
            payload = args[0].payload
            fields = (f.clone() if isinstance(f, torch.Tensor) else f for f in payload)
            return QuantizedWeight(type(payload)(*fields), args[0].dtype)
        if func is _aten._to_copy.default and kwargs.get("dtype") is not None:
            out = args[0].dequantize(kwargs["dtype"])
            return out.to(kwargs["device"]) if kwargs.get("device") else out
        plain = [a.dequantize() if isinstance(a, QuantizedWeight) else a for a in args]
        return func(*plain, **kwargs)


def _frozen(weight: QuantizedWeight) -> nn.Parameter:
    return nn.Parameter(weight, requires_grad=False)


# --------------------------------------------------------------------------------------------
# Frozen linears


class _Int8LinearFunction(torch.autograd.Function):
    """x·dequant(W)ᵀ + bias, saving the int8 weight (not its dequantized copy) for dx."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        ctx.x_dtype = x.dtype
        w = weight.to(x.dtype)
        return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_y):
        (weight,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_y @ weight.to(grad_y.dtype)).to(ctx.x_dtype)
        return grad_x, None, None


class QuantizedLinear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is stored quantized; grads flow to the input only."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = _frozen(weight)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if isinstance(weight.payload, NF4Weight):
            return nf4_linear(x, weight.payload, self.bias)
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return _Int8LinearFunction.apply(x, weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {self.weight.method}"
        )


# --------------------------------------------------------------------------------------------
# quantize_frozen


def check_quantize_method(method: str) -> None:
    """One clear line for a quantization method fastmid does not know."""
    if method not in QUANTIZE_METHODS:
        raise UserError(f"quantize must be one of {'|'.join(QUANTIZE_METHODS)}, got {method!r}")


def _check_width(method: str, where: str, weight: torch.Tensor, block: int) -> None:
    if isinstance(weight, QuantizedWeight):
        raise UserError(f"{where} is already quantized")
    if method == "nf4" and weight.shape[1] % block:
        raise UserError(
            f"--quantize nf4 needs the block size {block} to divide every frozen linear's "
            f"input width; {where} has {weight.shape[1]} (use --quantize int8 or none)"
        )


class _BlockPlan(NamedTuple):
    """What quantizing one decoder block replaces: fused groups (holder, attribute, members),
    LoRA modules outside a group, and plain linears (parent, attribute name, module)."""

    fused: list[tuple[Any, str, list[nn.Module]]]
    single: list[nn.Module]
    linears: list[tuple[nn.Module, str, nn.Linear]]


def _check_method(method: str, block_size: int) -> None:
    check_quantize_method(method)
    if method == "nf4" and (block_size <= 0 or block_size & (block_size - 1)):
        raise UserError(f"NF4 block size must be a power of two, got {block_size}")


def _plan_block(i: int, block: nn.Module, method: str, block_size: int) -> _BlockPlan:
    """Find (and check) every frozen linear of block ``i``; replaces nothing. Reads shapes only,
    so it also works on a block still on the meta device."""
    groups = fused_weights(block)
    members = {id(m) for _, _, ms in groups for m in ms}
    for holder, attr, ms in groups:
        _check_width(
            method,
            f"layer {i} fused {'/'.join(m.name for m in ms)}",
            getattr(holder, attr),
            block_size,
        )
    single: list[nn.Module] = []
    linears: list[tuple[nn.Module, str, nn.Linear]] = []
    for name, module in block.named_modules():
        where = f"layer {i} {name}"
        if isinstance(module, LoraLinear) and id(module) not in members:
            _check_width(method, where, module.weight, block_size)
            single.append(module)
        elif isinstance(module, nn.Linear):
            _check_width(method, where, module.weight, block_size)
            parent, _, child = name.rpartition(".")
            linears.append((block.get_submodule(parent) if parent else block, child, module))
        elif isinstance(module, QuantizedLinear):
            raise UserError(f"{where} is already quantized")
    return _BlockPlan(groups, single, linears)


def check_quantizable(model: nn.Module, method: str, block_size: int = NF4_BLOCK) -> None:
    """UserError (one line) unless :func:`quantize_block` can quantize every decoder block of
    ``model`` with ``method``. Reads shapes only: a model on the meta device can be checked
    before any of its weights is loaded."""
    _check_method(method, block_size)
    if method != "none":
        for i, block in enumerate(find_decoder_layers(model)):
            _plan_block(i, block, method, block_size)


def quantize_block(i: int, block: nn.Module, method: str, block_size: int = NF4_BLOCK) -> None:
    """Store every frozen linear of decoder block ``i`` quantized, in place. The original
    weights are dropped: once nothing else refers to them, their memory is free."""
    _check_method(method, block_size)
    if method == "none":
        return
    plan = _plan_block(i, block, method, block_size)

    def quantize(weight: torch.Tensor, parts: list[int]) -> QuantizedWeight:
        w = weight.detach()
        if method == "nf4":
            return QuantizedWeight(_quantize_nf4(w, parts, block_size), w.dtype)
        return QuantizedWeight(_quantize_int8(w), w.dtype)

    with torch.no_grad():
        for holder, attr, ms in plan.fused:
            rows = [m.out_features for m in ms]
            whole = quantize(getattr(holder, attr), rows)
            setattr(holder, attr, whole)
            start = 0
            for m, n in zip(ms, rows, strict=True):
                m.weight = _frozen(
                    QuantizedWeight(_rows(whole.payload, start, start + n), whole.dtype)
                )
                start += n
        for m in plan.single:
            m.weight = _frozen(quantize(m.weight, [m.out_features]))
        for parent, child, lin in plan.linears:
            setattr(
                parent, child, QuantizedLinear(quantize(lin.weight, [lin.out_features]), lin.bias)
            )


def quantize_frozen(
    model: nn.Module,
    method: str = "nf4",
    block_size: int = NF4_BLOCK,
    load_block: Callable[[int], None] | None = None,
):
    """Store every frozen linear of ``model``'s decoder blocks quantized (``"nf4"`` or
    ``"int8"``; ``"none"`` does nothing); returns the model. Run it after
    :func:`fastmid.apply_midblock` on a model already on its device. Everything is checked
    before anything is replaced. ``load_block(i)``, when given, loads block ``i`` just before
    it is quantized (a model from :func:`fastmid.engine.models.load_model_blockwise`), so only
    one block is ever held in full precision."""

    check_quantizable(model, method, block_size)
    if method == "none":
        if load_block is not None:
            for i in range(len(find_decoder_layers(model))):
                load_block(i)
        return model
    for i, block in enumerate(find_decoder_layers(model)):
        if load_block is not None:
            load_block(i)
        quantize_block(i, block, method, block_size)
    set_quantized_method(model, method)
    return model


def set_quantized_method(model: nn.Module, method: str) -> None:
    """Record that every decoder block of ``model`` has been quantized with ``method``."""
    model.fastmid_quantize = method


def quantized_method(model: nn.Module) -> str:
    """``"nf4"``/``"int8"`` for a model quantize_frozen has processed, else ``"none"``."""
    return getattr(model, "fastmid_quantize", "none")


def dequantize_frozen(model: nn.Module) -> nn.Module:
    """Undo :func:`quantize_frozen` as far as it can: every quantized frozen weight becomes a
    plain tensor again, holding the dequantized values (not the original ones)."""

    with torch.no_grad():
        for block in find_decoder_layers(model):
            for holder, attr, ms in fused_weights(block):
                whole = getattr(holder, attr)
                if not isinstance(whole, QuantizedWeight):
                    continue
                plain = whole.dequantize()
                setattr(holder, attr, plain)
                start = 0
                for m in ms:
                    m.weight = nn.Parameter(
                        plain[start : start + m.out_features], requires_grad=False
                    )
                    start += m.out_features
            for name, module in list(block.named_modules()):
                if isinstance(module, LoraLinear) and isinstance(module.weight, QuantizedWeight):
                    module.weight = nn.Parameter(module.weight.dequantize(), requires_grad=False)
                elif isinstance(module, QuantizedLinear):
                    lin = nn.Linear(
                        module.in_features,
                        module.out_features,
                        bias=module.bias is not None,
                        device="meta",
                    )
                    lin.weight = nn.Parameter(module.weight.dequantize(), requires_grad=False)
                    if module.bias is not None:
                        lin.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
                    parent, _, child = name.rpartition(".")
                    setattr(block.get_submodule(parent) if parent else block, child, lin)
    model.__dict__.pop("fastmid_quantize", None)
    return model


def frozen_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the decoder blocks' frozen linear weights as stored now (``"quantized"`` and
    ``"plain"``, each storage counted once) and what they take in bf16 (``"bf16"``)."""

    out = {"quantized": 0, "plain": 0, "bf16": 0}
    seen: set[int] = set()
    for block in find_decoder_layers(model):
        for module in block.modules():
            if not isinstance(module, (nn.Linear, LoraLinear, QuantizedLinear)):
                continue
            w = module.weight
            out["bf16"] += 2 * w.numel()
            if isinstance(w, QuantizedWeight):
                out["quantized"] += payload_bytes(w.payload)
            elif StorageWeakRef(w.untyped_storage()).cdata not in seen:
                # Storage identity, not its data pointer (which FakeTensor traces lack).
                seen.add(StorageWeakRef(w.untyped_storage()).cdata)
                out["plain"] += w.untyped_storage().nbytes()
    return out
