"""The ``fastmid`` command line: one subcommand per module, imported only when used.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``. A
:class:`fastmid.errors.UserError` raised anywhere becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fastmid.errors import UserError, report_user_error

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("fastmid.recipe.train", "fine-tune a causal LM with Mid-Block LoRA"),
    "eval": ("fastmid.recipe.evaluate", "GSM8K-style accuracy and held-out perplexity"),
    "analyze": ("fastmid.study.analyze", "layer-wise metrics of a tuned model against its base"),
    "probe": (
        "fastmid.recipe.probe",
        "per-layer sensitivity map of an untuned model (a diagnostic)",
    ),
    "bench": ("fastmid.benchcmd", "benchmark fastmid against PEFT LoRA"),
    "compare": ("fastmid.study.compare", "train several depth placements alike and compare them"),
    "selfcheck": ("fastmid.selfcheck", "prove the kernels on this machine; JSON report + table"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastmid",
        description="Mid-Block Efficient Tuning: LoRA in the middle of the network.",
    )
    parser.add_argument("--version", action="store_true", help="print fastmid's version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    if argv[0] == "--version":
        from fastmid import __version__

        print(f"fastmid {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        top.print_usage(sys.stderr)
        print(f"fastmid: error: unknown command {name!r}", file=sys.stderr)
        return 2
    module_name, help_text = COMMANDS[name]
    parser = argparse.ArgumentParser(prog=f"fastmid {name}", description=help_text)
    try:
        module = importlib.import_module(module_name)
        module.add_arguments(parser)
        args = parser.parse_args(argv[1:])
        return int(module.run(args) or 0)
    except UserError as err:
        return report_user_error(f"fastmid {name}", err)
    except KeyboardInterrupt:
        print(f"fastmid {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
