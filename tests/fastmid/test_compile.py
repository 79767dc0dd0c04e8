"""Compiled decoder blocks: same loss and gradients as eager, and packed batches of new
lengths reuse the compiled graphs instead of recompiling."""

from __future__ import annotations

import fastmid.kernels._common as kernel_dispatch
import pytest
import torch

from fastmid.engine.attention import enable_varlen_attention
from fastmid.engine.compile import resolve_compile
from fastmid.engine.loss import forward_loss
from fastmid.engine.midblock import MidBlockConfig, adapter_parameters, apply_midblock
from fastmid.errors import UserError
from tests.fastmid._tiny import randomize_adapters, tiny_model


def test_resolve_compile():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_compile("on", cuda, 0.05) and not resolve_compile("off", cpu, 0.0)
    assert resolve_compile("auto", cpu, 0.0)
    assert not resolve_compile("auto", cpu, 0.05)
    assert not resolve_compile("auto", cuda, 0.0)
    with pytest.raises(ValueError, match="compile must be one of"):
        resolve_compile("yes", cpu, 0.0)
    with pytest.raises(UserError, match="compile must be one of"):
        apply_midblock(tiny_model("llama", 4), MidBlockConfig(rank=4, compile="yes"))


def _packed(lengths: list[int], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (1, sum(lengths)), generator=gen)
    targets = torch.randint(3, 256, (1, sum(lengths)), generator=gen)
    targets[0, :3] = -100
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return {"input_ids": ids, "position_ids": positions, "targets": targets}


def _model(compile_mode: str) -> torch.nn.Module:
    model = tiny_model("llama", 4).train()
    model.config._attn_implementation = "sdpa"
    apply_midblock(model, MidBlockConfig(band=[1, 2], rank=4, dropout=0.0, compile=compile_mode))
    randomize_adapters(model)
    enable_varlen_attention(model)
    return model


def _loss_and_grads(model, batch):
    loss, n = forward_loss(model, batch)
    return (loss / n, *torch.autograd.grad(loss / n, adapter_parameters(model)))


def test_compiled_blocks_match_eager_and_do_not_recompile_per_length(monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setattr(kernel_dispatch, "INTERPRET", False)
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = _model("off"), _model("on")
    shapes = [[9, 14], [5, 7, 11], [20, 6], [4, 4, 4, 4], [31, 3]]
    graphs = []
    for seed, lengths in enumerate(shapes):
        batch = _packed(lengths, seed)
        want = _loss_and_grads(eager, batch)
        got = _loss_and_grads(compiled, batch)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0  # the blocks really were compiled
    # Every later length reuses the graphs of the first step (dynamic shapes): no recompiles.
    assert graphs[1:] == [graphs[0]] * (len(shapes) - 1), graphs
