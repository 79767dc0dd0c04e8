"""Who ran a benchmark: the machine, library versions and source commit stamped on every row."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

# Dense bf16 tensor-core peak (TFLOP/s) by a part of the device name, the vendor's datasheet
# figures; the first key found in the name wins, so the H100's PCIe and NVL parts come before
# the plain "H100" (SXM, "NVIDIA H100 80GB HBM3").
BF16_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
}


def _cpu_model() -> str:
    """CPU model name as ``lscpu`` reports it (falls back to /proc/cpuinfo, then platform)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _git(*args: str) -> str | None:
    try:
        res = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def machine_info() -> dict[str, Any]:
    """Machine description: CPU model, cores, torch threads, GPU, versions and git commit."""
    import peft
    import transformers

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "avx512_bf16": "avx512_bf16" in _cpu_flags() or "amx_bf16" in _cpu_flags(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "commit": _git("rev-parse", "--short=12", "HEAD"),
        # Uncommitted changes to tracked files mean the commit alone does not pin the code.
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
    return info


def machine_label(info: dict[str, Any] | None = None) -> str:
    """Short one-line label, e.g. 'AMD EPYC x2 / torch 2.13.0+cpu' or 'NVIDIA H100 / torch …'."""
    info = info or machine_info()
    where = info["gpu"] or f"{info['cpu']} x{info['cpu_cores']}"
    return f"{where} / torch {info['torch']}"


def bf16_peak_tflops(device_name: str) -> float | None:
    """Nominal dense bf16 TFLOP/s of the card called ``device_name``; None for an unknown card."""
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in device_name), None)
