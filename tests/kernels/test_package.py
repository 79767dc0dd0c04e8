"""The kernels package: public names, and harmless when probed under the bare name `kernels`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import fastmid.kernels

ROOT = Path(__file__).resolve().parents[2]


def test_public_ops_exported():
    for name in ("lora_linear", "lora_qkv", "lora_gate_up", "use_triton"):
        assert callable(getattr(fastmid.kernels, name)), name


def test_bare_name_import_defines_nothing():
    # From a checkout's root, `import kernels` finds this folder (transformers probes for an
    # unrelated package of that name): it must not load the ops a second time.
    code = (
        "import sys, kernels; "
        "assert not hasattr(kernels, 'lora_linear'); "
        "assert not any(m.startswith('kernels.') for m in sys.modules); "
        "import transformers.utils.import_utils as iu; "
        "assert not iu.is_kernels_available()"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
