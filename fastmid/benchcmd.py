"""``fastmid bench``: fastmid against standard LoRA (PEFT) on throughput, memory and FLOPs.

The suite lives in the source checkout's ``bench/`` folder (it is not part of the installed
package): it is found in the current directory or in the checkout fastmid was installed from
in editable mode. Prints a table and writes JSON, CSV and PNG reports.

This command is a thin door: it checks the environment, then hands its flags to
``bench.suite`` (imported only here, when the command runs), which knows the workloads,
providers and precisions and validates them. fastmid itself never depends on ``bench``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from fastmid.errors import UserError

_SUITE_FILES = ("__init__.py", "suite.py", "providers.py", "report.py")


def _source_checkouts() -> list[Path]:
    """Directories that may hold the benchmark suite: the cwd, then fastmid's own source root."""
    here = Path(__file__).resolve().parent.parent
    out = []
    for cand in (Path.cwd().resolve(), here):
        if cand not in out:
            out.append(cand)
    return out


def find_suite_root() -> Path:
    """The checkout whose ``bench/`` holds the suite; UserError when there is none."""
    for root in _source_checkouts():
        if all((root / "bench" / f).is_file() for f in _SUITE_FILES):
            return root
    raise UserError(
        "fastmid bench needs the benchmark suite (bench/) of a fastmid source checkout: run it "
        "from the repository, or install fastmid from a checkout with pip install -e ."
    )


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fastmid bench``."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny model, one timed step, small shapes: proves the machinery in about a minute",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="report directory (default: bench/results, or bench/results/quick with --quick)",
    )
    parser.add_argument(
        "--workloads",
        type=_csv,
        default=None,
        help="comma list of workloads (default: all; a wrong name lists them); gpu runs alone: "
        "the GPU benchmark on real model shapes (python -m bench.gpu; --quick = its CPU smoke)",
    )
    parser.add_argument(
        "--providers",
        type=_csv,
        default=None,
        help="comma list of providers (default: all; a wrong name lists them)",
    )
    parser.add_argument(
        "--dtypes", type=_csv, default=None, help="comma list of precisions (default: all)"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps per provider")
    parser.add_argument("--warmup", type=int, default=None, help="discarded warm-up steps")
    parser.add_argument(
        "--batch-tokens", type=int, default=None, help="real tokens per step (packing budget)"
    )
    parser.add_argument(
        "--loss-on",
        default=None,
        help="fastmid's loss positions, as fastmid train's --loss-on (PEFT takes every token)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )


def run(args: argparse.Namespace) -> int:
    """Run the suite, print the summary tables, write the reports; returns the exit code."""
    root = find_suite_root()
    if importlib.util.find_spec("peft") is None:
        raise UserError(
            "fastmid bench compares against PEFT, which is not installed: pip install peft"
        )
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # The interpreter is a correctness tool: timing it would say nothing about fastmid.
        raise UserError("TRITON_INTERPRET is set: unset it, the benchmark times the real kernels")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be positive, got {args.threads}")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if args.workloads and "gpu" in args.workloads:
        return _run_gpu(args)
    import torch

    from bench import suite

    given = {k: getattr(args, k) for k in ("workloads", "providers", "dtypes", "steps")}
    given.update(warmup=args.warmup, batch_tokens=args.batch_tokens, loss_on=args.loss_on)
    options = suite.options_from_cli(args.quick, **given)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    default_out = root / "bench" / "results" / ("quick" if args.quick else "")
    return suite.command(options, Path(args.out) if args.out else default_out)


def _run_gpu(args: argparse.Namespace) -> int:
    """``--workloads gpu``: hand the flags that apply to ``bench.gpu``'s own command."""
    if args.workloads != ("gpu",):
        raise UserError("--workloads gpu runs alone: fastmid bench --workloads gpu [--quick]")
    unused = [
        f"--{name.replace('_', '-')}"
        for name in ("dtypes", "batch_tokens", "loss_on", "threads")
        if getattr(args, name) is not None
    ]
    if unused:
        raise UserError(f"{unused[0]} does not apply to --workloads gpu (bf16, fixed shapes)")
    from bench import gpu

    argv = ["--smoke"] if args.quick else []
    for flag, value in (("--out", args.out), ("--steps", args.steps), ("--warmup", args.warmup)):
        if value is not None:
            argv += [flag, str(value)]
    if args.providers:
        argv += ["--providers", ",".join(args.providers)]
    return gpu.command(gpu.parse_options(argv))
