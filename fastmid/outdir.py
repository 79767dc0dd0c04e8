"""One run per output directory: an exclusive lock held for the whole run.

The lock is ``flock`` on ``<dir>/.fastmid.lock``. The kernel drops a flock when its holder's
process ends, however it ends, so a run killed with SIGKILL never blocks the next run or its
``--resume``: the file it leaves behind is not locked by anyone. Runs check emptiness with
:func:`user_entries`, which does not count the lock file.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from fastmid.errors import UserError

LOCK_NAME = ".fastmid.lock"


def user_entries(out: Path) -> list[Path]:
    """What ``out`` holds besides the lock file (empty when ``out`` does not exist)."""
    if not out.is_dir():
        return []
    return [p for p in out.iterdir() if p.name != LOCK_NAME]


@contextlib.contextmanager
def hold_output_dir(path: str | os.PathLike[str], enabled: bool = True) -> Iterator[Path]:
    """Hold the exclusive lock on output directory ``path`` (made if missing) for the block.

    Another process holding it makes this raise a one-line :class:`UserError` at once (no
    waiting). A directory this call made is removed again if the block leaves it empty (a run
    that failed before writing anything). ``enabled=False`` (ranks other than 0) only yields.
    """
    out = Path(path)
    if not enabled:
        yield out
        return
    if out.exists() and not out.is_dir():
        raise UserError(f"output dir {out} exists and is not a directory")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    fd = _lock(out / LOCK_NAME, out)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield out
    finally:
        # Unlink while still holding the lock: a process that opened this file meanwhile finds
        # it gone after its flock and locks the new one instead (see _lock).
        with contextlib.suppress(FileNotFoundError):
            (out / LOCK_NAME).unlink()
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only succeeds when nothing was written


def _lock(lock: Path, out: Path) -> int:
    """An open descriptor of ``lock`` with the flock held; UserError when another holds it."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            by = f" (pid {holder})" if holder.isdigit() else ""
            raise UserError(
                f"output dir {out} is in use by another fastmid run{by}; wait for it to end "
                "or choose another output dir"
            ) from None
        # The previous holder may have unlinked the file between our open and our flock.
        try:
            current = os.stat(lock).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            return fd
        os.close(fd)


def holds_output_dir(
    where: Callable[[argparse.Namespace], str | os.PathLike[str] | None],
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Decorate a command's ``run(args)`` to hold the lock on ``where(args)`` while it runs
    (no lock when ``where`` gives None: the command writes nothing)."""

    def decorate(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(run)
        def locked(args: argparse.Namespace) -> int:
            path = where(args)
            if path is None:
                return run(args)
            with hold_output_dir(path):
                return run(args)

        return locked

    return decorate
