"""The benchmark machinery: ``fastmid bench --quick`` runs end to end and writes its reports.

No speed is asserted anywhere: timings depend on the machine. What is asserted is that every
workload produced rows with the numbers they must carry, that the files are complete, and
that the measuring tools count what they claim to count.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmid.errors import UserError

REPO = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    # The benchmark refuses the Triton interpreter that the test session switches on.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _fastmid(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastmid", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bench")
    res = _fastmid("bench", "--quick", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res.stdout


def _csv_matches(path: Path, rows: list[dict], skip: tuple[str, ...] = ()) -> None:
    """``path`` holds exactly ``rows`` (results.json's), one line each, every value as written."""
    with path.open(newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) > 0, path.name
    for line, row in zip(table, rows, strict=True):
        want = {k: "" if v is None else str(v) for k, v in row.items() if k not in skip}
        assert {k: line[k] for k in want} == want, path.name
        assert set(line) - set(want) == set(), path.name


@pytest.mark.slow
def test_quick_writes_every_report(quick_run: tuple[Path, str]) -> None:
    out, stdout = quick_run
    results = json.loads((out / "results.json").read_text())
    assert "partial" not in results  # the complete report, not a progress snapshot
    for name in ("throughput", "flops", "memory", "estimate", "bands", "compile"):
        _csv_matches(out / f"{name}.csv", results[name])
    # The profile's CSV leaves out the per-op lists (kept in profile.json).
    _csv_matches(out / "profile.csv", results["profile"], skip=("top_ops", "step_s_all"))
    assert json.loads((out / "profile.json").read_text()) == results["profile"]
    _csv_matches(out / "engine.csv", results["engine"], skip=("top_ops", "step_s_all"))
    for png in (
        "throughput.png",
        "mfu.png",
        "memory.png",
        "estimate.png",
        "bands.png",
        "profile.png",
    ):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The summary's throughput table: one line per measured row, with its numbers.
    summary = (out / "summary.md").read_text()
    for r in results["throughput"]:
        line = (
            f"| {r['provider']} | {r['dtype']} | {r['tokens_per_s']:.0f} | "
            f"{r['vs_peft_all']:.2f}x | {r['vs_peft_mid']:.2f}x | {r['epoch_s_est'] / 60:.1f} |"
        )
        assert line in summary, line
    assert f"commit {results['machine']['commit']}" in summary
    assert "Training throughput" in stdout and "ESTIMATED CUDA peak memory" in stdout
    assert not list(out.glob(".*")), "temporary files left behind"


@pytest.mark.slow
def test_quick_rows_carry_numbers_machine_and_commit(quick_run: tuple[Path, str]) -> None:
    out, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    assert results["machine"]["torch"] == torch.__version__
    rows = {name: results[name] for name in ("throughput", "flops", "memory", "estimate", "bands")}
    for name, table in rows.items():
        assert table, name
        for r in table:
            assert r["machine"] and r["commit"] and r["dtype"] and r["shape"], (name, r)

    thr = {(r["provider"], r["dtype"]): r for r in rows["throughput"]}
    assert set(thr) == {(p, d) for p in ("peft_all", "peft_all_gc", "peft_mid", "fastmid")
                        for d in ("fp32", "bf16")}  # fmt: skip
    for (provider, _), r in thr.items():
        assert r["tokens_per_s"] > 0 and r["epoch_s_est"] > 0
        # Identical data: every provider trained the same real tokens...
        assert r["real_tokens"] == thr[("peft_all", "fp32")]["real_tokens"]
        # ...and only fastmid's packing executes no pad position.
        if provider == "fastmid":
            assert r["executed_tokens"] == r["real_tokens"]
        else:
            assert r["executed_tokens"] >= r["real_tokens"]
    # Each speed-up is this row's throughput over the reference's, in the same dtype.
    for (provider, dtype), r in thr.items():
        for ref in ("peft_all", "peft_mid"):
            want = r["tokens_per_s"] / thr[(ref, dtype)]["tokens_per_s"]
            assert r[f"vs_{ref}"] == pytest.approx(want, rel=1e-12), (provider, dtype, ref)

    flops = {(r["provider"], r["dtype"]): r for r in rows["flops"]}
    # The band skips the backward below it and the label-only head most of the vocabulary
    # matmul: fastmid's useful work per token is below standard LoRA's.
    assert (
        flops[("fastmid", "fp32")]["useful_flops_per_token"]
        < flops[("peft_all", "fp32")]["useful_flops_per_token"]
    )
    for r in flops.values():
        assert r["executed_over_useful"] >= 1.0 and r["mfu"] > 0

    for r in rows["memory"]:
        assert r["peak_bytes"] >= r["setup_bytes"] > 0
        assert r["grad_bytes"] > 0 and r["optimizer_bytes"] >= 2 * r["grad_bytes"]

    est = {r["provider"]: r for r in rows["estimate"]}
    assert est["fastmid"]["estimate"] is True
    # Same architecture, same bf16 weights; fastmid's step holds less than all-layer LoRA.
    assert est["fastmid"]["weights_bytes"] == pytest.approx(est["peft_all"]["weights_bytes"], 0.01)
    assert est["fastmid"]["step_peak_bytes"] < est["peft_all"]["step_peak_bytes"]

    bands = {r["band"]: r for r in rows["bands"]}
    assert set(bands) == {"bottom", "middle", "top", "all"}
    assert bands["all"]["layers"] == "0-9" and bands["middle"]["layers"] == "2-7"

    compiled = {r["compile"]: r for r in results["compile"]}
    assert set(compiled) == {"off", "on"} and compiled["off"]["vs_eager"] == 1.0
    # The compiled run really compiled (and the eager one is charged nothing).
    assert compiled["on"]["compile_s"] > 0 and compiled["off"]["compile_s"] == 0
    assert compiled["on"]["tokens_per_s"] > 0 and compiled["on"]["dropout"] > 0

    with (out / "throughput.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows["throughput"]) and "commit" in csv_rows[0]


def test_bad_option_is_one_line_exit_2() -> None:
    res = _fastmid("bench", "--quick", "--providers", "peft_all,nope")
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "nope" in res.stderr


def test_without_a_source_checkout_is_a_user_error(monkeypatch, tmp_path: Path) -> None:
    from fastmid import benchcmd

    monkeypatch.setattr(benchcmd, "_source_checkouts", lambda: [tmp_path])
    with pytest.raises(UserError, match="source checkout"):
        benchcmd.find_suite_root()


def test_live_storage_tracker_peak() -> None:
    """The estimator's tracker: views share a storage, freed storages leave the live set."""
    sys.path.insert(0, str(REPO))
    from bench.estimate import LiveStorageTracker

    kept = torch.zeros(10)
    with LiveStorageTracker([kept]) as tracker:
        a = torch.ones(1000)  # 4,000 bytes
        view = a[:10]  # same storage: not counted again
        b = torch.ones(500)  # 2,000 bytes -> 6,000 live
        del a, view, b
        c = torch.ones(250)  # 1,000 bytes, after 6,000 were freed
    assert tracker.base_bytes == 40
    assert tracker.peak == 6000
    assert tracker.current == 1000
    del c


def test_ratios_are_against_the_reference_row_of_each_group() -> None:
    from bench.suite import add_ratio

    rows = [
        {"provider": "peft_all", "dtype": "fp32", "tok": 100.0},
        {"provider": "fastmid", "dtype": "fp32", "tok": 250.0},
        {"provider": "fastmid", "dtype": "bf16", "tok": 300.0},  # no reference in bf16
        {"provider": "peft_mid", "dtype": "fp32", "tok": None},  # nothing measured
    ]
    add_ratio(rows, "tok", "vs_peft_all", lambda r: r["provider"] == "peft_all")
    assert [r.get("vs_peft_all") for r in rows] == [1.0, 2.5, None, None]


def test_providers_say_how_they_batch() -> None:
    from bench.providers import SPECS, Workload
    from fastmid.recipe.data import Example

    examples = [Example(input_ids=[1] * n, targets=[2] * n) for n in (3, 5)]
    workload = Workload(examples, [[0, 1]], pad_id=0, epoch_tokens=8, max_length=8,
                        batch_tokens=8, loss_on="all")  # fmt: skip
    assert [n for n, s in SPECS.items() if s.packed] == ["fastmid"]
    assert SPECS["fastmid"].shape(workload, 0) == "1x8"
    assert SPECS["peft_all"].shape(workload, 0) == "2x5"
    assert SPECS["peft_all"].executed_tokens(workload, 0) == 10
    assert SPECS["fastmid"].executed_tokens(workload, 0) == 8


def test_loss_on_option_reaches_the_workload() -> None:
    from bench import suite

    assert suite.options_from_cli(False, loss_on="all").loss_on == "all"
    assert suite.options_from_cli(False).loss_on is None
    with pytest.raises(UserError, match=r"--loss-on must be one of response\|all"):
        suite.options_from_cli(False, loss_on="prompt")
