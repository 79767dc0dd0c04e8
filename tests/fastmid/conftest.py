"""Fixtures the training-level tests share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import fastmid.kernels._common as kernel_dispatch
import pytest
import torch

from tests.fastmid._runs import RECORDS, make_model_dir, write_jsonl


@pytest.fixture
def one_thread_torch_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The kernels' torch path (the interpreter is for kernel tests) on one thread: tiny
    matmuls gain nothing from more, and lose a lot on a busy machine."""
    monkeypatch.setattr(kernel_dispatch, "INTERPRET", False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama saved as a model directory, once per module: ``MODEL_LAYERS`` blocks where
    the module sets it (the command-line tests take 5: quicker to load), else 10."""
    layers = getattr(request.module, "MODEL_LAYERS", 10)
    return make_model_dir(tmp_path_factory.mktemp("model"), num_layers=layers)


@pytest.fixture
def good_data(tmp_path: Path) -> Path:
    """Eight good training records as a JSONL file."""
    return write_jsonl(tmp_path / "good.jsonl", RECORDS[:8])


@pytest.fixture(scope="module")
def train_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All the tiny runs' records as a JSONL file, once per module."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", RECORDS)
