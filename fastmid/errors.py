"""User-facing errors: raised anywhere, reported by the CLI as one line with exit code 2."""

from __future__ import annotations

import os
import sys

# The exit status of a command stopped by a user error (argparse uses the same).
USER_ERROR_EXIT = 2
# The exit status of a run stopped by SIGINT/SIGTERM after saving its checkpoint.
INTERRUPTED_EXIT = 130
# Set by `fastmid train --nproc N` for its torchrun workers: each appends how it ended (a user
# error's line, its exit status) to this file, so the launcher can report the run as one
# process would, instead of torchrun's report of failed workers.
STATUS_FILE_ENV = "FASTMID_STATUS_FILE"


class UserError(ValueError):
    """A problem with the user's input (files, config, model layout) rather than a bug.

    A ``ValueError``, so library callers catch bad arguments the usual way.
    """


def report_user_error(prog: str, err: BaseException) -> int:
    """Report ``err`` as one line, ``<prog>: error: <message>``; returns the exit status.

    Under torchrun every rank meets the same bad input: only rank 0 prints, or, under
    ``--nproc``'s launcher, the line goes to the launcher (which prints the first one).
    """
    line = f"{prog}: error: " + " ".join(str(err).split("\n"))
    rank0 = "LOCAL_RANK" not in os.environ or os.environ.get("RANK") == "0"
    if not _append_status(f"error {line}") and rank0:
        print(line, file=sys.stderr, flush=True)
    return USER_ERROR_EXIT


def record_exit(code: int) -> None:
    """Tell ``--nproc``'s launcher (if this is one of its workers) the exit status."""
    _append_status(f"exit {code}")


def _append_status(line: str) -> bool:
    path = os.environ.get(STATUS_FILE_ENV)
    if not path or "LOCAL_RANK" not in os.environ:
        return False
    # One write() of one short line with O_APPEND: ranks never interleave within a line.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, (line + "\n").encode("utf-8"))
    finally:
        os.close(fd)
    return True
