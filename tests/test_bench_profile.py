"""The step profile: categories add up to the step and GEMM time lands in GEMM buckets."""

from __future__ import annotations

import pytest

from bench.profile import CATEGORIES, engine_batch, engine_provider, profile_step
from bench.providers import build_provider, load_base, make_workload
from fastmid.engine.loss import IGNORE_INDEX

GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")


@pytest.fixture(scope="module")
def setup():
    base, tokenizer, _ = load_base(quick=True)
    workload = make_workload(tokenizer, num_steps=1, batch_tokens=256)
    return base, workload


@pytest.fixture(autouse=True)
def torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # Profile the kernels' CPU execution path, not the Triton interpreter.
    import fastmid.kernels._common as kernel_dispatch

    monkeypatch.setattr(kernel_dispatch, "INTERPRET", False)


@pytest.mark.parametrize(("name", "case"), [("fastmid", "trainer"), ("peft_mid", "engine")])
def test_categories_add_up_to_the_step_and_gemms_land_in_gemm_buckets(setup, name, case):
    base, workload = setup
    p = build_provider(name, base, "fp32")
    if case == "engine":
        p = engine_provider(p)
        batch = engine_batch(workload, rows=2, seq=64)
        assert (batch["labels"][:, :32] == IGNORE_INDEX).all()
        assert (batch["labels"][:, 32:] == batch["input_ids"][:, 32:]).all()
    else:
        batch = p.batch(workload.step_examples(0), workload.pad_id)
    p.train_step(batch)  # warm-up: first-call allocations are not a step's cost
    res = profile_step(p, batch)
    seconds = res["seconds"]
    assert set(seconds) == set(CATEGORIES)
    total = sum(seconds.values())
    # Self times partition the step: nothing counted twice, nothing missing.
    assert total == pytest.approx(res["wall_s"], rel=0.05)
    for cat, ops in res["ops"].items():
        gemm = sum(s for op, s in ops.items() if op in GEMM_OPS)
        if cat in ("frozen_gemm", "adapter_gemm", "head_loss"):
            continue
        assert gemm == 0.0, f"{gemm:.4f} s of GEMMs attributed to {cat}"
    # Every kind of work this step does shows up where it belongs.
    for cat in ("frozen_gemm", "adapter_gemm", "attention", "head_loss", "optimizer"):
        assert seconds[cat] > 0.0, cat
    assert set(res["ops"]["frozen_gemm"]) <= set(GEMM_OPS)
    assert set(res["ops"]["adapter_gemm"]) <= set(GEMM_OPS)
    # Dropout 0.05 draws keep-masks: both set-ups pay RNG.
    assert seconds["rng"] > 0.0
    assert any("mm" in op for op in res["ops"]["head_loss"])
