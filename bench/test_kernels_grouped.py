"""CUDA microbenchmarks of the grouped kernels against the unfused PEFT-style composition.

    pytest bench/test_kernels_grouped.py --benchmark-only --benchmark-group-by=param:shape

Providers: `peft` is what a standard LoRA layer does per projection (frozen linear + dropout +
two thin linears, three times for q/k/v; gate, up, silu·up for the MLP), `fastmid` is one
`lora_qkv` / `lora_gate_up` call, `fastmid_recompute` gate/up's memory mode. Each measurement
is forward + backward of one layer's projections in bf16 autocast with fp32 adapters,
M = 4096 tokens. Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fastmid.kernels import lora_gate_up, lora_qkv

from fastmid.engine.midblock import PAPER_ALPHA, PAPER_DROPOUT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TOKENS = 4096
DROPOUT = PAPER_DROPOUT
ALPHA = PAPER_ALPHA


def _shapes() -> dict[str, dict[str, int]]:
    """Projection sizes from the published model configs."""
    from transformers import LlamaConfig

    configs = {
        "SmolLM2-135M": LlamaConfig(
            hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3
        ),
        "Llama-3-8B": LlamaConfig(
            hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8
        ),
    }
    out = {}
    for name, cfg in configs.items():
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        out[name] = {
            "k": cfg.hidden_size,
            "nq": cfg.num_attention_heads * head_dim,
            "nkv": cfg.num_key_value_heads * head_dim,
            "inter": cfg.intermediate_size,
        }
    return out


SHAPES = _shapes()


def _lora(x, w, a, b, scale):
    """One PEFT-style LoRA linear: base + scale·B(A(dropout(x)))."""
    return F.linear(x, w) + scale * F.linear(F.linear(F.dropout(x, DROPOUT), a), b)


def _adapters(sizes, r, k):
    a = [(torch.randn(r, k, device="cuda") / k**0.5).requires_grad_() for _ in sizes]
    b = [(torch.randn(n, r, device="cuda") / r**0.5).requires_grad_() for n in sizes]
    return a, b


def _timed(benchmark, step):
    def run():
        step()
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=20, warmup_rounds=3)


@pytest.mark.parametrize("provider", ["peft", "fastmid"])
@pytest.mark.parametrize("r", [16, 64])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_qkv(benchmark, shape, r, provider):
    s = SHAPES[shape]
    sizes = (s["nq"], s["nkv"], s["nkv"])
    x = torch.randn(TOKENS, s["k"], device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ws = [torch.randn(n, s["k"], device="cuda", dtype=torch.bfloat16) / 24 for n in sizes]
    w_qkv = torch.cat(ws)
    a, b = _adapters(sizes, r, s["k"])
    grads = [torch.randn(TOKENS, n, device="cuda", dtype=torch.bfloat16) for n in sizes]
    scale = ALPHA / r

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if provider == "fastmid":
                outs = lora_qkv(x, w_qkv, *a, *b, scale, dropout_p=DROPOUT)
            else:
                outs = [_lora(x, w, a_, b_, scale) for w, a_, b_ in zip(ws, a, b, strict=True)]
        torch.autograd.backward(outs, grads)

    benchmark.extra_info.update(shape=shape, r=r, provider=provider, dtype="bf16", tokens=TOKENS)
    _timed(benchmark, step)


@pytest.mark.parametrize("provider", ["peft", "fastmid", "fastmid_recompute"])
@pytest.mark.parametrize("r", [16, 64])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gate_up(benchmark, shape, r, provider):
    s = SHAPES[shape]
    sizes = (s["inter"], s["inter"])
    x = torch.randn(TOKENS, s["k"], device="cuda", dtype=torch.bfloat16, requires_grad=True)
    wg, wu = (torch.randn(n, s["k"], device="cuda", dtype=torch.bfloat16) / 24 for n in sizes)
    w_gu = torch.cat([wg, wu])
    a, b = _adapters(sizes, r, s["k"])
    grad = torch.randn(TOKENS, s["inter"], device="cuda", dtype=torch.bfloat16)
    scale = ALPHA / r

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if provider != "peft":  # fastmid_recompute: gate/up's memory mode
                recompute = provider == "fastmid_recompute"
                h = lora_gate_up(x, w_gu, *a, *b, scale, DROPOUT, recompute=recompute)
            else:
                h = F.silu(_lora(x, wg, a[0], b[0], scale)) * _lora(x, wu, a[1], b[1], scale)
        h.backward(grad)

    benchmark.extra_info.update(shape=shape, r=r, provider=provider, dtype="bf16", tokens=TOKENS)
    _timed(benchmark, step)
