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


@pytest.mark.skipif(not memory.STATUS.exists(), reason="needs /proc (Linux)")
def test_release_free_memory_returns_a_heap_hole_to_the_kernel():
    # Freeing a 16 MiB block that was mapped on its own raises glibc's mmap threshold above
    # 1 MiB, so the 1 MiB blocks after it come from the heap; the last one stays, so the
    # freed ones are a hole below the heap's top that free() alone keeps resident.
    big = bytearray(16 * MIB)
    del big
    blocks = [bytearray(MIB) for _ in range(128)]
    for b in blocks:
        b[::4096] = b"\x01" * (len(b) // 4096)
    last = blocks.pop()
    before = memory.rss_bytes()
    del blocks
    held = memory.rss_bytes()
    if not memory.release_free_memory():
        pytest.skip("no malloc_trim (not glibc)")
    after = memory.rss_bytes()
    assert held > before - 32 * MIB  # free() alone kept most of the hole
    assert after < held - 64 * MIB
    del last
