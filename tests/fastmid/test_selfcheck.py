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


def test_a_failing_section_fails_the_check_and_the_report_is_still_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    from fastmid import selfcheck

    def broken(cuda: bool, quick: bool):
        raise RuntimeError("fp16 grad of lora_qkv off by 3x")

    monkeypatch.setattr(selfcheck, "check_numerics", broken)
    monkeypatch.setattr(selfcheck, "check_cubins", lambda quick, jobs: selfcheck.Section(
        "cubin report", "pass", "13/13 kernels ok"
    ))  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    report_path = tmp_path / "selfcheck.json"
    assert selfcheck.main(["--quick", "--output", str(report_path)]) == 1
    report = json.loads(report_path.read_text())
    assert report["ok"] is False
    sections = {s["name"]: s for s in report["sections"]}
    assert list(sections) == SECTIONS
    assert sections["numerics"]["status"] == "fail"
    assert sections["numerics"]["detail"] == "RuntimeError: fp16 grad of lora_qkv off by 3x"
    assert sections["cubin report"]["status"] == "pass"
    assert sections["gpu tests"]["status"] == "not checked"
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("numerics") and " fail " in line for line in lines)


GPU_TESTS = """
import pytest

@pytest.mark.gpu
def test_runs():
    assert 1 + 1 == 2

@pytest.mark.gpu
def test_needs_a_package():
    pytest.importorskip("a_package_nobody_installed")
"""


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        # Skipped GPU tests checked nothing: the section is not a pass.
        (GPU_TESTS, "not checked", "1 passed, 1 skipped: could not import"),
        (GPU_TESTS.split("@pytest.mark.gpu\ndef test_needs")[0], "pass", "1 passed"),
        (GPU_TESTS.replace("1 + 1 == 2", "1 + 1 == 3"), "fail", "1 failed"),
        ("def test_plain():\n    pass\n", "not checked", "no GPU test was collected"),
    ],
)
def test_gpu_tests_section_counts_skips_as_not_checked(
    tmp_path: Path, body: str, status: str, detail: str
):
    from fastmid import selfcheck

    (tmp_path / "test_gpu_stub.py").write_text(body)
    section = selfcheck.check_gpu_tests(tmp_path)
    assert (section.name, section.status) == ("gpu tests", status)
    assert section.detail.startswith(detail), section.detail
