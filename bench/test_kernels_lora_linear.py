"""CUDA microbenchmark of `lora_linear` against the unfused PEFT-style composition.

    pytest bench/test_kernels_lora_linear.py --benchmark-only

Each case times forward + backward of one adapted projection (x needs a grad, as in every
adapted layer above the lowest) in bf16 autocast with fp32 adapters, M = 4096 tokens, with
`triton.testing.do_bench` for both providers back to back; the median milliseconds of each and
the speedup land in the benchmark's extra_info, and pytest-benchmark times the fused op.
`peft` is x·Wᵀ + s·B(A(dropout(x))) with stock kernels; `fastmid` is one `lora_linear` call.
Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fastmid.kernels import lora_linear

from fastmid.engine.midblock import PAPER_ALPHA

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TOKENS = 4096
ALPHA = PAPER_ALPHA


def _projections() -> dict[str, tuple[int, int]]:
    """(K, N) of the attention projections of real model configs: q/o are square, k/v map
    the hidden size onto the key-value heads."""
    from transformers import LlamaConfig

    configs = {
        "SmolLM2-135M": LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3),
        "Llama-3-8B": LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8),
    }
    out = {}
    for name, cfg in configs.items():
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        out[f"{name}/q"] = (cfg.hidden_size, cfg.num_attention_heads * head_dim)
        out[f"{name}/kv"] = (cfg.hidden_size, cfg.num_key_value_heads * head_dim)
    return out


SHAPES = _projections()


@pytest.mark.parametrize("p", [0.0, 0.05])
@pytest.mark.parametrize("r", [16, 64])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_lora_linear(benchmark, shape: str, r: int, p: float) -> None:
    from triton.testing import do_bench

    k, n = SHAPES[shape]
    x = torch.randn(TOKENS, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    a = (torch.randn(r, k, device="cuda") / k**0.5).requires_grad_()
    b = (torch.randn(n, r, device="cuda") / r**0.5).requires_grad_()
    grad = torch.randn(TOKENS, n, device="cuda", dtype=torch.bfloat16)
    scale = ALPHA / r

    def peft() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = F.linear(x, w) + scale * F.linear(F.linear(F.dropout(x, p), a), b)
        y.backward(grad)

    def fastmid() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = lora_linear(x, w, a, b, scale, dropout_p=p)
        y.backward(grad)

    providers = {"peft": peft, "fastmid": fastmid}
    ms = {name: do_bench(fn, grad_to_none=[x, a, b]) for name, fn in providers.items()}
    benchmark.extra_info.update(
        shape=shape, k=k, n=n, r=r, dropout=p, tokens=TOKENS, dtype="bf16",
        device=torch.cuda.get_device_name(), peft_ms=ms["peft"], fastmid_ms=ms["fastmid"],
        speedup=ms["peft"] / ms["fastmid"],
    )  # fmt: skip

    def run() -> None:
        fastmid()
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=20, warmup_rounds=3)
