"""Liger's Triton RMSNorm and SiLU-mul for the frozen decoder blocks (CUDA only).

Adapted blocks keep their own modules (their MLP may already run ``lora_gate_up``); this only
swaps the forwards of frozen RMSNorms and plain SwiGLU MLPs, on module instances, through
:func:`fastmid.engine.blocks.wrap_forward` so that ``unpatch_forwards`` undoes it like every other
wrapper. Without ``liger_kernel`` installed, or off CUDA, nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fastmid.engine.blocks import is_silu, wrap_forward

# RMSNorm classes computing w * x / rms(x) with the weight applied after the cast back to the
# input dtype, i.e. Liger's "llama" casting mode. Gemma's (1 + w) norms are left alone.
_LLAMA_STYLE_NORMS = {
    "LlamaRMSNorm",
    "MistralRMSNorm",
    "Qwen2RMSNorm",
    "Qwen3RMSNorm",
    "Olmo2RMSNorm",
}


def _liger_ops(device: torch.device) -> tuple[Any, Any] | None:
    """Liger's RMSNorm and SiLU-mul Functions where they run: on CUDA, with liger_kernel."""
    if device.type != "cuda":
        return None
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except ImportError:
        return None
    return LigerRMSNormFunction, LigerSiLUMulFunction


def apply_liger_to_frozen(blocks: list[nn.Module]) -> int:
    """Run the RMSNorms and SwiGLU MLPs of frozen ``blocks`` with Liger's Triton kernels.

    Only on CUDA and only when ``liger_kernel`` is importable; adapted blocks keep their own
    modules (their MLP may already run ``lora_gate_up``). Returns how many modules were patched.
    """
    ops = _liger_ops(next(blocks[0].parameters()).device) if blocks else None
    if ops is None:
        return 0
    rms_fn, silu_mul_fn = ops
    patched = 0
    for block in blocks:
        for module in block.modules():
            if "forward" in module.__dict__:
                continue
            if type(module).__name__ in _LLAMA_STYLE_NORMS:
                eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", 1e-6)
                wrap_forward(module, lambda m, _f, e=eps: _liger_rms_forward(m, rms_fn, e))
                patched += 1
            elif _is_plain_swiglu(module):
                wrap_forward(module, lambda m, _f: _liger_swiglu_forward(m, silu_mul_fn))
                patched += 1
    return patched


def _liger_rms_forward(module: nn.Module, fn: Any, eps: float) -> Callable[..., Any]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return fn.apply(x, module.weight, eps, 0.0, "llama")

    return forward


def _liger_swiglu_forward(mlp: nn.Module, fn: Any) -> Callable[..., Any]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return mlp.down_proj(fn.apply(mlp.gate_proj(x), mlp.up_proj(x)))

    return forward


def _is_plain_swiglu(mlp: nn.Module) -> bool:
    """A frozen down(silu(gate(x)) * up(x)) MLP made of plain nn.Linear layers."""
    parts = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    return all(type(p) is nn.Linear for p in parts) and is_silu(getattr(mlp, "act_fn", None))
