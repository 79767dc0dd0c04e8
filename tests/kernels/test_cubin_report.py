"""`python -m fastmid.kernels.cubin_report`: ahead-of-time compilation for sm_80 / sm_90 without a
GPU. Runs in subprocesses without TRITON_INTERPRET (the test session sets it, and under it
`triton.jit` builds interpreter functions that cannot be compiled)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import fastmid.kernels
import pytest
from fastmid.kernels.cubin_report import KERNEL_MODULES, REGISTER_BUDGET, targets

KEYS = {
    "kernel",
    "config",
    "arch",
    "registers",
    "spill_bytes",
    "shared_bytes",
    "tensor_core_instructions",
    "widest_wgmma_n",
}


def run_report(*args: str, code: str | None = None, interpret: bool = False):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, *(["-c", code] if code else ["-m", "fastmid.kernels.cubin_report"])]
    return subprocess.run(
        [*cmd, *args], env=env, capture_output=True, text=True, timeout=900, check=False
    )


@pytest.mark.slow  # compiles every kernel for two GPU targets
@pytest.mark.parametrize("arch", [80, 90])
def test_every_shipped_config_compiles_spill_free_with_tensor_cores(arch: int, tmp_path: Path):
    # The whole registry, every shipped config: what `cubin_report --arch N` checks for a release.
    proc = run_report("--arch", str(arch), "--json", "--jobs", "2", "--cubin-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    expected = {(t.name, len(t.configs[arch])) for t in targets()}
    got = {(name, sum(r["kernel"] == name for r in rows)) for name, _ in expected}
    assert got == expected
    for row in rows:
        assert row.keys() >= KEYS
        assert row["arch"] == arch
        assert row["spill_bytes"] == 0, row
        assert row["tensor_core_instructions"] > 0, row
        assert 0 < row["registers"] <= REGISTER_BUDGET
        # wgmma exists on sm_90 only; every kernel there issues it at N >= 64.
        assert (row["widest_wgmma_n"] >= 64) == (arch == 90), row
        assert row["shared_bytes"] > 0
        cubin = tmp_path / f"{row['kernel']}__{row['config']}.cubin"
        assert cubin.read_bytes()[:4] == b"\x7fELF"
    assert len(list(tmp_path.glob("*.cubin"))) == len(rows)


@pytest.mark.slow  # compiles one kernel
def test_spilling_config_fails(tmp_path: Path):
    # The masked dx update at 128x128 tiles on 2 warps holds a 256-value fp32 accumulator per
    # thread next to its Philox mask and dx tile: far over 255 registers, so it spills (11.7 KB
    # of stack measured); the report must exit 1 on it.
    code = textwrap.dedent(
        """
        import dataclasses, importlib, sys
        report = importlib.import_module("fastmid.kernels.cubin_report")
        linear = importlib.import_module("fastmid.kernels.lora_linear")
        base = next(t for t in linear.INSPECT_TARGETS if t.name == "lora_linear_bwd_dx_dropout")
        big = {"BM": 128, "BN": 128, "num_warps": 2, "num_stages": 2}
        bad = dataclasses.replace(base, name="dx_dropout_2_warps", configs={90: [big]})
        report.targets = lambda: [bad]
        sys.exit(report.main(["--arch", "90", "--jobs", "1", "--json"]))
        """
    )
    proc = run_report(code=code)
    assert proc.returncode == 1, proc.stderr
    (row,) = json.loads(proc.stdout)
    assert row["spill_bytes"] > 0
    assert "dx_dropout_2_warps" in proc.stderr and "spill bytes" in proc.stderr


def test_refuses_to_run_under_the_interpreter():
    proc = run_report("--arch", "90", interpret=True)
    assert proc.returncode == 2
    assert "TRITON_INTERPRET" in proc.stderr


# @triton.jit kernels that cubin_report does not compile, and why.
NOT_REPORTED = {
    # Materialises the dropout mask for the tests' references; no GEMM, never launched in
    # training (the masked products draw the same mask in-kernel).
    "_keep_mask_kernel",
}


def test_registry_covers_every_kernel_module():
    # Every op module of the package registers its launches, with configs for both arches.
    package = Path(fastmid.kernels.__file__).parent
    # Found by their definitions, not by the registry's own declarations: a kernel whose
    # module stopped registering it would otherwise drop out of the report unnoticed.
    jit = re.compile(r"^@triton\.jit\s*\ndef (\w+_kernel)\(", re.M)
    kernels = {
        name for p in package.glob("*.py") for name in jit.findall(p.read_text(encoding="utf-8"))
    }
    assert "_thin_kernel" in kernels and "_nf4_matmul_kernel" in kernels
    compiled = {t.fn.__name__ for t in targets()}
    assert compiled == kernels - NOT_REPORTED
    # An op module is one that declares its launches (INSPECT_TARGETS at module level).
    ops = {
        p.stem
        for p in package.glob("[!_]*.py")
        if re.search(r"^INSPECT_TARGETS\b", p.read_text(encoding="utf-8"), re.M)
    }
    assert ops and ops == set(KERNEL_MODULES)
    found = targets()
    assert {t.name.split("_fwd")[0].split("_bwd")[0] for t in found} == ops
    for target in found:
        constexprs = {k for k, v in target.signature.items() if v == "constexpr"}
        for arch in (80, 90):
            assert target.configs[arch], (target.name, arch)
            for config in target.configs[arch]:
                # Fixed constexprs plus the config's block sizes bind every constexpr exactly.
                tuned = set(config) - {"num_warps", "num_stages"}
                assert tuned.isdisjoint(target.constexprs), (target.name, config)
                assert tuned | set(target.constexprs) == constexprs, (target.name, config)
