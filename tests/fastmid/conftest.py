"""Fixtures the training-level tests share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import fastmid.kernels._common as kernel_dispatch
import pytest
import torch

from tests.fastmid._runs import make_model_dir


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
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama saved as a model directory, once per module (a module may override it)."""
    return make_model_dir(tmp_path_factory.mktemp("model"))
