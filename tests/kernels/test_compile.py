"""The ops under torch.compile: a patched decoder block (q/k/v, o, gate/up, down adapted, LoRA
dropout on) traces forward and backward with no graph break, and the compiled step computes
what eager does."""

from __future__ import annotations

import pytest
import torch

from fastmid.engine.midblock import MidBlockConfig, apply_midblock
from tests.fastmid._tiny import randomize_adapters, tiny_model

from ._tolerance import force_torch_path

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture
def block_step(monkeypatch: pytest.MonkeyPatch):
    """(step, inputs): one adapted Llama block's forward, with the adapters it trains."""
    # Interpreted Triton kernels cannot be traced; on a CPU the ops run their torch path.
    if not torch.cuda.is_available():
        force_torch_path(monkeypatch)
    torch.manual_seed(0)
    model = tiny_model("llama", num_layers=5)
    cfg = MidBlockConfig(band=[1, 2, 3], rank=4, targets=TARGETS, dropout=0.1)
    apply_midblock(model, cfg)
    randomize_adapters(model)
    model.train()
    block = model.model.layers[2]
    hidden = torch.randn(2, 7, 64)
    positions = torch.arange(7).unsqueeze(0).expand(2, -1)
    cos_sin = model.model.rotary_emb(hidden, positions)

    def step(h: torch.Tensor) -> torch.Tensor:
        out = block(h, position_embeddings=cos_sin, attention_mask=None)
        return out[0] if isinstance(out, tuple) else out

    params = [p for p in block.parameters() if p.requires_grad]
    assert len(params) == 2 * len(TARGETS)
    return step, hidden, params


def test_patched_block_traces_without_graph_breaks(block_step):
    step, hidden, _ = block_step
    explained = torch._dynamo.explain(step)(hidden.requires_grad_())
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    targets = [str(n.target) for g in explained.graphs for n in g.graph.nodes]
    for op in ("fastmid.lora_qkv", "fastmid.lora_linear", "fastmid.lora_gate_up"):
        assert any(op in t for t in targets), f"{op} not in the traced graph"
    torch._dynamo.reset()


def test_compiled_forward_and_backward_equal_eager(block_step):
    step, hidden, params = block_step

    def loss_and_grads(fn):
        torch.manual_seed(5)  # the same dropout seeds drawn in both runs
        h = hidden.clone().requires_grad_()
        loss = fn(h).square().mean()
        grads = torch.autograd.grad(loss, [h, *params])
        return loss.detach(), grads

    # fullgraph: any graph break is an error. aot_eager: AOTAutograd traces forward and
    # backward through the ops' fake and autograd registrations, without a C++ compiler.
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    want_loss, want_grads = loss_and_grads(step)
    got_loss, got_grads = loss_and_grads(compiled)
    torch._dynamo.reset()
    torch.testing.assert_close(got_loss, want_loss, rtol=0, atol=0)
    for got, want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    # Dropout was live: another seed stream gives another loss.
    torch.manual_seed(6)
    assert not torch.equal(step(hidden).square().mean(), want_loss)
