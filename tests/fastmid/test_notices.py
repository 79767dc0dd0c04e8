"""Patching a model without quantization prints nothing, torchao installed or not."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PATCH = """
import fastmid
from tests.fastmid._tiny import tiny_model

model = fastmid.apply_midblock(tiny_model("llama", 4))
assert any(True for _ in fastmid.lora_modules(model))
"""


def test_apply_midblock_prints_nothing():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", PATCH], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("", "")
