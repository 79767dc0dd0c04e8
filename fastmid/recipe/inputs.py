"""The input options that ``fastmid eval``, ``probe`` and ``analyze`` share (``--model``,
``--data``, ``--format``), declared once so their help reads the same in every command."""

from __future__ import annotations

import argparse

from fastmid.recipe.data import FORMATS

MODEL_HELP = "HF dir, .gguf or hub id (default: the embedded SmolLM2-135M-Instruct)"


def add_model_argument(
    parser: argparse.ArgumentParser, flag: str = "--model", role: str | None = None
) -> None:
    """``--model`` (or ``flag``): the model to load; ``role`` names it in the help."""
    parser.add_argument(flag, default=None, help=f"{role}: {MODEL_HELP}" if role else MODEL_HELP)


def add_data_argument(
    parser: argparse.ArgumentParser, split: str, records: str = "JSONL records"
) -> None:
    """``--data``: the records to read, by default the bundled ``split``."""
    parser.add_argument(
        "--data", default=None, help=f"{records} (default: the bundled {split} split)"
    )


def add_format_argument(parser: argparse.ArgumentParser) -> None:
    """``--format``: how the records are turned into prompts (qa or chat)."""
    parser.add_argument(
        "--format", default="qa", choices=FORMATS, help="record format (default: %(default)s)"
    )
