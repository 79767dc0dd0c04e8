"""Liger's kernels on the frozen blocks of a patched model: the patching logic everywhere
(stand-in Functions on CPU), the real kernels on CUDA with liger_kernel."""

from __future__ import annotations

import copy
from typing import ClassVar

import pytest
import torch

from fastmid.engine import liger
from fastmid.engine.midblock import KNOWN_TARGETS, MidBlockConfig, apply_midblock
from tests.fastmid._tiny import tiny_model


@pytest.mark.gpu
def test_liger_kernels_run_the_frozen_blocks_with_the_same_outputs():
    pytest.importorskip("liger_kernel")
    model = tiny_model("llama").cuda()
    ref = copy.deepcopy(model)
    apply_midblock(model, MidBlockConfig(rank=4, targets=KNOWN_TARGETS, dropout=0.0))
    for i, block in enumerate(model.model.layers):
        swapped = [n for n, m in block.named_modules() if n and "forward" in m.__dict__]
        # Frozen blocks: two RMSNorms and the MLP; adapted blocks: only the fused gate/up MLP.
        expected = ["input_layernorm", "mlp", "post_attention_layernorm"]
        assert sorted(swapped) == (["mlp"] if 2 <= i < 8 else expected), i
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


class _StandInRMSNorm(torch.autograd.Function):
    """Liger's RMSNorm Function's signature, plain torch inside (its "llama" casting mode)."""

    calls: ClassVar[list[float]] = []

    @staticmethod
    def forward(ctx, x, weight, eps, offset, casting_mode):
        assert offset == 0.0 and casting_mode == "llama"
        _StandInRMSNorm.calls.append(eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(x.dtype)


class _StandInSiLUMul(torch.autograd.Function):
    calls: ClassVar[list[int]] = []

    @staticmethod
    def forward(ctx, a, b):
        _StandInSiLUMul.calls.append(1)
        return torch.nn.functional.silu(a) * b


def test_liger_patching_logic_with_stand_in_ops(monkeypatch):
    """Which modules of which blocks get Liger's ops, and that they get the right arguments
    (the norm's own eps and weight), checked on CPU with stand-ins of the two Functions."""
    monkeypatch.setattr(liger, "_liger_ops", lambda device: (_StandInRMSNorm, _StandInSiLUMul))
    monkeypatch.setattr(_StandInRMSNorm, "calls", [])
    monkeypatch.setattr(_StandInSiLUMul, "calls", [])
    # A large eps, so a norm run with any other eps gives other logits.
    model = tiny_model("llama", rms_norm_eps=0.5)
    ref = copy.deepcopy(model)
    apply_midblock(model, MidBlockConfig(rank=4, targets=KNOWN_TARGETS, dropout=0.0))
    # Patching itself runs a small probe forward (the label-only loss check): count from here.
    _StandInRMSNorm.calls.clear()
    _StandInSiLUMul.calls.clear()
    layers = model.fastmid_state.layers
    assert layers == list(range(2, 8))
    for i, block in enumerate(model.model.layers):
        swapped = sorted(n for n, m in block.named_modules() if n and "forward" in m.__dict__)
        # Frozen blocks: two RMSNorms and the MLP; adapted blocks: only the fused gate/up MLP.
        expected = ["input_layernorm", "mlp", "post_attention_layernorm"]
        assert swapped == (["mlp"] if i in layers else expected), i
    assert "forward" not in vars(model.model.norm)  # the final norm is not in a block
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    frozen = 10 - len(layers)
    assert _StandInRMSNorm.calls == [0.5] * (2 * frozen)
    assert len(_StandInSiLUMul.calls) == frozen
    # Gemma's (1 + w) norms are not Liger's "llama" norms: left alone.
    gemma = tiny_model("gemma2")
    apply_midblock(gemma, MidBlockConfig(rank=4, dropout=0.0))
    norms = [m for m in gemma.modules() if type(m).__name__ == "Gemma2RMSNorm"]
    assert norms and not any("forward" in vars(m) for m in norms)
