"""`fastmid compare`: placements, scale policies, the verdict, and a tiny end-to-end comparison
that resumes from its cache."""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from pathlib import Path

import pytest

from fastmid.cli import main as cli_main
from fastmid.engine.midblock import MidBlockConfig, lora_scale, resolve_rank
from fastmid.errors import UserError
from fastmid.recipe.config import TrainConfig
from fastmid.study import compare as cmp
from tests.fastmid._runs import RECORDS, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread_torch_path")


# --- placements and scales ------------------------------------------------------------------


def test_equal_width_placements():
    # 30 layers (the embedded SmolLM2): the default band 6-23 is 18 wide.
    assert cmp.placement_band("bottom", 30, 18) == list(range(0, 18))
    assert cmp.placement_band("middle", 30, 18) == list(range(6, 24))
    assert cmp.placement_band("top", 30, 18) == list(range(12, 30))
    assert cmp.placement_band("all", 30, 18) == list(range(30))
    # Thirds: the middle is centred when it is not the default band's width.
    assert cmp.placement_band("middle", 30, 10) == list(range(10, 20))
    assert cmp.placement_band("top", 30, 10) == list(range(20, 30))
    # User bands in every `fastmid train --band` form.
    assert cmp.placement_band("6-23", 30, 18) == list(range(6, 24))
    assert cmp.placement_band("0.1,0.5", 30, 18) == list(range(3, 15))
    assert cmp.placement_band("3,5,7", 30, 18) == [3, 5, 7]
    with pytest.raises(UserError, match="width"):
        cmp.placement_band("bottom", 30, 31)
    with pytest.raises(UserError, match="band"):
        cmp.placement_band("sideways", 30, 18)


@pytest.mark.parametrize(
    ("n_active", "policy", "want_rank", "want_scale"),
    [
        # A 6-layer edge band of 30 with the paper's budget 64 and alpha 128: rank 320.
        (6, "fixed", 320, 128 / 320),  # 0.4: the confound the policies exist to remove
        (6, "ratio", 320, 2.0),  # held at the all-layer 128 / 64
        (6, "rslora", 320, 128 / math.sqrt(320)),
        # The default 18-layer band: rank 106.
        (18, "fixed", 106, 128 / 106),
        (18, "ratio", 106, 2.0),
        (18, "rslora", 106, 128 / math.sqrt(106)),
        # All layers: rank = the budget; fixed and ratio agree there.
        (30, "fixed", 64, 2.0),
        (30, "ratio", 64, 2.0),
        (30, "rslora", 64, 16.0),
    ],
)
def test_alpha_policies_give_the_expected_scale(n_active, policy, want_rank, want_scale):
    rank = resolve_rank(None, 64, 30, n_active)
    assert rank == want_rank
    alpha, rslora = cmp.policy_alpha(policy, 128.0, rank, 64)
    assert lora_scale(alpha, rank, rslora) == pytest.approx(want_scale, rel=1e-12)


def test_compare_by_default_measures_the_scale_train_ships():
    parser = argparse.ArgumentParser()
    cmp.add_arguments(parser)
    policy = parser.parse_args([]).alpha_policy
    shipped = MidBlockConfig()
    for n_active in (6, 18, 30):
        rank = resolve_rank(None, shipped.rank_budget, 30, n_active)
        alpha, rslora = cmp.policy_alpha(policy, shipped.alpha, rank, shipped.rank_budget)
        assert lora_scale(alpha, rank, rslora) == lora_scale(shipped.alpha, rank, False)


def test_unknown_policy_is_a_user_error():
    with pytest.raises(UserError, match="alpha-policy"):
        cmp.policy_alpha("loud", 128.0, 8, 64)


# --- verdict on synthetic numbers -----------------------------------------------------------


def row(placement: str, nll: float, std: float | None, seconds: float = 10.0, mem: float = 1.0):
    r = {
        "placement": placement,
        "policy": "ratio",
        "layers": "0-5",
        "rank": 8,
        "scale": 2.0,
        "trainable_params": 100,
        "seeds": 1 if std is None else 3,
    }
    for key, _, _ in cmp.METRICS:
        r[key], r[key + "_std"] = 0.5, (None if std is None else 0.01)
    r.update(answer_nll=nll, answer_nll_std=std, train_seconds=seconds, peak_mem_gb=mem)
    return r


def test_separation_splits_by_the_sum_of_the_spreads():
    rows = [
        row("middle", 1.00, 0.02),
        row("all", 1.03, 0.02),  # gap 0.03 < 0.04: within
        row("top", 1.05, 0.02),  # gap 0.05 > 0.04: beyond
        row("bottom", 1.50, 0.30),  # gap 0.50 > 0.32: beyond
    ]
    best, beyond, within = cmp.separation(rows)
    assert best["placement"] == "middle"
    assert [r["placement"] for r in beyond] == ["top", "bottom"]
    assert [r["placement"] for r in within] == ["all"]
    # Higher-is-better metrics pick the largest.
    for r, acc in zip(rows, [0.35, 0.4, 0.1, 0.0], strict=True):
        r["accuracy"], r["accuracy_std"] = acc, 0.05
    best, beyond, within = cmp.separation(rows, "accuracy", lower_is_better=False)
    assert best["placement"] == "all"
    assert [r["placement"] for r in beyond] == ["top", "bottom"]
    assert [r["placement"] for r in within] == ["middle"]


def test_verdict_names_what_exceeds_the_spread():
    rows = [row("middle", 1.00, 0.02, seconds=8), row("all", 1.03, 0.02), row("top", 1.2, 0.02)]
    text = cmp.verdict(rows, base={"answer_nll": 1.45})
    assert "middle (0-5, ratio) is best at 1.000 ± 0.020 (base model 1.450)" in text
    assert "beats top (0-5, ratio) by more than the seed-to-seed spread" in text
    assert "all (0-5, ratio) at 1.030 ± 0.020 is within the seed-to-seed spread" in text
    assert "middle (0-5, ratio) trained fastest (8 s)" in text

    clear = cmp.verdict([row("middle", 1.0, 0.01), row("top", 1.2, 0.01)])
    assert "Every difference from the best exceeds the seed-to-seed spread." in clear
    assert "within" not in clear


def test_verdict_reports_gain_per_unit_of_forgetting():
    rows = [row("middle", 1.00, 0.02), row("all", 0.90, 0.02), row("bottom", 1.2, 0.02)]
    for r, ppl in zip(rows, [50.0, 53.0, 47.0], strict=True):
        r["general_ppl"] = ppl
    base = {"answer_nll": 1.45, "general_ppl": 48.0}
    items = cmp.forgetting(rows, base)
    # middle: 0.45 for +2 ppl; all: 0.55 for +5; bottom: 0.25 with perplexity down.
    assert [x["gain_per_ppl"] for x in items] == pytest.approx([0.225, 0.11, None])
    assert [x["nll_gain"] for x in items] == pytest.approx([0.45, 0.55, 0.25])
    assert [x["ppl_change"] for x in items] == pytest.approx([2.0, 5.0, -1.0])
    text = cmp.verdict(rows, base=base)
    assert (
        "Answer-NLL gain per point of general-text perplexity added (forgetting): "
        "bottom (0-5, ratio) 0.250 for -1.00 ppl (no forgetting); "
        "middle (0-5, ratio) 0.450 for +2.00 ppl = 0.225 per ppl point; "
        "all (0-5, ratio) 0.550 for +5.00 ppl = 0.110 per ppl point."
    ) in text


def test_verdict_with_one_seed_claims_nothing():
    text = cmp.verdict([row("middle", 1.0, None), row("top", 1.5, None)])
    assert "spread is unknown" in text
    assert "beats" not in text


def runs(placement: str, nlls: list[float]) -> list[dict]:
    """Per-seed results of one placement (the fields the paired comparison reads)."""
    return [
        {"placement": placement, "policy": "ratio", "seed": seed, "answer_nll": nll}
        for seed, nll in enumerate(nlls)
    ]


def test_paired_gap_cancels_a_shift_of_the_whole_seed():
    # Seed 1 is 0.10 lower for everyone; top is 0.01 behind middle in every seed.
    results = runs("middle", [0.40, 0.30, 0.35, 0.45]) + runs("top", [0.41, 0.31, 0.36, 0.46])
    results += runs("all", [0.39, 0.32, 0.34, 0.46])
    middle, top, every = (
        row("middle", 0.375, 0.06),
        row("top", 0.385, 0.06),
        row("all", 0.3775, 0.06),
    )
    gap = cmp.paired_gap(results, top, middle)
    assert gap.mean == pytest.approx(0.01) and gap.std == pytest.approx(0.0, abs=1e-12)
    assert (gap.worse_in, gap.seeds) == (4, 4)
    assert gap.sign_p == pytest.approx(1 / 16)
    mixed = cmp.paired_gap(results, every, middle)
    assert (mixed.worse_in, mixed.seeds) == (2, 4)
    assert mixed.mean == pytest.approx(0.0025)
    # P(at least 2 of 4 heads) = (6 + 4 + 1) / 16.
    assert mixed.sign_p == pytest.approx(11 / 16)
    # Only the seeds both ran count; higher-is-better metrics flip the sign.
    assert cmp.paired_gap(results[:4] + runs("top", [0.5]), top, middle).seeds == 1
    for r in results:
        r["accuracy"] = -r["answer_nll"]
    flipped = cmp.paired_gap(results, top, middle, "accuracy", lower_is_better=False)
    assert flipped.mean == pytest.approx(0.01) and flipped.worse_in == 4

    top["layers"], every["layers"] = "4-9", "0-9"
    text = cmp.verdict([middle, top, every], results=results)
    # Unpaired, the seed shift hides everything; paired, top is behind in every seed.
    assert "within the seed-to-seed spread" in text
    assert "top (4-9, ratio) in 4 of 4 (by 0.010 ± 0.000, sign test p = 0.062)" in text
    assert "all (0-9, ratio) in 2 of 4 (by 0.003 ± 0.015, sign test p = 0.69)" in text


def test_paired_verdict_names_runs_of_the_same_layers():
    results = runs("middle", [0.40, 0.30]) + runs("auto", [0.40, 0.30]) + runs("top", [0.5, 0.4])
    rows = [row("middle", 0.35, 0.07), row("auto", 0.35, 0.07), row("top", 0.45, 0.07)]
    rows[2]["layers"] = "4-9"
    text = cmp.verdict(rows, results=results)
    assert "top (4-9, ratio) in 2 of 2 (by 0.100 ± 0.000, sign test p = 0.25)" in text
    assert "auto (0-5, ratio) trained the same layers as the best: the same runs." in text
    # Without the per-run results (or with one seed) there is no paired sentence.
    assert "Paired" not in cmp.verdict(rows)
    assert "Paired" not in cmp.verdict(rows, results=[r for r in results if r["seed"] == 0])


# --- end to end on a tiny model -------------------------------------------------------------


def tiny_settings(model_dir: Path, data: Path, eval_data: Path, **over) -> cmp.Settings:
    train = dict(
        model=str(model_dir),
        data=str(data),
        precision="fp32",
        lr=1e-2,
        batch_tokens=256,
        grad_accum=1,
        max_length=64,
        max_steps=2,
        rank_budget=4,
        alpha=8.0,
    )
    train.update(over)
    return cmp.Settings(
        train=train, eval_data=str(eval_data), eval_limit=2, nll_limit=8, ppl_limit=2
    )


def test_compare_end_to_end_and_resume(model_dir: Path, tmp_path: Path, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS[:16])
    held = write_jsonl(tmp_path / "test.jsonl", RECORDS[16:24])
    settings = tiny_settings(model_dir, data, held)
    out = tmp_path / "cmp"
    calls: list[str] = []
    real_train = cmp.train_and_evaluate

    def counting(settings, plan, run_dir):
        calls.append(plan.key)
        return real_train(settings, plan, run_dir)

    monkeypatch.setattr(cmp, "train_and_evaluate", counting)
    placements = ["bottom", "top", "all"]
    result = cmp.compare(settings, placements, ["fixed"], 2, out, isolate=False, log=lambda m: None)
    assert len(calls) == 6
    rows = result["rows"]
    assert [r["placement"] for r in rows] == placements
    # 10 layers, default width 6: rank floor(4 * 10 / 6) = 6 on the bands, 4 on all layers;
    # the fixed policy gives alpha / rank.
    by_name = {r["placement"]: r for r in rows}
    assert by_name["bottom"]["layers"] == "0-5" and by_name["top"]["layers"] == "4-9"
    assert by_name["bottom"]["rank"] == 6 and by_name["all"]["rank"] == 4
    assert by_name["bottom"]["scale"] == pytest.approx(8 / 6)
    assert by_name["all"]["scale"] == pytest.approx(2.0)
    # 4 targets x (r x 64 + 64 x r) per layer; q/k/v/o of the tiny Llama are 64 wide except
    # k/v (32 = 2 KV heads x 16).
    per_rank = 2 * (64 + 64) + 2 * (64 + 32)
    assert by_name["bottom"]["trainable_params"] == 6 * 6 * per_rank
    base_nll = result["base"]["answer_nll"]
    for r in rows:
        assert r["seeds"] == 2
        # Each row is the mean and sample spread of its two seeds' runs.
        nlls = [x["answer_nll"] for x in result["results"] if x["placement"] == r["placement"]]
        assert r["answer_nll"] == pytest.approx(statistics.mean(nlls), rel=1e-12)
        assert r["answer_nll_std"] == pytest.approx(statistics.stdev(nlls), rel=1e-9)
        # Two steps at lr 1e-2 on the same kind of records lower the held-out answer NLL.
        assert all(0 < nll < base_nll for nll in nlls), (r["placement"], nlls, base_nll)
        assert r["train_seconds"] > 0 and r["peak_mem_gb"] > 0
    # The seeds really differ (a different adapter init and data order).
    bottom = [x for x in result["results"] if x["placement"] == "bottom"]
    assert bottom[0]["answer_nll"] != bottom[1]["answer_nll"]

    table = list(csv.DictReader((out / "results.csv").open()))
    assert [t["placement"] for t in table] == placements
    assert float(table[0]["answer_nll"]) == pytest.approx(rows[0]["answer_nll"])
    report = json.loads((out / "results.json").read_text())
    assert report["verdict"] == result["verdict"] and report["num_layers"] == 10
    # Each placement but the best, paired with the best over both seeds.
    best = min(rows, key=lambda r: r["answer_nll"])["placement"]
    paired = {p["placement"]: p for p in report["paired_vs_best"]}
    assert sorted(paired) == sorted(set(placements) - {best})
    for p in paired.values():
        assert p["best"] == best and p["seeds"] == 2 and 0 <= p["worse_in"] <= 2
    assert (out / "results.md").read_text().startswith("| placement |")
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Interrupted after some runs: the cached ones are not trained again.
    removed = sorted((out / "runs").iterdir())[0]
    (removed / "result.json").unlink()
    calls.clear()
    again = cmp.compare(settings, placements, ["fixed"], 2, out, isolate=False, log=lambda m: None)
    assert calls == [removed.name]
    assert [r["answer_nll"] for r in again["rows"]] == pytest.approx(
        [r["answer_nll"] for r in rows]
    )
    # More seeds reuse the first two; a placement with the same layers reuses its runs.
    calls.clear()
    cmp.compare(settings, ["0-5"], ["fixed"], 2, out, isolate=False, log=lambda m: None)
    assert calls == []

    # Other settings in the same directory: refused, unless --overwrite.
    changed = tiny_settings(model_dir, data, held, max_steps=3)
    with pytest.raises(UserError, match="other settings"):
        cmp.compare(changed, placements, ["fixed"], 1, out, isolate=False)


def test_cli_compare_in_subprocesses(model_dir: Path, tmp_path: Path, monkeypatch, capsys):
    """The CLI path: each run in its own process; a bad band fails before any training."""
    # The spawned runs read the switch at import: give them the torch path too.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS[:12])
    held = write_jsonl(tmp_path / "test.jsonl", RECORDS[16:20])
    common = [
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--eval-data",
        str(held),
        "--precision",
        "fp32",
        "--max-steps",
        "1",
        "--lr",
        "1e-2",
        "--batch-tokens",
        "256",
        "--grad-accum",
        "1",
        "--max-length",
        "64",
        "--eval-limit",
        "0",
        "--nll-limit",
        "4",
        "--ppl-limit",
        "1",
        "--rank-budget",
        "4",
    ]
    out = tmp_path / "cli"
    assert cli_main(["compare", *common, "--placements", "sideways", "--output-dir", str(out)]) == 2
    assert "band 'sideways'" in capsys.readouterr().err
    assert not out.exists()

    code = cli_main(
        [
            "compare",
            *common,
            "--placements",
            "middle",
            "--seeds",
            "1",
            "--alpha-policy",
            "rslora",
            "--output-dir",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| middle (rslora) | 2-7 |" in printed
    assert "There is nothing to compare it with." in printed
    result = json.loads(next((out / "runs").glob("*/result.json")).read_text())
    # Budget 4 on 6 of 10 layers: rank 6, rsLoRA scale 128 / sqrt(6) (alpha's default 128).
    assert result["rank"] == 6
    assert result["accuracy"] is None  # --eval-limit 0: no generation
    assert result["answer_nll"] > 0 and result["general_ppl"] > 1
    assert result["scale"] == pytest.approx(128 / math.sqrt(6))
    assert "step 1/1" in next((out / "runs").glob("*/log.txt")).read_text()


# In-process runs, no log: what the interruption tests compare.
QUIET = dict(isolate=False, log=lambda m: None)


def one_run_settings(model_dir: Path, tmp_path: Path, max_steps: int) -> cmp.Settings:
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS[:16])
    held = write_jsonl(tmp_path / "test.jsonl", RECORDS[16:24])
    return tiny_settings(model_dir, data, held, max_steps=max_steps)


def on_call(n: int, real, action):
    """``real`` with ``action()`` run first on its ``n``-th call."""
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            action()
        return real(*args, **kwargs)

    return wrapped


def test_a_run_interrupted_during_its_evaluation_is_not_trained_again(
    model_dir: Path, tmp_path: Path, monkeypatch
):
    import fastmid.recipe.train as train_mod

    settings = one_run_settings(model_dir, tmp_path, max_steps=2)
    out = tmp_path / "cmp"

    def interrupt():
        raise KeyboardInterrupt

    # The first evaluation is the base model's; the second the tuned run's.
    monkeypatch.setattr(cmp, "evaluate_model", on_call(2, cmp.evaluate_model, interrupt))
    with pytest.raises(KeyboardInterrupt):
        cmp.compare(settings, ["top"], ["ratio"], 1, out, **QUIET)
    (run_dir,) = (out / "runs").iterdir()
    assert (run_dir / "train" / "adapter").is_dir()
    assert not (run_dir / "result.json").exists()
    adapter = sorted((run_dir / "train" / "adapter").iterdir())
    stamps = [f.stat().st_mtime_ns for f in adapter]

    def no_training(cfg):
        raise AssertionError("the finished run was trained again")

    monkeypatch.setattr(train_mod, "train", no_training)
    resumed = cmp.compare(settings, ["top"], ["ratio"], 1, out, **QUIET)
    (got,) = resumed["results"]
    assert [f.stat().st_mtime_ns for f in adapter] == stamps
    summary = json.loads((run_dir / "train" / "summary.json").read_text())
    assert got["train_seconds"] == summary["train_seconds"]
    assert got["loss_last"] == summary["loss_last"]
    assert got["answer_nll"] > 0 and got["rank"] == summary["resolved"]["rank"]


def test_a_run_interrupted_mid_training_resumes_from_its_checkpoint(
    model_dir: Path, tmp_path: Path, monkeypatch
):
    import os
    import signal

    import fastmid.recipe.train as train_mod

    settings = one_run_settings(model_dir, tmp_path, max_steps=4)
    straight = cmp.compare(settings, ["top"], ["ratio"], 1, tmp_path / "straight", **QUIET)
    real = train_mod.forward_loss

    def interrupt():  # during step 2: the run checkpoints after it and stops
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(train_mod, "forward_loss", on_call(2, real, interrupt))
    out = tmp_path / "cmp"
    with pytest.raises(KeyboardInterrupt):
        cmp.compare(settings, ["top"], ["ratio"], 1, out, **QUIET)
    (run_dir,) = (out / "runs").iterdir()
    assert (run_dir / "train" / "checkpoint").is_dir()
    assert not (run_dir / "result.json").exists()

    monkeypatch.setattr(train_mod, "forward_loss", real)
    resumed = cmp.compare(settings, ["top"], ["ratio"], 1, out, **QUIET)
    steps = [json.loads(x)["step"] for x in (run_dir / "train" / "metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4]
    # Resuming is exact: the same adapter, so the same held-out numbers as a straight run.
    (got,), (want,) = resumed["results"], straight["results"]
    assert got["answer_nll"] == want["answer_nll"]
    assert got["loss_last"] == want["loss_last"]


def test_a_crashed_run_leaves_its_traceback_in_its_log(tmp_path: Path, monkeypatch, capsys):
    def crash(settings, plan, run_dir):
        print("step 1/2")
        raise RuntimeError("evaluation went wrong")

    monkeypatch.setattr(cmp, "train_and_evaluate", crash)
    plan = cmp.Plan("top", [3, 4], "ratio", 0)
    with pytest.raises(SystemExit) as exit_:
        cmp._child(None, plan, str(tmp_path))
    assert exit_.value.code == 1
    log = (tmp_path / "log.txt").read_text()
    assert log.startswith("step 1/2\n")
    assert "Traceback" in log and "RuntimeError: evaluation went wrong" in log
    # The streams are restored, not left on the closed log.
    print("stdout is back")
    assert capsys.readouterr().out == "stdout is back\n"


def test_auto_is_chosen_once_with_the_runs_adapters(model_dir: Path, tmp_path: Path, monkeypatch):
    from fastmid.recipe import bandgain

    calls = []

    def spy(model, tokenizer, examples, *, adapter, lr, criterion, width, max_quality_gap):
        calls.append(
            dict(adapter=adapter, lr=lr, criterion=criterion, width=width, gap=max_quality_gap)
        )
        return [4, 5, 6, 7, 8, 9], {"reason": "spied"}

    monkeypatch.setattr(bandgain, "choose_auto_band", spy)
    settings = one_run_settings(model_dir, tmp_path, max_steps=1)
    out = tmp_path / "cmp"
    result = cmp.compare(settings, ["auto", "top"], ["ratio"], 1, out, **QUIET)
    (call,) = calls
    # The window criterion by default; candidates of the default band's width (6 of 10
    # layers) get its budget-matched rank floor(4 * 10 / 6) = 6 and the ratio policy's
    # alpha = (8 / 4) * 6; the run's lr.
    assert call["criterion"] == "window" and call["width"] == 6 and call["lr"] == 1e-2
    # The train flag's default quality gap, passed through like every training flag.
    assert call["gap"] == TrainConfig().max_quality_gap == 0.1
    assert call["adapter"].rank_budget == 4 and call["adapter"].alpha == pytest.approx(12.0)
    auto, top = result["rows"]
    assert auto["layers"] == top["layers"] == "4-9"
    assert json.loads((out / "auto-window-w6-ratio.json").read_text())["reason"] == "spied"
    cmp.compare(settings, ["auto"], ["ratio"], 1, out, **QUIET)
    assert len(calls) == 1  # cached


def test_overwrite_chooses_auto_again_and_changed_settings_are_refused(
    model_dir: Path, tmp_path: Path, monkeypatch
):
    from fastmid.recipe import bandgain

    # The spy picks a band that depends on the lr it is given, as a real probe run would.
    chosen = {1e-2: [4, 5, 6, 7, 8, 9], 5e-3: [0, 1, 2, 3, 4, 5]}
    calls = []

    def spy(model, tokenizer, examples, *, adapter, lr, criterion, width, max_quality_gap):
        calls.append(lr)
        return chosen[lr], {"reason": f"lr {lr}"}

    monkeypatch.setattr(bandgain, "choose_auto_band", spy)
    settings = one_run_settings(model_dir, tmp_path, max_steps=1)
    out = tmp_path / "cmp"
    first = cmp.compare(settings, ["auto"], ["ratio"], 1, out, **QUIET)
    assert calls == [1e-2] and first["rows"][0]["layers"] == "4-9"

    # Each compared setting is part of the cache key: a change without --overwrite is refused
    # before anything is loaded or removed.
    data, held = settings.train["data"], settings.eval_data
    other_held = write_jsonl(tmp_path / "other.jsonl", RECORDS[20:28])
    changes = [
        cmp.Settings(**{**vars(settings), "eval_data": str(other_held)}),
        cmp.Settings(**{**vars(settings), "eval_limit": 3}),
        cmp.Settings(**{**vars(settings), "nll_limit": 7}),
        cmp.Settings(**{**vars(settings), "ppl_limit": 1}),
        tiny_settings(model_dir, Path(data), Path(held), max_steps=1, lr=5e-3),
    ]
    stamp = (out / "compare.json").read_text()
    for changed in changes:
        with pytest.raises(UserError, match="other settings"):
            cmp.compare(changed, ["auto"], ["ratio"], 1, out, **QUIET)
        assert (out / "compare.json").read_text() == stamp

    # --overwrite with another lr: the auto band is chosen again at that lr, and the run
    # trains the new band, not the one cached for the first lr.
    lower = tiny_settings(model_dir, Path(data), Path(held), max_steps=1, lr=5e-3)
    second = cmp.compare(lower, ["auto"], ["ratio"], 1, out, overwrite=True, **QUIET)
    assert calls == [1e-2, 5e-3]
    assert second["rows"][0]["layers"] == "0-5"
    cached = json.loads((out / "auto-window-w6-ratio.json").read_text())
    assert cached == {"layers": [0, 1, 2, 3, 4, 5], "reason": "lr 0.005"}


def compare_argv(*extra: str) -> list[str]:
    return ["compare", "--placements", "top", "--nll-limit", "2", "--ppl-limit", "1", *extra]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--data", "{data}"],
            "fastmid compare: error: --data needs --eval-data: held-out records to compare the "
            "runs on",
        ),
        (
            [],
            "fastmid compare: error: output dir {out} is not empty; pass --overwrite or use "
            "another",
        ),
    ],
)
def test_compare_input_errors_are_one_line_and_write_nothing(
    tmp_path: Path, capsys, extra: list[str], message: str
):
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS[:4])
    out = tmp_path / "cmp"
    if not extra:  # a directory holding something that is not a compare
        out.mkdir()
        (out / "notes.txt").write_text("mine\n")
    before = sorted(p.name for p in out.iterdir()) if out.exists() else None
    argv = [a.format(data=data) for a in extra]
    assert cli_main(compare_argv(*argv, "--output-dir", str(out))) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [message.format(out=out)]
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == before


@pytest.mark.parametrize(
    ("flag", "value"), [("--auto-criterion", "vibes"), ("--seeds", "0"), ("--seeds", "9-3")]
)
def test_bad_flag_values_are_refused_before_anything_runs(
    tmp_path: Path, capsys, flag: str, value: str
):
    out = tmp_path / "cmp"
    with pytest.raises(SystemExit) as exit_:
        cli_main(compare_argv(flag, value, "--output-dir", str(out)))
    assert exit_.value.code == 2
    assert f"argument {flag}: " in capsys.readouterr().err
    assert not out.exists()


def test_compare_checks_its_arguments_when_called_directly(tmp_path: Path):
    out = tmp_path / "cmp"
    settings = cmp.Settings(train={}, eval_data=None, eval_limit=0, nll_limit=1, ppl_limit=1)
    with pytest.raises(UserError, match=r"auto criterion must be one of"):
        cmp.compare(settings, ["auto"], ["ratio"], 1, out, auto_criterion="vibes", **QUIET)
    with pytest.raises(UserError, match=r"--seeds needs at least one seed"):
        cmp.compare(settings, ["top"], ["ratio"], [], out, **QUIET)
    assert not out.exists()


def test_seeds_name_a_count_a_range_or_a_list():
    assert cmp.parse_seeds("3") == [0, 1, 2]
    assert cmp.parse_seeds("100-103") == [100, 101, 102, 103]
    assert cmp.parse_seeds("5,7") == [5, 7]
    for bad in ("0", "9-3", "x", "1-2-3"):
        with pytest.raises(argparse.ArgumentTypeError):
            cmp.parse_seeds(bad)
    with pytest.raises(UserError, match="each once"):
        cmp.compare(None, ["middle"], ["ratio"], [3, 3], "unused")
