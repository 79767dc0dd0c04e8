"""`fastmid train` on a parquet file in Alpaca shape with a held-out share, its loss logged every
few steps and everything reported to TensorBoard (read back from the event files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastmid.cli import main as cli_main
from tests.fastmid._runs import RECORDS, make_model_dir
from tests.fastmid.test_tracking import read_scalars, read_text

datasets = pytest.importorskip("datasets")
pytest.importorskip("tensorboard")


pytestmark = pytest.mark.usefixtures("one_thread_torch_path")


def test_alpaca_parquet_with_heldout_loss_and_tensorboard(tmp_path: Path):
    model = make_model_dir(tmp_path)
    rows = [{"instruction": r["question"], "input": "", "output": r["answer"]} for r in RECORDS]
    parquet = tmp_path / "alpaca.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    out = tmp_path / "run"
    code = cli_main(
        [
            "train", "--model", str(model), "--data", str(parquet), "--output-dir", str(out),
            "--precision", "fp32", "--rank", "8", "--alpha", "16", "--lr", "1e-2",
            "--batch-tokens", "256", "--grad-accum", "1", "--max-length", "64",
            "--max-steps", "6", "--no-eval", "--eval-split-ratio", "0.25", "--eval-every", "2",
            "--report-to", "tensorboard",
        ]
    )  # fmt: skip
    assert code == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6]
    eval_loss = {x["step"]: x["eval_loss"] for x in lines if "eval_loss" in x}
    assert sorted(eval_loss) == [2, 4, 6]
    # The held-out answers get likelier as the adapter learns the task.
    assert eval_loss[6] < eval_loss[2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resolved"]["train_examples"] == 24  # 32 records, a quarter held out

    scalars = read_scalars(out / "tensorboard")
    for name in ("train/loss", "train/lr", "train/tokens_per_s", "train/mem_gb", "train/grad_norm"):
        assert [s for s, _ in scalars[name]] == [1, 2, 3, 4, 5, 6], name
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([x["loss"] for x in lines])
    assert dict(scalars["eval/loss"]) == pytest.approx(eval_loss)
    config = json.loads(read_text(out / "tensorboard", "config").strip("`\n"))
    assert config["data"] == str(parquet) and config["eval_split_ratio"] == 0.25
    assert config["resolved"]["layers"] == [2, 3, 4, 5, 6, 7]


def test_eval_every_without_heldout_records_is_one_line(tmp_path: Path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    code = cli_main(
        ["train", "--data", str(data), "--eval-every", "2", "--output-dir", str(tmp_path / "o")]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0
    assert "--eval-every needs held-out records: --eval-split-ratio or --eval-data" in err
    assert not (tmp_path / "o").exists()
