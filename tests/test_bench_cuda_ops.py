"""bench.cuda_ops on the CPU (its smoke mode): the rows the GPU bench reads."""

from __future__ import annotations

import pytest

from bench import cuda_ops


def test_op_rows_smoke_on_cpu(monkeypatch: pytest.MonkeyPatch):
    from fastmid.kernels import _common

    monkeypatch.setattr(cuda_ops, "HOST_CALLS", 2)
    shipped = _common.KERNEL_PATH
    rows = cuda_ops.op_rows("cpu", paths=("default", "torch"))
    assert [(r["path"], r["op"]) for r in rows] == [
        (path, op)
        for path in ("default", "torch")
        for op in ("o", "qkv", "gate_up", "gate_up_recompute")
    ]
    for row in rows:
        assert set(cuda_ops.COLUMNS) <= row.keys()
        assert row["model"] == "tiny" and row["dropout"] == cuda_ops.DROPOUT
        for key in ("fused_ms", "fused_host_ms", "unfused_ms", "unfused_host_ms", "speedup"):
            assert row[key] > 0, (key, row)
    table = cuda_ops.format_rows(rows).splitlines()
    assert len(table) == 2 + len(rows) and table[0].startswith("| path | model | op |")
    # The switch is restored: the next call dispatches as shipped.
    assert shipped == _common.KERNEL_PATH
