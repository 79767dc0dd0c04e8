"""Process memory counters: a spawned process reports its own peak, not its parent's."""

from __future__ import annotations

import multiprocessing
import resource
from pathlib import Path

import pytest

from fastmid import memory

MIB = 2**20


def _report_peak(queue) -> None:
    queue.put(memory.peak_rss_bytes())


@pytest.mark.skipif(not memory.STATUS.exists(), reason="needs /proc (Linux)")
def test_a_spawned_process_reports_its_own_peak_not_its_parents():
    held = bytearray(1024 * MIB)
    held[::4096] = b"\x01" * (len(held) // 4096)  # touch every page: resident
    parent = memory.peak_rss_bytes()
    assert parent >= 1024 * MIB
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_report_peak, args=(queue,))
    proc.start()
    child = queue.get(timeout=120)
    proc.join()
    del held
    # The child imports fastmid (torch with it): a few hundred MiB of its own at most. Its
    # ru_maxrss would carry the parent's gigabyte across exec.
    assert 0 < child < parent - 512 * MIB


@pytest.mark.skipif(not memory.STATUS.exists(), reason="needs /proc (Linux)")
def test_counters_and_reset():
    held = bytearray(256 * MIB)
    held[::4096] = b"\x01" * (len(held) // 4096)
    assert memory.peak_rss_bytes() >= memory.rss_bytes() >= 256 * MIB
    before = memory.peak_rss_bytes()
    del held  # a large block goes straight back to the kernel
    if not memory.reset_peak_rss():
        pytest.skip("this kernel refuses clear_refs")
    assert memory.peak_rss_bytes() < before - 128 * MIB


def test_without_proc_the_peak_falls_back_to_ru_maxrss(monkeypatch):
    monkeypatch.setattr(memory, "STATUS", Path("/nonexistent/status"))
    assert memory.rss_bytes() == 0
    assert memory.peak_rss_bytes() == resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _heap_then_trim(queue) -> None:
    """In a fresh process: 64 MiB of small heap blocks, all freed but the last (which keeps
    free() from shrinking the heap top itself), then RSS before and after the trim."""
    import ctypes

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 * 1024  # under glibc's 128 KiB mmap threshold: from the heap
    blocks = [libc.malloc(size) for _ in range(1024)]
    for b in blocks:
        ctypes.memset(b, 1, size)  # resident
    for b in blocks[:-1]:
        libc.free(b)
    before = memory.rss_bytes()
    released = memory.release_free_heap()
    queue.put((before, memory.rss_bytes(), released))
    libc.free(blocks[-1])


@pytest.mark.skipif(not memory.STATUS.exists(), reason="needs /proc (Linux)")
def test_release_free_heap_returns_freed_pages_to_the_kernel():
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_heap_then_trim, args=(queue,))
    proc.start()
    before, after, released = queue.get(timeout=120)
    proc.join(timeout=60)
    if not released:
        pytest.skip("the C library has no malloc_trim")
    assert before - after > 48 * MIB  # most of the 64 MiB freed in the heap's middle
