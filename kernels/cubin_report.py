"""Compile every fastmid kernel x every shipped config for a GPU arch, with no GPU present.

    python -m fastmid.kernels.cubin_report [--arch 80|90] [--json] [--summary] [--cubin-dir DIR]

For each (kernel, config) it builds the cubin with `triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`, reads registers / stack / local memory with the
`cuobjdump -res-usage` shipped in the triton wheel, and counts tensor-core instructions (HGMMA
on sm_90, HMMA on sm_80) and the widest wgmma tile N (sm_90) in the `nvdisasm` listing. Exit
status 1 when any config spills (stack or local bytes > 0), emits no tensor-core instruction,
or uses more than REGISTER_BUDGET registers per thread: such a config would run, but slower
than its neighbours or with no room for the compiler's next choice, so it must not ship.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ._common import InspectTarget, config_name

# One module per op; each lists the launches it makes in `INSPECT_TARGETS`.
# (lora_qkv and lora_gate_up make lora_linear's launches with more rank columns: the frozen
# GEMMs of all three are cuBLAS's.)
KERNEL_MODULES = ("lora_linear", "nf4_matmul")
TENSOR_CORE_OPCODE = {90: "HGMMA", 80: "HMMA"}
# Registers per thread a shipped config may use: 255 is the hardware cap, and a kernel at it
# has no headroom (the next compiler release or a small code change tips it into spilling).
REGISTER_BUDGET = 232
# sm_90 warpgroup MMA as nvdisasm prints it, e.g. `HGMMA.64x128x16.F32.BF16`: the N of the tile.
_WGMMA_N = re.compile(r"\bHGMMA\.\d+x(\d+)x\d+")


@dataclass
class Report:
    """What one compiled (kernel, config) uses on the target arch."""

    kernel: str
    config: str
    arch: int
    dtype: str
    registers: int
    spill_bytes: int
    stack_bytes: int
    local_bytes: int
    shared_bytes: int
    tensor_core_instructions: int
    widest_wgmma_n: int  # 0 on sm_80 (mma.sync, no wgmma)

    @property
    def ok(self) -> bool:
        return (
            self.spill_bytes == 0
            and self.tensor_core_instructions > 0
            and self.registers <= REGISTER_BUDGET
        )


def nvidia_tool(name: str) -> str:
    """Path of a CUDA binary shipped in the triton wheel (cuobjdump, nvdisasm)."""
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found in the triton wheel at {path}")
    return str(path)


def targets() -> list[InspectTarget]:
    """Every registered kernel target, in module order."""
    modules = [importlib.import_module(f".{name}", __package__) for name in KERNEL_MODULES]
    return [t for module in modules for t in module.INSPECT_TARGETS]


def compile_one(target: InspectTarget, config: dict[str, int], arch: int, dtype: str):
    """Compile one target with one config for `arch`; returns triton's compiled kernel."""
    signature = {k: v.format(dtype=dtype) for k, v in target.signature.items()}
    constexprs = dict(target.constexprs)
    constexprs.update({k: v for k, v in config.items() if k not in ("num_warps", "num_stages")})
    arg_names = target.fn.arg_names
    attrs = {
        (arg_names.index(name),): [["tt.divisibility", 16]]
        for name, kind in signature.items()
        if kind.startswith("*") or name in target.divisible
    }
    src = ASTSource(fn=target.fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def analyse(cubin: bytes, arch: int) -> tuple[int, int, int, int, int]:
    """(registers, stack bytes, local bytes, tensor-core instruction count, widest wgmma N)
    of a cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        # Both tools read the same file; run them side by side.
        commands = ([nvidia_tool("cuobjdump"), "-res-usage"], [nvidia_tool("nvdisasm")])
        procs = [
            subprocess.Popen(
                [*cmd, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for cmd in commands
        ]
        # nvdisasm chatters about ELF formats on stderr; keep it for failures only.
        (res, res_err), (sass, sass_err) = (proc.communicate() for proc in procs)
        for proc, err in zip(procs, (res_err, sass_err), strict=True):
            if proc.returncode != 0:
                raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}: {err}")
    match = _RES.search(res)
    if match is None:
        raise RuntimeError(f"unexpected cuobjdump output:\n{res}")
    regs, stack, _, local = (int(g) for g in match.groups())
    opcode = TENSOR_CORE_OPCODE[arch]
    mma = sum(1 for line in sass.splitlines() if re.search(rf"\b{opcode}\b", line))
    wgmma_n = max((int(n) for n in _WGMMA_N.findall(sass)), default=0)
    return regs, stack, local, mma, wgmma_n


def _inspect_one(job: tuple[int, int, int, str, Path | None]) -> Report:
    """Compile and analyse config `ci` of target `ti` (indices, so jobs pickle cheaply)."""
    ti, ci, arch, dtype, cubin_dir = job
    target = targets()[ti]
    config = target.configs[arch][ci]
    kernel = compile_one(target, config, arch, dtype)
    cubin = kernel.asm["cubin"]
    name = config_name(config)
    if cubin_dir is not None:
        cubin_dir.mkdir(parents=True, exist_ok=True)
        tmp = cubin_dir / f".{target.name}__{name}.cubin.tmp"
        tmp.write_bytes(cubin)
        os.replace(tmp, cubin_dir / f"{target.name}__{name}.cubin")
    regs, stack, local, mma, wgmma_n = analyse(cubin, arch)
    return Report(
        kernel=target.name,
        config=name,
        arch=arch,
        dtype=dtype,
        registers=regs,
        spill_bytes=stack + local,
        stack_bytes=stack,
        local_bytes=local,
        shared_bytes=int(kernel.metadata.shared),
        tensor_core_instructions=mma,
        widest_wgmma_n=wgmma_n,
    )


def inspect_all(
    arch: int,
    dtype: str = "bf16",
    cubin_dir: Path | None = None,
    kernel_filter: str | None = None,
    jobs: int = 1,
) -> list[Report]:
    """Compile and analyse every target (whose name contains `kernel_filter`, if given) x
    shipped config for `arch`, on `jobs` worker processes (compilation is CPU-bound)."""
    work = [
        (ti, ci, arch, dtype, cubin_dir)
        for ti, target in enumerate(targets())
        if kernel_filter is None or kernel_filter in target.name
        for ci in range(len(target.configs[arch]))
    ]
    if jobs <= 1:
        return [_inspect_one(job) for job in work]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_inspect_one, work))


def format_table(reports: list[Report]) -> str:
    """Fixed-width text table, one row per (kernel, config)."""
    head = (
        f"{'kernel':<28} {'config':<30} {'regs':>4} {'spill':>5} {'smem':>7} {'mma':>4} "
        f"{'wgN':>4}  ok"
    )
    lines = [head, "-" * len(head)]
    for r in reports:
        lines.append(
            f"{r.kernel:<28} {r.config:<30} {r.registers:>4} {r.spill_bytes:>5} "
            f"{r.shared_bytes:>7} {r.tensor_core_instructions:>4} {r.widest_wgmma_n:>4}  "
            f"{'yes' if r.ok else 'NO'}"
        )
    return "\n".join(lines)


def summarize(reports: list[Report]) -> list[dict[str, object]]:
    """One row per kernel: its configs' register range, total spill bytes, tensor-core
    instructions (min over configs) and widest wgmma N."""
    rows: dict[str, list[Report]] = {}
    for r in reports:
        rows.setdefault(r.kernel, []).append(r)
    return [
        {
            "kernel": name,
            "arch": group[0].arch,
            "configs": len(group),
            "registers_min": min(r.registers for r in group),
            "registers_max": max(r.registers for r in group),
            "spill_bytes": sum(r.spill_bytes for r in group),
            "tensor_core_instructions_min": min(r.tensor_core_instructions for r in group),
            "widest_wgmma_n": max(r.widest_wgmma_n for r in group),
            "ok": all(r.ok for r in group),
        }
        for name, group in rows.items()
    ]


def format_summary(summary: list[dict[str, object]]) -> str:
    """Fixed-width text table of `summarize`."""
    head = (
        f"{'kernel':<28} {'arch':>4} {'cfgs':>4} {'regs':>9} {'spill':>5} {'mma':>5} {'wgN':>4}  ok"
    )
    lines = [head, "-" * len(head)]
    for s in summary:
        regs = f"{s['registers_min']}-{s['registers_max']}"
        lines.append(
            f"{s['kernel']:<28} {s['arch']:>4} {s['configs']:>4} {regs:>9} {s['spill_bytes']:>5} "
            f"{s['tensor_core_instructions_min']:>5} {s['widest_wgmma_n']:>4}  "
            f"{'yes' if s['ok'] else 'NO'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastmid.kernels.cubin_report",
        description="Compile every kernel x shipped config for a GPU arch (no GPU needed) and "
        "report registers, spills, shared memory, tensor-core instructions and wgmma width.",
    )
    parser.add_argument("--arch", type=int, choices=(80, 90), default=90)
    parser.add_argument("--json", action="store_true", help="print a JSON list instead")
    parser.add_argument("--summary", action="store_true", help="one row per kernel instead")
    parser.add_argument("--cubin-dir", type=Path, help="write <kernel>__<config>.cubin here")
    parser.add_argument("--kernel", help="only kernels whose name contains this string")
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes"
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("cubin_report compiles real kernels: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    # Fusing mul+add into FMA is what the runtime does today; saying so explicitly keeps the
    # build identical to a launch and silences triton's warning about the default changing.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    reports = inspect_all(
        args.arch, cubin_dir=args.cubin_dir, kernel_filter=args.kernel, jobs=args.jobs
    )
    if not reports:
        print(f"no kernel matches {args.kernel!r}", file=sys.stderr)
        return 2
    if args.json:
        rows = summarize(reports) if args.summary else [asdict(r) for r in reports]
        print(json.dumps(rows, indent=1))
    else:
        print(format_summary(summarize(reports)) if args.summary else format_table(reports))
    bad = [r for r in reports if not r.ok]
    for r in bad:
        print(
            f"{r.kernel} {r.config}: {r.spill_bytes} spill bytes, "
            f"{r.tensor_core_instructions} tensor-core instructions, {r.registers} registers "
            f"(budget {REGISTER_BUDGET})",
            file=sys.stderr,
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
