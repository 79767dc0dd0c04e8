"""Plumbing shared by the fused LoRA kernels.

- when to run Triton (`use_triton`) and in which dtype (`compute_dtype`, autocast aware);
- LoRA dropout: one keep-mask drawn from a seed tensor (`dropout_seed`), in-kernel
  (`keep_mask`, Philox via `tl.rand`) or on the torch path (`torch_keep_mask`, a counter-based
  hash), so backward redraws the mask instead of storing it;
- `traced`: whether a call needs the registered op (torch.compile, fake tensors) or can take
  the plain autograd.Function of the eager path;
- shipped autotune configs: each kernel module lists its own per arch (sm_80 / sm_90); here
  are the helpers to name them, turn them into `triton.Config`s, pick the family for a device,
  and `InspectTarget`, the registry entry `python -m fastmid.kernels.cubin_report` compiles.

Dropout convention used by every kernel: the mask is 0/1 and the 1/(1-p) rescale is folded
into the LoRA scale (`effective_scale`), so no kernel ever rescales a copy of `x`.
"""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensor

# `triton.jit` decides at decoration time whether it builds an interpreter function, so the
# switch is read once, here, before any kernel module decorates its kernels.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"
# `FASTMID_KERNEL_PATH=torch` runs the torch (cuBLAS) composition on CUDA too, `triton` or
# unset the fused kernels: the switch the GPU benchmarks compare the two paths with.
KERNEL_PATHS = ("triton", "torch")
KERNEL_PATH: str = os.environ.get("FASTMID_KERNEL_PATH", "triton")
if KERNEL_PATH not in KERNEL_PATHS:
    raise ValueError(f"FASTMID_KERNEL_PATH must be one of {KERNEL_PATHS}, got {KERNEL_PATH!r}")


def use_triton(t: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """True when the Triton kernels should run on `t` computed in `dtype` (default: the dtype a
    matmul on `t` runs in now, `compute_dtype(t)`): CUDA tensors, or under the Triton interpreter
    (`TRITON_INTERPRET=1`, as in the CPU test suite) real CPU tensors not computed in bf16,
    because the interpreter's bf16 `tl.dot` returns wrong numbers without an error. While
    torch.compile traces (fake tensors) the interpreter is never chosen: it cannot be traced.
    `FASTMID_KERNEL_PATH=torch` turns Triton off everywhere."""
    if KERNEL_PATH == "torch":
        return False
    if t.is_cuda:
        return True
    if not INTERPRET or isinstance(t, FakeTensor):
        return False
    return (compute_dtype(t) if dtype is None else dtype) != torch.bfloat16


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def traced(tensors: tuple) -> bool:
    """True while torch.compile traces, or when one of `tensors` (None allowed) is a tensor
    subclass (the fake tensors of a memory estimate, functional tensors, DTensor): the calls
    that must go through an op's registered `torch.library` op. Plain eager calls run a plain
    `torch.autograd.Function` instead: the dispatcher's Python round trip for a custom op and
    its backward measured about 1 ms per forward + backward on an H200, more than a decoder
    layer's adapter work at small shapes."""
    if torch.compiler.is_compiling():
        return True
    return any(t is not None and type(t) not in _PLAIN_TENSORS for t in tensors)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `t` runs in: the autocast dtype when autocast is on for its
    device, else `t`'s own dtype."""
    device_type = t.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return t.dtype


def dropout_seed(
    dropout_p: float, seed: int | torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """The dropout seed of one call as a 0-dim int64 tensor on `device` (None without dropout):
    `seed` if given, else drawn from torch's generator for `device` (reproducible under
    `torch.manual_seed`). A tensor, not a Python int, so nothing syncs with the device and
    torch.compile traces the draw without a graph break."""
    if dropout_p <= 0.0:
        return None
    if isinstance(seed, torch.Tensor):
        if seed.dtype == torch.int64 and seed.dim() == 0 and seed.device == device:
            return seed  # the per-micro-batch seed of a patched model: no op per call
        return seed.to(device=device, dtype=torch.int64).reshape(())
    if seed is None:
        return torch.randint(0, 2**31 - 1, (), device=device, dtype=torch.int64)
    # `full` writes the value on the device: no host-to-device copy.
    return torch.full((), int(seed), device=device, dtype=torch.int64)


def check_dropout(dropout_p: float) -> None:
    """Reject a dropout rate outside [0, 1): p = 1 would zero the adapter and divide by 0."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def effective_scale(scale: float, dropout_p: float) -> float:
    """LoRA scale with inverted-dropout's 1/(1-p) folded in (masks are plain 0/1)."""
    return float(scale) / (1.0 - dropout_p)


# Multipliers of the torch path's counter hash (odd 32-bit constants, as int32).
_GOLDEN = -1640531535  # 0x9E3779B1
_MIX1 = -2048144789  # 0x85EBCA6B
_MIX2 = -1028477387  # 0xC2B2AE35


def torch_keep_mask(
    shape: tuple[int, ...],
    dropout_p: float,
    seed: int | torch.Tensor,
    device: torch.device | str | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Bool keep-mask of `shape` (keep probability 1-p) for the torch path, a pure function of
    (seed + offset, flat row-major index): forward and backward both compute it, so it is
    never stored. `offset` is the caller's layer offset added to the micro-batch's seed.

    A counter-based hash, not `bernoulli_`: each 32-bit word of a multiply-xorshift hash of
    (seed, pair index) gives two 16-bit uniforms, one per element, kept when >= p·2¹⁶
    (p is resolved to 1/65536). In int32 tensor ops this is ~10x cheaper than torch's CPU
    Bernoulli draw, and it reads the seed as a tensor (no `.item()`)."""
    if not isinstance(seed, torch.Tensor):
        seed = torch.tensor(int(seed), dtype=torch.int64)
    device = seed.device if device is None else torch.device(device)
    n = math.prod(shape)
    h = torch.arange((n + 1) // 2, dtype=torch.int32, device=device)
    # int64 product, keep the low 32 bits: the seed mixed into every word.
    seed_term = seed.to(device) * _GOLDEN
    if offset:
        seed_term.add_(offset * _GOLDEN)
    h.mul_(_MIX1).add_(seed_term.to(torch.int32))
    tmp = torch.empty_like(h)
    # Logical right shifts (int32 shifts are arithmetic, so mask off the sign copies).
    torch.bitwise_right_shift(h, 16, out=tmp).bitwise_and_(0xFFFF)
    h.bitwise_xor_(tmp).mul_(_MIX2)
    torch.bitwise_right_shift(h, 15, out=tmp).bitwise_and_(0x1FFFF)
    h.bitwise_xor_(tmp).mul_(_MIX1)
    threshold = -32768 + round(dropout_p * 65536)
    return h.view(torch.int16)[:n].view(shape) >= threshold


@triton.jit
def keep_mask(seed, offsets, dropout_p):
    """In-kernel keep-mask (True = kept) for the flat element `offsets` of a row-major
    (M, K) input: the same (seed, offsets) give the same mask in forward and backward."""
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _keep_mask_kernel(Out, SEED, seed_offset, numel, dropout_p, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = keep_mask(tl.load(SEED) + seed_offset, offs, dropout_p)
    tl.store(Out + offs, keep.to(tl.float32), mask=offs < numel)


def triton_keep_mask(
    shape: tuple[int, ...],
    dropout_p: float,
    seed: int | torch.Tensor,
    device: torch.device,
    offset: int = 0,
) -> torch.Tensor:
    """Materialise the in-kernel keep-mask (0/1 fp32, row-major over `shape`) that the Triton
    kernels draw for (seed + offset, p); used to check kernels against the reference with the
    same mask."""
    out = torch.empty(shape, device=device, dtype=torch.float32)
    seed_t = dropout_seed(1.0, seed, device)
    numel = out.numel()
    block = 1024
    grid = (triton.cdiv(numel, block),)
    _keep_mask_kernel[grid](out, seed_t, offset, numel, dropout_p, BLOCK=block)
    return out


def rank_block(rank: int, widest: int = 64) -> int:
    """Block size over the LoRA rank: a power of two >= 16 (the smallest `tl.dot` dimension),
    at most `widest`. The masked dx update walks the rank in chunks of at most 64; the thin
    GEMM takes up to 128 at once, so x is read once for every rank up to 128."""
    return min(widest, max(16, triton.next_power_of_2(rank)))


# ---------------------------------------------------------------------------------------------
# Shipped configs. Each is a plain dict of block sizes + num_warps/num_stages; `cubin_report`
# (`cubin_report`) compiles every one for its arch and fails on any spill or a missing
# tensor-core instruction.
# ---------------------------------------------------------------------------------------------


def config_name(cfg: dict[str, int]) -> str:
    """Stable short name of a config, e.g. `BM128_BN128_BK64_BR32_w8_s3`."""
    parts = [f"{k}{v}" for k, v in cfg.items() if k not in ("num_warps", "num_stages")]
    return "_".join([*parts, f"w{cfg['num_warps']}", f"s{cfg['num_stages']}"])


def to_triton_configs(configs: list[dict[str, int]]) -> list[triton.Config]:
    """Turn shipped config dicts into `triton.Config`s for `triton.autotune`."""
    out = []
    for cfg in configs:
        kw = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
        out.append(triton.Config(kw, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    return out


def cuda_arch(device: torch.device) -> int:
    """Compute capability as an int (80, 86, 90, ...) of a CUDA device."""
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def shipped_arch(arch: int) -> int:
    """The shipped config family for a device: sm_90 configs on Hopper and newer, sm_80 ones
    (Ampere/Ada: mma.sync tensor cores, 100-164 KB shared memory) below."""
    return 90 if arch >= 90 else 80


@dataclass(frozen=True)
class InspectTarget:
    """One kernel `cubin_report` compiles ahead of time: the jit function, its argument signature
    (`{"X": "*{dtype}", "M": "i32", "scale": "fp32", ...}`; `{dtype}` is filled in per
    compute dtype), constexprs fixed for this target, and the shipped configs per arch whose
    keys are the remaining constexprs plus `num_warps` / `num_stages`."""

    name: str
    fn: object
    signature: dict[str, str]
    constexprs: dict[str, object] = field(default_factory=dict)
    configs: dict[int, list[dict[str, int]]] = field(default_factory=dict)
    # Integer arguments assumed divisible by 16, as Triton's runtime specialises them for
    # typical shapes (pointers are always taken as 16-byte aligned, as torch allocates them).
    divisible: tuple[str, ...] = ()


def kernel_signature(
    fn, pointers: dict[str, str], floats: tuple[str, ...] = (), ones: tuple[str, ...] = ()
) -> tuple[dict[str, str], dict[str, object]]:
    """Signature and constexprs of `fn` for `InspectTarget`: `pointers` maps pointer arguments
    to their type (`"*{dtype}"` or e.g. `"*fp32"`), `floats` are fp32 scalars, `ones` are
    unit strides (the runtime turns an int equal to 1 into a constant, so ahead-of-time
    compilation must too), every other non-constexpr argument is an i32."""
    signature: dict[str, str] = {}
    constexprs: dict[str, object] = {}
    # Read the Python function's own parameters: under TRITON_INTERPRET=1 `fn` is an
    # interpreter wrapper without the JIT metadata, and the registry must still import.
    params = inspect.signature(getattr(fn, "fn", fn)).parameters.values()
    for param in params:
        name = param.name
        if "constexpr" in str(param.annotation) or name in ones:
            signature[name] = "constexpr"
            if name in ones:
                constexprs[name] = 1
        elif name in pointers:
            signature[name] = pointers[name]
        elif name in floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature, constexprs
