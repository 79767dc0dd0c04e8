"""The trainer on a device: the micro-batch ``--batch-tokens auto`` resolves to, an
out-of-memory error as one line, and no host read of device values between log steps."""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import fastmid.recipe.train as train_mod
from fastmid.cli import main
from fastmid.engine.midblock import MidBlockConfig
from fastmid.recipe import data, estimate
from fastmid.recipe.config import AUTO_BATCH, CPU_BATCH_TOKENS, build_config
from fastmid.recipe.estimate import BatchChoice
from fastmid.recipe.output_dir import check_resume_compatible
from fastmid.recipe.train import Runtime, format_header, resolve_batch, train
from tests.fastmid._runs import RECORDS, as_flags, tiny_cfg, tiny_settings, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread_torch_path")

CPU = Runtime(torch.device("cpu"), 1, "fp32")
CUDA = Runtime(torch.device("cuda", 0), 1, "bf16")


@pytest.fixture
def train_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", RECORDS)


def _auto(**over: Any):
    return build_config(None, {"batch_tokens": AUTO_BATCH, **over})


def test_auto_on_cpu_is_1024_tokens_and_keeps_grad_accum() -> None:
    cfg, choice = resolve_batch(_auto(grad_accum=5), CPU, None, MidBlockConfig(), None)
    assert (cfg.batch_tokens, cfg.grad_accum, choice) == (CPU_BATCH_TOKENS, 5, None)
    long, _ = resolve_batch(_auto(max_length=2048), CPU, None, MidBlockConfig(), None)
    assert long.batch_tokens == 2048  # one example must fit
    given = build_config(None, {"batch_tokens": 512})
    assert resolve_batch(given, CUDA, None, MidBlockConfig(), None) == (given, None)


def test_auto_on_resume_takes_the_checkpoints_sizes() -> None:
    resumed = {"config": {"batch_tokens": 24576, "grad_accum": 2}}
    cfg, choice = resolve_batch(_auto(grad_accum=48), CUDA, None, MidBlockConfig(), resumed)
    assert (cfg.batch_tokens, cfg.grad_accum, choice) == (24576, 2, None)
    # and --resume does not object to auto against the checkpoint's numbers
    check_resume_compatible(_auto(grad_accum=48), resumed["config"])


def test_auto_on_cuda_fits_free_memory_and_keeps_the_global_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Model:
        config = object()

    calls: list[tuple] = []

    def choose(config, adapter, free, step_tokens, max_length):
        calls.append((config, adapter, free, step_tokens, max_length))
        return BatchChoice(8192, 6, 9000, free, 1.0, 0)

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (30 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 5 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 4 * 2**30)
    monkeypatch.setattr(estimate, "choose_batch_tokens", choose)
    adapter = MidBlockConfig(rank=16)
    cfg, choice = resolve_batch(_auto(grad_accum=48, max_length=512), CUDA, Model, adapter, None)
    # Free = the device's free memory plus what the allocator caches unused (1 GiB here);
    # the step keeps 1024 x 48 tokens.
    assert calls == [(Model.config, adapter, 31 * 2**30, 1024 * 48, 512)]
    assert (cfg.batch_tokens, cfg.grad_accum) == (8192, 6)
    header = format_header(_resolved(choice.resolved()))
    assert header.splitlines()[-1] == (
        "batch auto: 8,192 tokens per micro-batch x 6 (up to 9,000 fit in 31.0 GiB free)"
    )


def _resolved(extra: dict) -> dict:
    return {
        "model_name": "m",
        "layers": [2, 3],
        "num_layers": 5,
        "rank": 8,
        "adapter_parameters": 10,
        "precision": "bf16",
        "train_examples": 4,
        "micro_batches_per_epoch": 2,
        "total_steps": 3,
        "lr": 1e-4,
        "warmup_steps": 1,
        "schedule": "linear",
        "recipe": "paper",
        **extra,
    }


def test_config_yaml_keeps_auto_and_records_the_choice(
    model_dir: Path, train_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    train(tiny_cfg(model_dir, train_file, out, max_steps=2, batch_tokens=AUTO_BATCH))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["batch_tokens"], saved["grad_accum"]) == ("auto", 1)
    assert saved["resolved"]["batch_tokens"] == CPU_BATCH_TOKENS
    assert saved["resolved"]["grad_accum"] == 1
    assert "batch_fits_tokens" not in saved["resolved"]  # on CPU nothing was estimated


def test_out_of_memory_is_one_line_naming_the_micro_batch(
    model_dir: Path, train_file: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    def no_room(*args: Any, **kwargs: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_mod, "train_step", no_room)
    flags = as_flags(tiny_settings(model_dir, train_file, tmp_path / "run", batch_tokens=192))
    assert main(["train", *flags]) == 2
    err = capsys.readouterr().err
    assert err == (
        "fastmid train: error: out of device memory training micro-batches of 192 tokens "
        "(--batch-tokens); lower --batch-tokens (e.g. 96) and raise --grad-accum to keep the "
        "step, or lower --max-length\n"
    )


# --------------------------------------------------------------------------------------------
# No host read of a device value between log steps


class HostReads:
    """Every read of a tensor's value into Python (``item``, ``tolist``, ``bool()``,
    ``float()``, ``int()``, ``nonzero``, ``torch.equal``) while ``active``: on a GPU each one
    waits for the device. Reads of the collator's host-side ``cu_seqlens`` and of the CPU
    optimizer's step counters (kept on the host, and fused away on CUDA) are not device reads."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "nonzero")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.active = False
        self.reads: list[str] = []
        self.host: list[torch.Tensor] = []
        for name in self.NAMES:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name), name))
        monkeypatch.setattr(torch, "nonzero", self._wrap(torch.nonzero, "torch.nonzero"))
        monkeypatch.setattr(torch, "equal", self._wrap(torch.equal, "torch.equal"))
        collate = data.collate_packed

        def collate_and_note(examples):
            batch = collate(examples)
            self.host.append(batch["cu_seqlens"])
            return batch

        monkeypatch.setattr(data, "collate_packed", collate_and_note)

    def _wrap(self, fn, name: str):
        reads = self

        def read(t, *args, **kwargs):
            if reads.active and not any(t is h for h in reads.host):
                caller = traceback.extract_stack(limit=2)[0]
                if "/torch/optim/" not in caller.filename:
                    reads.active = False  # formatting the record must not record itself
                    reads.reads.append(f"{name} at {caller.filename}:{caller.lineno}")
                    reads.active = True
            return fn(t, *args, **kwargs)

        return read

    def during(self, fn):
        def run(*args, **kwargs):
            was, self.active = self.active, True
            try:
                return fn(*args, **kwargs)
            finally:
                self.active = was

        return run

    def paused(self, fn):
        def run(*args, **kwargs):
            was, self.active = self.active, False
            try:
                return fn(*args, **kwargs)
            finally:
                self.active = was

        return run


def _watch_steps(monkeypatch: pytest.MonkeyPatch, reads: HostReads) -> list[int]:
    """Watch each step's work (forward, backward, update) and the window's bookkeeping, but
    not its flush at a log step; returns the list of logged steps."""
    logged: list[int] = []
    monkeypatch.setattr(train_mod, "train_step", reads.during(train_mod.train_step))
    window = train_mod.MetricsWindow
    monkeypatch.setattr(window, "add", reads.during(window.add))
    monkeypatch.setattr(window, "step_done", reads.during(window.step_done))
    flush = window.flush

    def noted_flush(self, progress, *args, **kwargs):
        logged.append(progress.step)
        return flush(self, progress, *args, **kwargs)

    monkeypatch.setattr(window, "flush", reads.paused(noted_flush))
    return logged


def test_no_host_read_between_log_steps(
    model_dir: Path, train_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = HostReads(monkeypatch)
    logged = _watch_steps(monkeypatch, reads)
    cfg = tiny_cfg(
        model_dir, train_file, tmp_path / "run", max_steps=4, log_every=2, grad_accum=2,
        batch_tokens=128, dropout=0.1,
    )  # fmt: skip
    summary = train(cfg)
    assert summary["steps"] == 4 and logged == [2, 4]
    assert len(reads.host) == 8  # every micro-batch's boundaries were read on the host
    assert reads.reads == []


def test_the_host_read_check_sees_a_read_of_the_label_positions(
    model_dir: Path, train_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Control: without the collator's label positions the loss finds them with nonzero.
    reads = HostReads(monkeypatch)
    _watch_steps(monkeypatch, reads)
    collate = data.collate_packed

    def without_label_index(examples):
        batch = collate(examples)
        del batch["label_index"]
        return batch

    monkeypatch.setattr(data, "collate_packed", without_label_index)
    train(tiny_cfg(model_dir, train_file, tmp_path / "run", max_steps=2, batch_tokens=128))
    assert reads.reads and all(r.startswith("nonzero at ") for r in reads.reads)
