"""Atomic writes: whole file or old file, no temp files left, normal permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fastmid.fileio import replace_atomic, write_bytes_atomic, write_text_atomic


def test_text_is_written_byte_for_byte(tmp_path: Path):
    path = tmp_path / "sub" / "a.txt"
    write_text_atomic(path, "x\r\ny\n")
    assert path.read_bytes() == b"x\r\ny\n"
    write_bytes_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.txt"]


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path: Path):
    path = tmp_path / "a.json"
    write_text_atomic(path, "old")

    def fail(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        replace_atomic(path, fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_mode_follows_the_umask(tmp_path: Path):
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o644
