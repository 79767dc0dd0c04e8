"""Helpers the bench's reports share: CSV bytes of result rows and markdown tables."""

from __future__ import annotations

import csv
import io
from typing import Any


def csv_bytes(rows: list[dict[str, Any]]) -> bytes:
    """CSV of ``rows``: one column per key, in order of first appearance."""
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-markdown table (also readable as plain text)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
