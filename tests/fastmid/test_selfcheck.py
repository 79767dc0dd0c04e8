"""`fastmid selfcheck` on a machine without CUDA: the reduced subset (interpreter numerics of
every op, one kernel compiled for sm_80 and sm_90) runs, passes, says what it could not check,
and writes a complete JSON report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SECTIONS = ["gpu tests", "numerics", "microbench", "train", "ddp", "cubin report"]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU mode")
def test_cpu_mode_reports_every_section(tmp_path: Path):
    report_path = tmp_path / "out" / "selfcheck.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "fastmid", "selfcheck", "--quick", "--jobs", "2",
         "--output", str(report_path)],
        env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(report_path.read_text())
    assert report["ok"] is True and report["quick"] is True
    assert report["machine"]["device"] == "cpu" and report["machine"]["gpus"] == 0
    assert report["machine"]["torch"] == torch.__version__
    sections = {s["name"]: s for s in report["sections"]}
    assert list(sections) == SECTIONS
    for name in ("gpu tests", "microbench", "train", "ddp"):
        assert sections[name]["status"] == "not checked"
        assert "CUDA" in sections[name]["detail"], sections[name]
    numerics = sections["numerics"]
    assert numerics["status"] == "pass"
    assert {r["op"] for r in numerics["rows"]} == {"lora_linear", "lora_qkv", "lora_gate_up"}
    assert all(r["ok"] and not r["failures"] and "error" in r["worst"] for r in numerics["rows"])
    cubins = sections["cubin report"]
    assert cubins["status"] == "pass"
    assert {r["arch"] for r in cubins["rows"]} == {80, 90}
    for row in cubins["rows"]:
        assert row["spill_bytes"] == 0 and row["tensor_core_instructions_min"] > 0
        assert row["registers_max"] <= 232
    assert max(r["widest_wgmma_n"] for r in cubins["rows"] if r["arch"] == 90) >= 64
    # The printed table has one line per section, with its status.
    for name, section in sections.items():
        assert any(
            line.startswith(name) and section["status"] in line for line in proc.stdout.splitlines()
        ), name
