"""What a run tells its user: the header (lr, schedule, recipe), the held-out losses on the
console and in the summary, the steps' own throughput, and an aligned summary."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import fastmid.recipe.metrics as metrics_mod
import fastmid.recipe.train as train_mod
from fastmid.cli import main
from fastmid.recipe.config import TrainConfig, build_config
from fastmid.recipe.train import format_summary, plan_steps
from tests.fastmid._runs import RECORDS, as_flags, metrics, tiny_settings, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread_torch_path")


def test_recipe_names_what_chose_the_lr():
    assert TrainConfig().recipe().startswith("demo (lr 0.001, 16 steps, as no --data")
    assert (
        build_config(None, {"max_steps": 6}).recipe() == "paper (lr 0.0001; pass --lr to change it)"
    )
    assert build_config(None, {"lr": 3e-3}).recipe() == "lr 0.003 as given"


@pytest.mark.parametrize(("steps", "warmup"), [(1, 0), (2, 1), (20, 1), (21, 2)])
def test_ratio_warmup_never_takes_every_step(steps: int, warmup: int):
    plan = plan_steps(10, build_config(None, {"max_steps": steps}))
    assert plan.warmup_steps == warmup


def test_one_step_run_trains_at_the_peak_lr(model_dir: Path, tmp_path: Path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    out = tmp_path / "out"
    settings = tiny_settings(model_dir, data, out, max_steps=1, warmup_steps=None)
    assert main(["train", *as_flags(settings)]) == 0
    header = capsys.readouterr().out.splitlines()
    first = next(i for i, line in enumerate(header) if line.startswith("fastmid train: "))
    assert header[first].endswith("| 1 step")
    assert header[first + 1] == "lr 0.01, 0 warmup steps then linear | recipe: lr 0.01 as given"
    assert [r["lr"] for r in metrics(out)] == [0.01]


def test_held_out_losses_are_shown_and_not_timed(
    model_dir: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
):
    # A clock that jumps 1000 s whenever the held-out loss is computed: the throughput must
    # not see it (no timing of the machine is asserted).
    jump = {"s": 0.0}

    class Clock:
        monotonic = staticmethod(time.monotonic)

        @staticmethod
        def perf_counter() -> float:
            return time.perf_counter() + jump["s"]

    real_call = train_mod.HeldoutLoss.__call__

    def slow_heldout(self, model, autocast):
        jump["s"] += 1000.0
        return real_call(self, model, autocast)

    # The metrics window times the steps.
    monkeypatch.setattr(metrics_mod, "time", Clock)
    monkeypatch.setattr(train_mod.HeldoutLoss, "__call__", slow_heldout)
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    out = tmp_path / "out"
    settings = tiny_settings(
        model_dir, data, out, max_steps=4, eval_every=2, eval_split_ratio=0.25, log_every=1
    )
    assert main(["train", *as_flags(settings)]) == 0
    printed = capsys.readouterr().out
    rows = metrics(out)
    evals = [[r["step"], r["eval_loss"]] for r in rows if "eval_loss" in r]
    assert [s for s, _ in evals] == [2, 4]
    for step, loss in evals:
        assert f"step {step}/4 | " in printed
        line = next(x for x in printed.splitlines() if x.startswith(f"step {step}/4 | "))
        assert line.endswith(f"| held-out loss {loss:.4f}")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_losses"] == evals
    assert summary["train_seconds"] < 1000.0  # 2000 s of held-out loss left out
    expected = f"  held-out loss  {evals[0][1]:.4f} → {evals[-1][1]:.4f} (steps 2-4)"
    assert expected in printed.splitlines()


def test_summary_rows_align():
    summary = {
        "loss_first": 2.0,
        "loss_last": 1.0,
        "eval_before": {"accuracy": 0.1, "heldout_ppl": 50.0},
        "eval_after": {"accuracy": 0.2, "heldout_ppl": 49.0},
        "tokens_per_s": 400.0,
        "wall_seconds": 10.0,
        "adapter": "out/adapter",
    }
    lines = format_summary(summary).splitlines()[2:]
    assert [line.split("  ")[1] for line in lines] == [
        "loss", "accuracy", "forgetting", "throughput", "wall time", "adapter",
    ]  # fmt: skip
    starts = {len(line) - len(line.split("  ", 2)[2].lstrip()) for line in lines}
    assert len(starts) == 1  # every value starts in one column
