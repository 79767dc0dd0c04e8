"""Plumbing shared by the fused LoRA kernels.

- when to run Triton (`use_triton`) and in which dtype (`compute_dtype`, autocast aware);
- LoRA dropout: one Bernoulli keep-mask drawn from a seed, in-kernel (`keep_mask`, Philox
  via `tl.rand`) or on the torch path (`torch_keep_mask`, a seeded `torch.Generator`), so
  backward redraws the mask instead of storing it;
- shipped autotune configs: each kernel module lists its own per arch (sm_80 / sm_90); here
  are the helpers to name them, turn them into `triton.Config`s, pick the family for a device,
  and `InspectTarget`, the registry entry `python -m fastmid.kernels.inspect` compiles.

Dropout convention used by every kernel: the mask is 0/1 and the 1/(1-p) rescale is folded
into the LoRA scale (`effective_scale`), so no kernel ever rescales a copy of `x`.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

# `triton.jit` decides at decoration time whether it builds an interpreter function, so the
# switch is read once, here, before any kernel module decorates its kernels.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """True when the Triton kernels should run on `t`: CUDA tensors, or under the Triton
    interpreter (`TRITON_INTERPRET=1`, as in the CPU test suite) anything not computed in
    bf16, because the interpreter's bf16 `tl.dot` returns wrong numbers without an error.
    Pass the tensor in the dtype the kernels will compute in (in backward, where autocast is
    usually off, the cast copy rather than the saved original)."""
    return t.is_cuda or (INTERPRET and compute_dtype(t) != torch.bfloat16)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `t` runs in: the autocast dtype when autocast is on for its
    device, else `t`'s own dtype."""
    device_type = t.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return t.dtype


def draw_seed(dropout_p: float, seed: int | None) -> int:
    """The dropout seed for one call: `seed` if given, else drawn from torch's default RNG
    (so runs are reproducible under `torch.manual_seed`). Without dropout no RNG is used."""
    if dropout_p <= 0.0:
        return 0
    if seed is not None:
        return int(seed)
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def check_dropout(dropout_p: float) -> None:
    """Reject a dropout rate outside [0, 1): p = 1 would zero the adapter and divide by 0."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def effective_scale(scale: float, dropout_p: float) -> float:
    """LoRA scale with inverted-dropout's 1/(1-p) folded in (masks are plain 0/1)."""
    return float(scale) / (1.0 - dropout_p)


def torch_keep_mask(
    shape: tuple[int, ...], dropout_p: float, seed: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """0/1 keep-mask of `shape` (keep probability 1-p), a pure function of `seed`: forward and
    backward of the torch path both call it, so the mask is never stored."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.empty(shape, device=device, dtype=dtype).bernoulli_(1.0 - dropout_p, generator=gen)


@triton.jit
def keep_mask(seed, offsets, dropout_p):
    """In-kernel keep-mask (True = kept) for the flat element `offsets` of a row-major
    (M, K) input: the same (seed, offsets) give the same mask in forward and backward."""
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _keep_mask_kernel(Out, numel, seed, dropout_p, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = keep_mask(seed, offs, dropout_p)
    tl.store(Out + offs, keep.to(tl.float32), mask=offs < numel)


def triton_keep_mask(
    shape: tuple[int, ...], dropout_p: float, seed: int, device: torch.device
) -> torch.Tensor:
    """Materialise the in-kernel keep-mask (0/1 fp32, row-major over `shape`) that the Triton
    kernels draw for (seed, p); used to check kernels against the reference with the same mask."""
    out = torch.empty(shape, device=device, dtype=torch.float32)
    numel = out.numel()
    block = 1024
    _keep_mask_kernel[(triton.cdiv(numel, block),)](out, numel, seed, dropout_p, BLOCK=block)
    return out


def rank_block(rank: int) -> int:
    """Block size over the LoRA rank: a power of two >= 16 (the smallest `tl.dot` dimension),
    capped at 64 so a rank-128 adapter is walked in two chunks instead of one huge tile."""
    return min(64, max(16, triton.next_power_of_2(rank)))


# ---------------------------------------------------------------------------------------------
# Shipped configs. Each is a plain dict of block sizes + num_warps/num_stages; `inspect`
# compiles every one for its arch and fails on any spill or a missing tensor-core instruction.
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
    """One kernel `inspect` compiles ahead of time: the jit function, its argument signature
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
