"""The FakeTensor step estimate and the micro-batch ``--batch-tokens auto`` picks from it."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from fastmid.engine.midblock import MidBlockConfig
from fastmid.errors import UserError
from fastmid.recipe import estimate
from fastmid.recipe.config import AUTO_BATCH, add_arguments, build_config, load_yaml, save_yaml
from fastmid.recipe.estimate import (
    Estimate,
    FastmidStepTracer,
    choose_batch_tokens,
    fit_batch_tokens,
)
from tests.fastmid._tiny import tiny_config

GIB = 2**30


def test_fit_batch_tokens_hand_computed() -> None:
    # 10 GiB free, 15% headroom: 8.5 GiB usable, 1 GiB of it fixed, 100 KiB per token.
    fits = int(7.5 * GIB // (100 * 1024))
    assert fits == 78643
    small = fit_batch_tokens(10 * GIB, GIB, 100 * 1024, step_tokens=3072, max_length=256)
    assert (small.batch_tokens, small.grad_accum, small.fits_tokens) == (3072, 1, fits)
    # A step of 100k tokens does not fit once: two micro-batches of 50k.
    big = fit_batch_tokens(10 * GIB, GIB, 100 * 1024, step_tokens=100_000, max_length=256)
    assert (big.batch_tokens, big.grad_accum) == (50_000, 2)
    # A step smaller than one example: the micro-batch still holds one example.
    long = fit_batch_tokens(10 * GIB, GIB, 100 * 1024, step_tokens=1024, max_length=2048)
    assert (long.batch_tokens, long.grad_accum) == (2048, 1)
    assert small.resolved() == {
        "batch_tokens": 3072,
        "grad_accum": 1,
        "batch_fits_tokens": fits,
        "batch_free_gib": 10.0,
    }


def test_fit_batch_tokens_is_monotone_keeps_headroom_and_the_step() -> None:
    fixed, per_token, step, max_length = 2 * GIB, 300_000.0, 1024 * 48, 512
    previous = None
    for free in [int(g * GIB) for g in (3, 4, 5.5, 8, 11, 16, 23, 40, 80, 140)]:
        c = fit_batch_tokens(free, fixed, per_token, step, max_length)
        # Respects the headroom: the micro-batch's estimate fits in 85% of the free memory.
        assert fixed + per_token * c.batch_tokens <= 0.85 * free
        # Keeps the global batch: the step's tokens in grad_accum micro-batches, within one
        # token per micro-batch of rounding.
        assert step <= c.batch_tokens * c.grad_accum < step + c.grad_accum
        assert c.batch_tokens >= max_length
        if previous is not None:
            assert c.batch_tokens >= previous.batch_tokens
            assert c.grad_accum <= previous.grad_accum
        previous = c
    assert previous.grad_accum == 1  # a large device does the step in one micro-batch
    # A larger headroom never picks a larger micro-batch.
    wide = fit_batch_tokens(8 * GIB, fixed, per_token, step, max_length, headroom=0.4)
    assert wide.batch_tokens < fit_batch_tokens(8 * GIB, fixed, per_token, step, 512).batch_tokens


def test_fit_batch_tokens_without_room_for_one_example_is_a_user_error() -> None:
    with pytest.raises(UserError, match="one example of max_length 4096 tokens needs about"):
        fit_batch_tokens(3 * GIB, 2 * GIB, 300_000.0, 8192, max_length=4096)


def test_choose_batch_tokens_fits_a_line_through_two_traces() -> None:
    # A step that costs 1.5 GiB + 200 KB per token (optimizer state included).
    seen: list[int] = []

    def tracer(tokens: int, seq_len: int) -> Estimate:
        seen.append(tokens)
        assert seq_len == 256
        return Estimate(GIB, 10, GIB // 2, GIB + 200_000 * tokens, 0.0)

    free = 20 * GIB
    got = choose_batch_tokens(None, None, free, 1024 * 64, 256, tracer=tracer)
    want = fit_batch_tokens(free, int(1.5 * GIB), 200_000.0, 1024 * 64, 256)
    assert (got.batch_tokens, got.grad_accum) == (want.batch_tokens, want.grad_accum)
    assert got.fixed_bytes == int(1.5 * GIB) and got.bytes_per_token == pytest.approx(200_000.0)
    # Past the probes the straight line is checked by a trace at the chosen size.
    assert seen == [4096, 8192, got.batch_tokens] and got.batch_tokens > 8192


def test_choose_batch_tokens_refits_when_the_line_underestimates() -> None:
    # Memory that grows faster than linearly: the check at the chosen size lowers the choice.
    def tracer(tokens: int, seq_len: int) -> Estimate:
        return Estimate(0, 0, 0, GIB + 100_000 * tokens + tokens**2 // 2, 0.0)

    free = 40 * GIB
    got = choose_batch_tokens(None, None, free, 1024 * 512, 512, tracer=tracer)
    assert GIB + 100_000 * got.batch_tokens + got.batch_tokens**2 // 2 <= 0.85 * free


def test_fastmid_step_trace_of_a_tiny_model_grows_with_the_micro_batch() -> None:
    config = tiny_config("llama", num_layers=5)
    trace = FastmidStepTracer(config, MidBlockConfig(rank=4))
    small, large = trace(256, 64), trace(1024, 64)
    assert small.weights == large.weights > 0
    # AdamW's two fp32 moments of every adapter parameter.
    assert small.optimizer == 2 * 4 * small.trainable_params > 0
    assert large.peak_step > small.peak_step > 0


def test_batch_tokens_flag_yaml_and_default(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--batch-tokens", "auto"]).batch_tokens == "auto"
    assert build_config(None, {"batch_tokens": "auto"}).batch_tokens == AUTO_BATCH
    assert build_config(None, {"batch_tokens": "AUTO"}).batch_tokens == AUTO_BATCH
    assert build_config(None, {"batch_tokens": "2048"}).batch_tokens == 2048
    assert build_config(None).batch_tokens == AUTO_BATCH  # the default
    with pytest.raises(UserError, match="batch_tokens must be int or auto, got 'lots'"):
        build_config(None, {"batch_tokens": "lots"})
    with pytest.raises(UserError, match="must be at least max_length"):
        build_config(None, {"batch_tokens": 128, "max_length": 256})
    cfg = build_config(None, {"batch_tokens": "auto", "grad_accum": 16})
    resolved = {"batch_tokens": 16384, "grad_accum": 1}
    save_yaml({**cfg.to_dict(), "resolved": resolved}, tmp_path / "config.yaml")
    assert load_yaml(tmp_path / "config.yaml")["batch_tokens"] == "auto"
    again = build_config(tmp_path / "config.yaml")
    assert (again.batch_tokens, again.grad_accum) == (AUTO_BATCH, 16)


def test_trace_keeps_no_gradients_between_sizes() -> None:
    trace = FastmidStepTracer(tiny_config("qwen2", num_layers=3), MidBlockConfig(rank=2))
    first = trace(128, 32)
    assert all(p.grad is None for p in trace.model.parameters())
    assert trace(128, 32).peak_step == first.peak_step


def test_packed_step_batch_is_the_collators() -> None:
    batch = estimate.packed_step_batch(10, 4, loss_fraction=0.5)
    assert batch["cu_seqlens"].tolist() == [0, 4, 8, 10]
    assert batch["input_ids"].shape == (1, 10)
    assert batch["label_index"].tolist() == [2, 3, 6, 7, 9]
    assert isinstance(batch["cu_seqlens"], torch.Tensor)
