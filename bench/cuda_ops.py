"""CUDA only: each fused op on the Triton path and on the torch (cuBLAS) path against the unfused
PEFT composition, bf16 forward + backward with dropout, at SmolLM2-135M, 1B and Llama-3-8B layer
shapes: `triton.testing.do_bench` GPU time, host time per call and peak memory.

``python -m bench.cuda_ops`` runs itself once per path (``FASTMID_KERNEL_PATH`` is read when the
kernels are imported) and prints one table row per op, shape and path. The measurements in
``bench/results/h200`` were taken with earlier ad-hoc versions of this script.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

# (name, tokens, hidden, (q, k, v) widths, intermediate, rank)
SHAPES = (
    ("SmolLM2-135M", 4096, 576, (576, 192, 192), 1536, 106),
    ("OLMo2-1B", 8192, 2048, (2048, 2048, 2048), 8192, 64),
    ("Llama-3-8B", 8192, 4096, (4096, 1024, 1024), 14336, 64),
)
DROPOUT, SCALE = 0.05, 2.0


def _cases(tokens: int, hidden: int, qkv: tuple[int, ...], inter: int, rank: int) -> list[Any]:
    """(op, fused step, unfused step, input) of one layer shape: each step runs forward and
    backward with all-ones upstream gradients."""
    import torch
    import torch.nn.functional as F

    from fastmid import kernels

    dt = torch.bfloat16
    x = torch.randn(tokens, hidden, device="cuda", dtype=dt, requires_grad=True)

    def adapter(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = (torch.randn(rank, hidden, device="cuda") / hidden**0.5).requires_grad_()
        b = (torch.randn(n, rank, device="cuda") / rank**0.5).requires_grad_()
        return a, b

    def frozen(n: int) -> torch.Tensor:
        return torch.randn(n, hidden, device="cuda", dtype=dt) / hidden**0.5

    def peft(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # PEFT's LoraLayer: base linear, dropout on x, two adapter matmuls, scaled add.
        lora = F.linear(F.linear(F.dropout(x, DROPOUT), a.to(dt)), b.to(dt))
        return F.linear(x, w) + SCALE * lora

    def backward(out: Any) -> None:
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    w_o, (a_o, b_o) = frozen(hidden), adapter(hidden)
    w_qkv, qkv_ad = frozen(sum(qkv)), [adapter(n) for n in qkv]
    a_qkv, b_qkv = [a for a, _ in qkv_ad], [b for _, b in qkv_ad]
    w_gu, (a_g, b_g), (a_u, b_u) = frozen(2 * inter), adapter(inter), adapter(inter)
    w_g, w_u = w_gu.split(inter)
    return [
        (
            "o",
            lambda: backward(kernels.lora_linear(x, w_o, a_o, b_o, SCALE, dropout_p=DROPOUT)),
            lambda: backward(peft(w_o, a_o, b_o)),
            x,
        ),
        (
            "qkv",
            lambda: backward(kernels.lora_qkv(x, w_qkv, *a_qkv, *b_qkv, SCALE, dropout_p=DROPOUT)),
            lambda: backward(
                [
                    peft(w, a, b)
                    for w, a, b in zip(w_qkv.split(list(qkv)), a_qkv, b_qkv, strict=True)
                ]
            ),
            x,
        ),
        (
            "gate_up",
            lambda: backward(kernels.lora_gate_up(x, w_gu, a_g, a_u, b_g, b_u, SCALE, DROPOUT)),
            lambda: backward(F.silu(peft(w_g, a_g, b_g)) * peft(w_u, a_u, b_u)),
            x,
        ),
    ]


def _measure(step: Callable[[], None], x: Any) -> tuple[float, float, float]:
    """(GPU ms by do_bench, host ms per call, peak MiB) of one forward + backward."""
    import torch
    import triton

    torch.cuda.reset_peak_memory_stats()
    gpu_ms = triton.testing.do_bench(step, grad_to_none=[x])
    peak = torch.cuda.max_memory_allocated() / 2**20
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        step()
    host_ms = (time.perf_counter() - start) / 20 * 1e3
    torch.cuda.synchronize()
    return gpu_ms, host_ms, peak


def run_path(path: str) -> None:
    """Print the rows of the kernel path this process imported."""
    import torch

    torch.manual_seed(0)
    for name, *shape in SHAPES:
        for op, fused, unfused, x in _cases(*shape):
            f_ms, f_host, f_mib = _measure(fused, x)
            u_ms, u_host, u_mib = _measure(unfused, x)
            print(
                f"| {path} | {name} | {op} | {f_ms:.3f} | {f_host:.3f} | {f_mib:.0f} | "
                f"{u_ms:.3f} | {u_host:.3f} | {u_mib:.0f} | {u_ms / f_ms:.2f}x |",
                flush=True,
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cuda_ops")
    parser.add_argument("--path", choices=("triton", "torch"), default=None)
    args = parser.parse_args(argv)
    if args.path is not None:
        run_path(args.path)
        return 0
    print(
        "| path | model | op | fused ms | fused host ms | fused MiB | unfused ms | "
        "unfused host ms | unfused MiB | speed-up |"
    )
    print("|---" * 10 + "|", flush=True)
    for path in ("triton", "torch"):
        env = {**os.environ, "FASTMID_KERNEL_PATH": path}
        cmd = [sys.executable, "-m", "bench.cuda_ops", "--path", path]
        subprocess.run(cmd, env=env, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
