"""Liger's kernels on the frozen blocks of a patched model (CUDA with liger_kernel only)."""

from __future__ import annotations

import copy

import pytest
import torch

from fastmid.midblock import KNOWN_TARGETS, MidBlockConfig, apply_midblock
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
