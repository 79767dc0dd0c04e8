"""Each fused op against the unfused PEFT composition, forward + backward with LoRA dropout, bf16
activations and frozen weights, fp32 adapters, at SmolLM2-135M, OLMo2-1B and Llama-3-8B layer
shapes: GPU time (`triton.testing.do_bench`), host time per call and peak memory.

``python -m bench.cuda_ops`` prints a markdown table; `op_rows(device)` returns the rows for
other tools (the GPU bench). Each op runs on two paths: `default` (the dispatch the ops ship
with: cuBLAS for the frozen GEMMs, Triton for the dropout-masked products) and `torch` (the
torch composition everywhere, `FASTMID_KERNEL_PATH=torch`), so the table says whether the
Triton products pay. `gate_up_recompute` is gate/up's memory mode.

Host time is the calling thread's CPU time per call (`time.thread_time`) over calls issued
back to back after a synchronize, so it counts Python, dispatch and launches, not waiting for
the GPU. On a CPU (`op_rows("cpu")`, the smoke mode) the shapes are tiny and GPU time is wall
time per call.
"""

from __future__ import annotations

import argparse
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
SMOKE_SHAPES = (("tiny", 64, 48, (48, 16, 16), 96, 8),)
PATHS = ("default", "torch")
DROPOUT, SCALE = 0.05, 2.0
HOST_CALLS = 20


def _cases(device: str, tokens: int, hidden: int, qkv: tuple[int, ...], inter: int, rank: int):
    """(op, fused step, unfused step, x) of one layer shape: each step runs forward and
    backward with all-ones upstream gradients."""
    import torch
    import torch.nn.functional as F

    from fastmid import kernels

    dt = torch.bfloat16
    x = torch.randn(tokens, hidden, device=device, dtype=dt, requires_grad=True)
    seed = torch.tensor(1, device=device)

    def adapter(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.nn.Parameter(torch.randn(rank, hidden, device=device) / hidden**0.5)
        b = torch.nn.Parameter(torch.randn(n, rank, device=device) / rank**0.5)
        return a, b

    def frozen(n: int) -> torch.Tensor:
        return torch.randn(n, hidden, device=device, dtype=dt) / hidden**0.5

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

    def gate_up(recompute: bool) -> Callable[[], None]:
        return lambda: backward(
            kernels.lora_gate_up(
                x, w_gu, a_g, a_u, b_g, b_u, SCALE, DROPOUT, seed, 2, recompute=recompute
            )
        )

    peft_gate_up = lambda: backward(F.silu(peft(w_g, a_g, b_g)) * peft(w_u, a_u, b_u))
    return [
        (
            "o",
            lambda: backward(kernels.lora_linear(x, w_o, a_o, b_o, SCALE, None, DROPOUT, seed)),
            lambda: backward(peft(w_o, a_o, b_o)),
            x,
        ),
        (
            "qkv",
            lambda: backward(
                kernels.lora_qkv(x, w_qkv, *a_qkv, *b_qkv, SCALE, None, DROPOUT, seed, 1)
            ),
            lambda: backward(
                [
                    peft(w, a, b)
                    for w, a, b in zip(w_qkv.split(list(qkv)), a_qkv, b_qkv, strict=True)
                ]
            ),
            x,
        ),
        ("gate_up", gate_up(False), peft_gate_up, x),
        ("gate_up_recompute", gate_up(True), peft_gate_up, x),
    ]


def _measure(step: Callable[[], None], x: Any) -> tuple[float, float, float]:
    """(GPU ms, host ms per call, peak MiB; 0 on CPU) of one forward + backward."""
    import torch

    cuda = x.is_cuda
    step()  # warm-up: autotuning, the adapters' cached copies
    if cuda:
        import triton

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        gpu_ms = triton.testing.do_bench(step, grad_to_none=[x])
        peak = torch.cuda.max_memory_allocated() / 2**20
        torch.cuda.synchronize()
    else:
        start = time.perf_counter()
        for _ in range(3):
            step()
        gpu_ms, peak = (time.perf_counter() - start) / 3 * 1e3, 0.0
    start = time.thread_time()
    for _ in range(HOST_CALLS):
        step()
    host_ms = (time.thread_time() - start) / HOST_CALLS * 1e3
    if cuda:
        torch.cuda.synchronize()
    return gpu_ms, host_ms, peak


def op_rows(
    device: str = "cuda",
    shapes=None,
    paths=PATHS,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per (path, layer shape, op): fused and unfused GPU ms, host ms per call, peak
    MiB and the speed-up (unfused ms / fused ms). `shapes` defaults to the three model shapes
    on CUDA and a tiny one elsewhere; `on_row` sees each row as soon as it is measured."""
    import torch
    from fastmid.kernels import _common

    shapes = shapes or (SHAPES if device.startswith("cuda") else SMOKE_SHAPES)
    rows = []
    saved_path = _common.KERNEL_PATH
    try:
        for path in paths:
            # The dispatch reads the switch per call: "torch" turns every Triton product off.
            _common.KERNEL_PATH = "torch" if path == "torch" else saved_path
            torch.manual_seed(0)
            for name, tokens, hidden, qkv, inter, rank in shapes:
                for op, fused, unfused, x in _cases(device, tokens, hidden, qkv, inter, rank):
                    f_ms, f_host, f_mib = _measure(fused, x)
                    u_ms, u_host, u_mib = _measure(unfused, x)
                    rows.append({
                        "path": path, "model": name, "op": op, "tokens": tokens,
                        "hidden": hidden, "rank": rank, "dropout": DROPOUT,
                        "fused_ms": round(f_ms, 4), "fused_host_ms": round(f_host, 4),
                        "fused_peak_mib": round(f_mib), "unfused_ms": round(u_ms, 4),
                        "unfused_host_ms": round(u_host, 4), "unfused_peak_mib": round(u_mib),
                        "speedup": round(u_ms / f_ms, 3),
                    })  # fmt: skip
                    if on_row is not None:
                        on_row(rows[-1])
    finally:
        _common.KERNEL_PATH = saved_path
    return rows


COLUMNS = (
    "path", "model", "op", "fused_ms", "fused_host_ms", "fused_peak_mib", "unfused_ms",
    "unfused_host_ms", "unfused_peak_mib", "speedup",
)  # fmt: skip


def format_row(row: dict[str, Any]) -> str:
    """One markdown table row."""
    return "| " + " | ".join(str(row[c]) for c in COLUMNS) + " |"


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---" * len(COLUMNS) + "|"]
    return "\n".join(lines + [format_row(r) for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cuda_ops", description=__doc__)
    parser.add_argument("--path", choices=PATHS, action="append", help="default: both")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    args = parser.parse_args(argv)
    import torch

    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    # Rows are printed as they are measured: a caller that stops this process on a time budget
    # (bench.gpu) keeps the table so far.
    print(format_rows([]), flush=True)
    op_rows(
        device, paths=tuple(args.path or PATHS), on_row=lambda r: print(format_row(r), flush=True)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
