"""Shared test configuration: device detection, the Triton interpreter, seeds, and caches
kept out of the user's home."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Where libraries the suite uses would write under the home directory (caches, tracker logs,
# configs), each pointed into the session's temp dir by the fixture below.
HOME_WRITERS = {
    "XDG_CACHE_HOME": "cache",  # wandb-core's logs, platformdirs users
    "XDG_CONFIG_HOME": "config",
    "XDG_DATA_HOME": "data",
    "WANDB_DIR": "wandb",
    "WANDB_CACHE_DIR": "wandb-cache",
    "WANDB_CONFIG_DIR": "wandb-config",
    "WANDB_DATA_DIR": "wandb-data",
    "HF_HOME": "huggingface",
    "HF_DATASETS_CACHE": "huggingface/datasets",
    "MPLCONFIGDIR": "matplotlib",
    "TRITON_CACHE_DIR": "triton",
}


def pytest_configure(config: pytest.Config) -> None:
    # Without a GPU the Triton kernels run under the interpreter on CPU tensors. The switch is
    # read when kernels are decorated, so it must be set before any test module imports them.
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def session_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point every cache and tracker directory into the session's temp dir, so the suite leaves
    the user's home untouched; returns that root. FASTMID_CACHE too, unless the user set it
    (the embedded model's dequantized copy is then built once per session)."""
    root = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        for name, sub in HOME_WRITERS.items():
            mp.setenv(name, str(root / sub))
        if "FASTMID_CACHE" not in os.environ:
            mp.setenv("FASTMID_CACHE", str(root / "fastmid"))
        # datasets reads its cache dir when imported, which test modules do at collection.
        if "datasets" in sys.modules:
            mp.setattr(
                sys.modules["datasets"].config, "HF_DATASETS_CACHE", root / "huggingface/datasets"
            )
        yield root


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
