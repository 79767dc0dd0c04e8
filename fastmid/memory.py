"""Process memory on CPU, from the kernel's per-process counters.

The peak is ``VmHWM``, the high-water mark of this process's own address space. ``ru_maxrss``
is not used where ``/proc`` exists: Linux carries it across ``exec``, so a process spawned by a
large one (a ``fastmid compare`` run, a benchmark worker) would report its parent's peak.
"""

from __future__ import annotations

import ctypes
import re
import resource
from pathlib import Path

__all__ = ["peak_rss_bytes", "release_free_memory", "reset_peak_rss", "rss_bytes"]

STATUS = Path("/proc/self/status")


def _status_kb(field: str) -> int | None:
    try:
        text = STATUS.read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else None


def rss_bytes() -> int:
    """Current resident set size of this process (0 where the kernel does not say)."""
    return (_status_kb("VmRSS") or 0) * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since it started (or since
    :func:`reset_peak_rss`); ``ru_maxrss`` where ``/proc`` is missing."""
    kb = _status_kb("VmHWM")
    if kb is None:
        # KiB on Linux; where there is no /proc the platform's own unit may differ (bytes on
        # macOS), so this fallback is an upper-bound estimate there.
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux ``clear_refs`` 5); False
    where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def release_free_memory() -> bool:
    """Hand the C allocator's free memory back to the kernel (glibc's ``malloc_trim``); False
    where the C library has no such call.

    glibc returns a freed block to the kernel only when it was mapped on its own or sits at the
    top of a heap; memory freed in the middle of a heap, or in an arena of another thread (a
    collective's worker), stays resident and counts in RSS until it is reused. (Its mmap
    threshold rises each time a large block is freed, so later tensors of up to 32 MiB come
    from the heap: a model loaded block by block frees each block's full-precision weights
    there.)
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return True
