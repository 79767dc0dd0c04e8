"""``fastmid train --quantize nf4|int8`` end to end: the CLI trains on a quantized base, the
adapter it saves reloads onto a freshly quantized base for ``fastmid eval`` and merges; and the
three ways to ask for a quantized run that cannot be are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastmid.cli import main
from tests.fastmid._runs import (
    RECORDS,
    as_flags,
    assert_adapters_close_after_adam,
    make_model_dir,
    metrics,
    tiny_settings,
    write_jsonl,
)

pytestmark = pytest.mark.usefixtures("one_thread_torch_path")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Every linear's input width a multiple of NF4's 64-value blocks (MLP 128 wide).
    return make_model_dir(tmp_path_factory.mktemp("model"), num_layers=4, intermediate_size=128)


@pytest.mark.slow  # two CLI trainings and evaluations
@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_quantized_training_saves_an_adapter_that_evaluates_and_merges(
    method: str, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    from fastmid import load_adapter, merge
    from fastmid.engine.models import load_model
    from fastmid.engine.quantize import QuantizedWeight, quantize_frozen

    data = write_jsonl(tmp_path / "train.jsonl", RECORDS[:24])
    held = write_jsonl(tmp_path / "held.jsonl", RECORDS[24:27])
    out = tmp_path / "out"
    settings = tiny_settings(model_dir, data, out, band="1-2", max_steps=3, eval=True)
    flags = [*as_flags(settings), "--quantize", method, "--eval-data", str(held)]
    assert main(["train", *flags, "--eval-limit", "3", "--max-new-tokens", "4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["loss_last"] < summary["loss_first"]
    trained = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]

    # fastmid eval on a fresh base quantized the same way: the trained model's answers.
    capsys.readouterr()
    predictions = tmp_path / "eval.jsonl"
    argv = ["eval", "--model", str(model_dir), "--adapter", str(out / "adapter"),
            "--quantize", method, "--data", str(held), "--limit", "3", "--max-new-tokens", "4",
            "--precision", "fp32", "--no-perplexity", "--output", str(predictions)]  # fmt: skip
    assert main(argv) == 0
    again = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [p["prediction"] for p in again] == [p["prediction"] for p in trained]

    # Merged into the dequantized base: the same function at full precision.
    model, _, _ = load_model(str(model_dir), dtype=torch.float32)
    base_ids = torch.tensor([[5, 17, 99, 3, 42, 7, 8, 200]])
    with torch.no_grad():
        base_logits = model(base_ids).logits
    load_adapter(model, out / "adapter")
    quantize_frozen(model, method)
    model.eval()
    with torch.no_grad():
        tuned = model(base_ids).logits
    merged = merge(model, dequantize=True)
    assert not any(isinstance(p, QuantizedWeight) for p in merged.parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(base_ids).logits, tuned, rtol=1e-4, atol=1e-4)
    assert (tuned - base_logits).abs().max() > 1e-2  # the adapter moved the model


@pytest.mark.slow  # a one-process run and a torchrun launch
def test_two_ddp_ranks_train_a_quantized_base_like_one_process(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """``--quantize nf4 --nproc 2``: each rank loads and quantizes its own copy block by block,
    DDP sums the adapters' gradients, and the run takes the steps of one process."""
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "train.jsonl", RECORDS[:24])
    # The workers inherit this environment: the kernels' torch path, one thread each.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"nproc{nproc}"
        settings = tiny_settings(model_dir, data, out, band="1-2", max_steps=3, grad_accum=2)
        argv = ["train", *as_flags(settings), "--quantize", "nf4", "--nproc", str(nproc)]
        assert main(argv) == 0
        runs[nproc] = out
    one, two = runs[1], runs[2]
    summary = json.loads((two / "summary.json").read_text())
    assert summary["resolved"]["parallel"] == "ddp"
    got, want = metrics(two), metrics(one)
    assert [m["step"] for m in got] == [m["step"] for m in want] == [1, 2, 3]
    assert [m["tokens"] for m in got] == [m["tokens"] for m in want]
    torch.testing.assert_close(
        torch.tensor([m["loss"] for m in got]),
        torch.tensor([m["loss"] for m in want]),
        rtol=1e-5,
        atol=0,
    )
    adapter = "adapter/adapter_model.safetensors"
    got_w, want_w = load_file(str(two / adapter)), load_file(str(one / adapter))
    assert_adapters_close_after_adam(got_w, want_w)
    assert max(float(w.abs().max()) for k, w in want_w.items() if "lora_B" in k) > 0  # trained


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--quantize", "nf4", "{no torchao}"], "--quantize nf4 needs torchao: pip install"),
        (["--quantize", "nf4", "--nproc", "2", "--parallel", "fsdp"], "trains with --parallel ddp"),
        (["--quantize", "nf4", "--model", "{narrow}"], "needs the block size 64 to divide"),
    ],
)
def test_quantize_user_errors_are_one_line_and_write_nothing(
    extra: list[str], message: str, model_dir: Path, tmp_path: Path, capsys, monkeypatch
):
    from fastmid.engine import quantize

    if "{no torchao}" in extra:  # NF4 quantizes through torchao, an optional extra
        monkeypatch.setattr(quantize, "import_torchao_quietly", lambda: None)
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS[:8])
    out = tmp_path / "out"
    # The default tiny MLP is 96 wide: not a multiple of NF4's blocks.
    narrow = make_model_dir(tmp_path, num_layers=2) if "{narrow}" in extra else model_dir
    flags = as_flags(tiny_settings(model_dir, data, out, max_steps=1))
    extra = [str(narrow) if a == "{narrow}" else a for a in extra if a != "{no torchao}"]
    assert main(["train", *flags, *extra]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists() or list(out.iterdir()) == []
