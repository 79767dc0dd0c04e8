"""``torch.compile`` of the decoder blocks, frozen and adapted.

Each block is compiled on its own (``nn.Module.compile``, so the instance-level forward
wrappers of the patch stay in force) and inductor fuses the RMSNorm, RoPE, SiLU-mul and
residual work around the GEMMs. Packed batches change length every step, so the blocks are
compiled with ``dynamic=True``: the sequence length is symbolic and a new length does not
recompile. Varlen attention reads its example boundaries on the host and runs eagerly between
the compiled regions (it is marked ``torch.compiler.disable``).

``compile`` is ``"on"``, ``"off"`` or ``"auto"``; :func:`resolve_compile` says what auto means.
"""

from __future__ import annotations

import torch
from torch import nn

COMPILE_MODES = ("auto", "on", "off")


def resolve_compile(mode: str, device: torch.device, dropout: float) -> bool:
    """Whether to compile the blocks for ``mode`` on ``device`` with LoRA ``dropout``.

    ``auto`` compiles on CPU when dropout is 0, where compiled blocks once made a SmolLM2-135M
    step (bf16, 2 threads) about 10% faster. With the default dropout the ops trace without a
    graph break (the seed is a tensor), but the bench's ``compile`` workload measured 1.02x
    against eager blocks for 15 s of compiling on an idle 2-core machine, inside the
    run-to-run noise: not a win worth a default. On CUDA the Triton kernels and Liger (frozen
    blocks) stay in charge until the bench shows compile beating them.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if mode != "auto":
        return mode == "on"
    return device.type == "cpu" and dropout == 0.0


def compile_blocks(blocks: nn.ModuleList) -> int:
    """Compile every block of ``blocks`` in place (dynamic shapes); returns how many."""
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)


def compile_seconds() -> float:
    """Seconds this process has spent in torch.compile so far (dynamo + inductor)."""
    from torch._dynamo.utils import compilation_time_metrics

    return float(sum(compilation_time_metrics.get("_compile.compile_inner", [])))


class CompileTimer:
    """Compile time since this timer was made; compilation is lazy (first call of each new
    graph), so a run's compile time accrues during its first steps."""

    def __init__(self) -> None:
        self.start = compile_seconds()

    def seconds(self) -> float:
        """Seconds spent compiling since the timer was created."""
        return compile_seconds() - self.start
