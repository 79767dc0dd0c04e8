"""``fastmid train --quantize nf4|int8`` end to end: the CLI trains on a quantized base, the
adapter it saves reloads onto a freshly quantized base for ``fastmid eval`` and merges; and the
three ways to ask for a quantized run that cannot be are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastmid.cli import main
from tests.fastmid._runs import RECORDS, as_flags, make_model_dir, tiny_settings, write_jsonl

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


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--quantize", "nf4", "{no torchao}"], "--quantize nf4 needs torchao: pip install"),
        (["--quantize", "nf4", "--nproc", "2"], "quantize nf4 trains in one process only"),
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
