"""Command-line flags generated from config dataclasses: each field's ``metadata`` is its help.

A field declared as ``field(default=..., metadata={"help": ..., "choices": ..., "group": ...})``
becomes ``--field-name`` with that help, its choices and its default shown; a ``group`` opens a
new argument group that lasts until the next one. Flags the user did not type stay out of the
parsed namespace (``argparse.SUPPRESS``), so they cannot clobber a config file's values with
defaults; values arrive as strings and the config's own coercion turns them into field types.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any


def option(default: Any = dataclasses.MISSING, help: str = "", **meta: Any) -> Any:
    """A dataclass field documented once: ``help`` (plus optional ``choices``/``group``)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple (immutable) default for a config field")
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def flag(name: str) -> str:
    """``max_steps`` → ``--max-steps``."""
    return "--" + name.replace("_", "-")


def add_field_arguments(
    parser: argparse.ArgumentParser,
    fields: Iterable[dataclasses.Field],
    show: Callable[[str, Any], str] = lambda name, value: str(value),
) -> None:
    """One flag per field, in order; ``show(name, default)`` renders a default for the help."""
    group: Any = parser
    for f in fields:
        meta = f.metadata
        if "help" not in meta:
            continue
        if "group" in meta:
            group = parser.add_argument_group(meta["group"])
        help_text = meta["help"]
        if "default:" not in help_text:
            help_text = f"{help_text} (default: {show(f.name, f.default)})"
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text}
        if f.type in (bool, "bool"):
            # On by default: --x / --no-x; off by default: a plain switch.
            kwargs["action"] = argparse.BooleanOptionalAction if f.default else "store_true"
        elif "choices" in meta:
            kwargs["choices"] = meta["choices"]
        group.add_argument(flag(f.name), dest=f.name, **kwargs)
