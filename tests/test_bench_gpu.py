"""The GPU benchmark's machinery, proven on the CPU: ``python -m bench.gpu --smoke`` runs every
provider on a tiny twin of the shapes and writes the report every tool reads; the FLOP count
behind MFU matches torch's own counter; the budget guard, OOM and error paths record a reason
instead of stopping the run.

No speed is asserted: smoke timings on a shared CPU say nothing about a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from bench import gpu

REPO = Path(__file__).resolve().parent.parent

# Step-0 losses of providers that compute the same function on the same tokens (every adapter
# starts with B = 0, so dropout does not enter): fp32 implementations that differ only in
# kernel choice and summation order agree to ~1e-6 relative here. A token attending across an
# example boundary moves the tiny model's loss by about 1% (test_leak_is_far_outside_the_
# tolerance), so 1e-4 separates numerics from that class of bug with room on both sides.
LOSS_RTOL = 1e-4


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    out = tmp_path_factory.mktemp("gpu")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    res = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--smoke", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / "smoke-cpu.json").read_text()), res.stdout, out


def _rows(results: dict) -> dict[str, dict]:
    return {r["provider"]: r for r in results["rows"]}


@pytest.mark.slow
def test_smoke_measures_every_provider(smoke) -> None:
    results, _, _ = smoke
    assert results["smoke"] is True and results["device"]["type"] == "cpu"
    assert results["versions"]["torch"] == torch.__version__ and results["commit"]
    rows = _rows(results)
    assert list(rows) == list(gpu.PROVIDERS)
    tokens = results["models"][0]["tokens_per_step"]
    for name, r in rows.items():
        assert r["model"] == "smollm2-135m"
        assert not r["oom"] and "error" not in r and "skipped" not in r, r
        assert r["tokens_per_s"] > 0 and r["peak_gib"] > 0 and r["steps"] >= 1
        assert r["tokens_per_s"] == pytest.approx(tokens / r["step_s_mean"], rel=1e-12)
        # No nominal peak for a CPU; the measured matmul gives the other MFU.
        assert r["mfu"] is None and 0 < r["mfu_measured"] < 1
        assert r["flops_per_token"] > 0
        packed = name not in ("fastmid", "peft_all", "peft_mid", "peft_all_gc")
        assert (r["executed_tokens"] == tokens) == packed, name
    # The band and the label-only head leave fastmid less useful work per token than PEFT's.
    assert rows["fastmid"]["flops_per_token"] < rows["peft_mid"]["flops_per_token"]
    assert rows["peft_mid"]["flops_per_token"] < rows["peft_all"]["flops_per_token"]
    # The strong set-up says which of its pieces ran here and why the others did not.
    pieces = rows["peft_all_strong"]["pieces"]
    assert pieces["attention"] == "sdpa+packed_mask" and pieces["liger"] is None
    assert any(m.startswith("liger_kernel") for m in pieces["missing"])


@pytest.mark.slow
def test_smoke_losses_agree_at_step_0(smoke) -> None:
    rows = _rows(smoke[0])
    ref = rows["peft_all"]["loss0"]
    assert ref > 1.0
    for name, r in rows.items():
        assert r["loss0"] == pytest.approx(ref, rel=LOSS_RTOL), name


@pytest.mark.slow
def test_smoke_ratios_follow_the_rows(smoke) -> None:
    rows = _rows(smoke[0])
    for name, r in rows.items():
        for ref in gpu.SPEED_REFS:
            want = r["tokens_per_s"] / rows[ref]["tokens_per_s"]
            assert r[f"vs_{ref}"] == pytest.approx(want, rel=1e-12), (name, ref)
        ref = gpu.memory_ref(name)
        assert r["peak_ref"] == ref
        assert r["peak_vs_ref"] == pytest.approx(r["peak_gib"] / rows[ref]["peak_gib"], rel=1e-12)
    assert rows["fastmid_trainer_gc"]["peak_ref"] == "peft_all_gc"
    assert rows["fastmid"]["vs_peft_all"] != rows["fastmid"]["vs_peft_mid"]


@pytest.mark.slow
def test_smoke_report_is_labelled_and_complete(smoke) -> None:
    results, stdout, out = smoke
    md = (out / "smoke-cpu.md").read_text()
    assert md.startswith("# SMOKE run") and md in stdout
    for name in gpu.PROVIDERS:
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {name} |"))
        ratio = f"{_rows(results)[name]['vs_peft_all']:.2f}"
        assert line.split(" | ")[2] == ratio, line
    assert "skipped: no CUDA device" in md  # the per-op table needs a GPU
    assert not list(out.glob(".*")), "temporary files left behind"


# --------------------------------------------------------------------------------------------
# The FLOP count behind MFU


def _tiny_eager() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = gpu._config("smollm2-135m", smoke=True)
    # Eager attention: its matmuls are plain bmm calls that FlopCounterMode sees.
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return model.requires_grad_(False).train()


@pytest.mark.parametrize("band", [False, True], ids=["peft_all", "peft_mid"])
def test_step_flops_equals_torch_flop_counter(band: bool) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from bench.providers import peft_model
    from fastmid.engine.midblock import PAPER_RANK_BUDGET

    base = _tiny_eager()
    cfg = base.config
    layers, rank = gpu._band(cfg.num_hidden_layers)
    if not band:
        layers, rank = list(range(cfg.num_hidden_layers)), PAPER_RANK_BUDGET
    model = peft_model(base, rank, layers if band else None, gc=False)
    (example,) = gpu.make_examples(cfg.vocab_size, 40, (40, 40), seed=0)
    with FlopCounterMode(display=False) as counter:
        model(**gpu.padded_batch([example]), use_cache=False).loss.backward()
    # HF's loss runs the head on all 40 positions.
    assert gpu.step_flops(cfg, [40], 40, layers, rank) == counter.get_total_flops()


def test_step_flops_counts_what_the_band_and_head_skip() -> None:
    cfg = gpu._config("smollm2-135m", smoke=True)
    every = list(range(cfg.num_hidden_layers))
    full = gpu.step_flops(cfg, [64, 32], 96, every, 8)
    head = 2 * 2 * cfg.hidden_size * cfg.vocab_size
    assert full - gpu.step_flops(cfg, [64, 32], 40, every, 8) == 56 * head
    # Attention grows with each example's square, not the step's.
    assert gpu.step_flops(cfg, [96], 96, every, 8) > full
    # A band starting higher up skips the backward of every block below it.
    higher, lower = (gpu.step_flops(cfg, [64, 32], 96, band, 8) for band in ([2, 3], [1, 2]))
    assert higher < lower


def test_leak_is_far_outside_the_tolerance() -> None:
    """The step-0 check can fail: a packed row whose positions do not restart (every token sees
    the examples before it) changes the loss by far more than LOSS_RTOL, while the correct
    packed row matches the padded batch within it."""
    base = _tiny_eager()
    base.set_attn_implementation("sdpa")
    examples = gpu.make_examples(base.config.vocab_size, *gpu.SMOKE_STEP, seed=0)
    flat = gpu.flattened_batch(examples, flash_kwargs=False)
    with torch.no_grad():
        padded = base(**gpu.padded_batch(examples), use_cache=False).loss.item()
        packed = base(**flat, use_cache=False).loss.item()
        flat["position_ids"] = torch.arange(flat["input_ids"].shape[1])[None]
        leaked = base(**flat, use_cache=False).loss.item()
    assert packed == pytest.approx(padded, rel=LOSS_RTOL)
    assert abs(leaked - padded) > 20 * LOSS_RTOL * padded


# --------------------------------------------------------------------------------------------
# Budget, OOM, errors, options


def test_provider_without_time_left_is_skipped_with_its_reason() -> None:
    base = _tiny_eager()
    examples = gpu.make_examples(base.config.vocab_size, 64, (16, 32), seed=0)
    now = time.perf_counter()
    row = gpu.measure(
        "peft_all",
        lambda: gpu.build("peft_all", base, examples, "fp32"),
        torch.device("cpu"),
        warmup=1,
        steps=3,
        slot_end=now,
        budget=gpu.Budget(now),
        profile=False,
    )
    assert row["skipped"].startswith("time budget: a warm step takes")
    assert "steps" not in row and row["loss0"] > 0 and not row["oom"]


def test_model_over_the_budget_is_skipped_before_it_is_built() -> None:
    opts = gpu.Options(smoke=True, providers=("peft_all",), budget_s=1e-3, ops=False)
    results = gpu.run(opts, log=lambda _: None)
    (model,) = results["models"]
    assert model["skipped"].startswith("time budget") and "build_s" not in model
    (row,) = results["rows"]
    assert row["skipped"] == model["skipped"] and row["tokens_per_s"] is None


@pytest.mark.parametrize(
    ("err", "key"),
    [(torch.cuda.OutOfMemoryError("CUDA out of memory."), "oom"), (ValueError("bad"), "error")],
)
def test_failed_provider_is_recorded_and_the_run_goes_on(err: Exception, key: str) -> None:
    def make() -> gpu.Built:
        raise err

    row = gpu.measure("peft_all", make, torch.device("cpu"), 1, 1, 0.0, gpu.Budget(0.0), False)
    assert (row["oom"] is True) == (key == "oom")
    assert ("error" in row) == (key == "error")


def test_liger_style_module_patches_are_undone() -> None:
    module = types.ModuleType("fake_modeling")

    class Norm:
        def forward(self) -> str:
            return "norm"

    def rope() -> str:
        return "rope"

    module.Norm, module.rope = Norm, rope
    original_forward = Norm.forward
    with gpu._restorable(module) as restore:
        module.rope = lambda: "liger rope"
        module.Extra = object()
        Norm.forward = lambda self: "liger norm"
        Norm.added = 1
    restore()
    assert module.rope is rope and not hasattr(module, "Extra")
    assert Norm.forward is original_forward and not hasattr(Norm, "added")


def test_bad_provider_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu.main(["--smoke", "--providers", "peft_all,nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope" in err


def test_without_a_gpu_the_full_run_is_a_user_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(gpu.UserError, match="no CUDA device"):
        gpu.run(gpu.Options(ops=False), log=lambda _: None)


def test_fastmid_bench_hands_gpu_to_bench_gpu(monkeypatch, tmp_path: Path) -> None:
    from fastmid import benchcmd
    from fastmid.errors import UserError

    seen = []
    monkeypatch.setattr(gpu, "command", lambda opts: seen.append(opts) or 0)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def bench(*flags: str) -> int:
        import argparse

        parser = argparse.ArgumentParser()
        benchcmd.add_arguments(parser)
        return benchcmd.run(parser.parse_args(list(flags)))

    assert bench("--workloads", "gpu", "--quick", "--out", str(tmp_path), "--steps", "3") == 0
    (opts,) = seen
    assert opts.smoke and opts.out == tmp_path and opts.steps == 3
    with pytest.raises(UserError, match="runs alone"):
        bench("--workloads", "gpu,throughput")
    with pytest.raises(UserError, match="--dtypes does not apply"):
        bench("--workloads", "gpu", "--dtypes", "fp32")


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("Tesla T4", None),
    ],
)
def test_nominal_peak_by_card(name: str, tflops: float | None) -> None:
    from bench.machine import bf16_peak_tflops

    assert bf16_peak_tflops(name) == tflops


def test_busy_time_counts_overlapping_kernels_once() -> None:
    assert gpu.covered([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17
    assert gpu.covered([]) == 0


def test_device_slug() -> None:
    assert gpu.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
