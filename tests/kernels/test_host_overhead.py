"""Host overhead of the fused ops, checked without a GPU: the aten ops one forward + backward
issues (pinned, so a regression fails here), the adapters' compute-dtype copies made once per
optimizer step and never stale, and one dropout seed per micro-batch for a patched model."""

from __future__ import annotations

import collections
import math

import fastmid.kernels._common as kernel_dispatch
import pytest
import torch
from fastmid.kernels import _lora, lora_gate_up, lora_linear, lora_linear_reference, lora_qkv
from torch.utils._python_dispatch import TorchDispatchMode

from fastmid import MidBlockConfig, apply_midblock, lora_modules
from tests.fastmid._tiny import tiny_model


class _CountOps(TorchDispatchMode):
    """Counts every aten op that reaches a backend (below autograd)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU execution path (no interpreter), whatever TRITON_INTERPRET says."""
    monkeypatch.setattr(kernel_dispatch, "INTERPRET", False)


M, K, N, R = 64, 48, 40, 8


def _call(op: str, p: float, bf16: bool):
    """(step, leaves): one forward + backward of `op` as a patched model makes it: bf16
    activations and frozen weight under bf16 autocast with fp32 adapters (or all fp32), a
    seed tensor given, x needing a grad."""
    torch.manual_seed(0)
    act = torch.bfloat16 if bf16 else torch.float32
    x = torch.randn(M, K, dtype=act, requires_grad=True)
    seed = torch.tensor(5)
    members = {"linear": 1, "qkv": 3, "gate_up": 2}[op]
    w = torch.randn(members * N, K, dtype=act) / math.sqrt(K)
    a = [torch.nn.Parameter(torch.randn(R, K) / math.sqrt(K)) for _ in range(members)]
    b = [torch.nn.Parameter(torch.randn(N, R)) for _ in range(members)]
    grads = {"linear": N, "qkv": 3 * N, "gate_up": N}
    upstream = torch.randn(M, grads[op], dtype=act)

    def forward():
        if op == "linear":
            return lora_linear(x, w, a[0], b[0], 2.0, None, p, seed, 3)
        if op == "qkv":
            return torch.cat(lora_qkv(x, w, *a, *b, 2.0, None, p, seed, 3), dim=1)
        return lora_gate_up(x, w, *a, *b, 2.0, p, seed, 3)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = forward()
        y.backward(upstream)

    return step, (x, *a, *b)


# aten ops per forward + backward on the torch path (the CPU execution path; CUDA runs the same
# composition, with three of the masked products as Triton launches). Before the cuBLAS rework
# the same calls cost linear 35/44/81/90, qkv 90/105/136/151, gate_up 78/89/124/135 ops (fp32
# and bf16 autocast with fp32 activations, p = 0 and 0.05, plus a sum and its backward).
PINNED = {
    ("linear", 0.0, False): 22,
    ("linear", 0.0, True): 20,
    ("linear", 0.05, False): 69,
    ("linear", 0.05, True): 67,
    ("qkv", 0.0, False): 67,
    ("qkv", 0.0, True): 59,
    ("qkv", 0.05, False): 114,
    ("qkv", 0.05, True): 106,
    ("gate_up", 0.0, False): 57,
    ("gate_up", 0.0, True): 51,
    ("gate_up", 0.05, False): 104,
    ("gate_up", 0.05, True): 98,
}


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("p", [0.0, 0.05])
@pytest.mark.parametrize("op", ["linear", "qkv", "gate_up"])
def test_aten_ops_per_call_are_pinned(torch_path, op, p, bf16):
    step, leaves = _call(op, p, bf16)
    step()  # the first call builds the adapters' compute-dtype copies
    counter = _CountOps()
    with counter:
        step()
    total = sum(counter.ops.values())
    # No RNG draw per call (the seed is given), and no cast of an adapter per call.
    assert not {"random_", "randint", "bernoulli_"} & set(counter.ops), counter.ops
    assert total == PINNED[op, p, bf16], (total, dict(counter.ops))
    assert all(t.grad is not None for t in leaves)


def _cached(t: torch.Tensor) -> object:
    return t.__dict__[_lora._CACHE_ATTR][1]


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.AdamW(ps, lr=0.1, foreach=True),
        lambda ps: torch.optim.AdamW(ps, lr=0.1, foreach=False),
        lambda ps: torch.optim.AdamW(ps, lr=0.1, fused=True),
        lambda ps: torch.optim.SGD(ps, lr=1.0),
    ],
    ids=["adamw_foreach", "adamw_loop", "adamw_fused", "sgd"],
)
def test_adapter_copies_made_once_per_step_and_never_stale(torch_path, make_opt):
    """Under bf16 autocast the fp32 adapters' bf16 copies are reused by every call between two
    optimizer steps (grad accumulation) and rebuilt after the step's in-place update: each
    output equals the one computed from the current adapters."""
    torch.manual_seed(0)
    x = torch.randn(16, 24, dtype=torch.bfloat16)
    w = torch.randn(20, 24, dtype=torch.bfloat16) / 5
    a = torch.nn.Parameter(torch.randn(4, 24) / 5)
    b = torch.nn.Parameter(torch.randn(20, 4))
    opt = make_opt([a, b])

    def call():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return lora_linear(x, w, a, b, 2.0)

    def fresh():
        # The same math from freshly cast adapters (plain tensors: nothing cached on them).
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return lora_linear_reference(x, w, a.detach().clone(), b.detach().clone(), 2.0)

    for _ in range(3):
        y = call()
        copies = _cached(a)
        y2 = call()  # a second micro-batch of the same step
        assert _cached(a) is copies
        torch.testing.assert_close(y, fresh(), rtol=0.02, atol=0.02)
        (y.float().mean() + y2.float().mean()).backward()
        opt.step()
        opt.zero_grad()
        y3 = call()
        assert _cached(a) is not copies
        torch.testing.assert_close(y3, fresh(), rtol=0.02, atol=0.02)
        assert not torch.equal(y3, y)
    # A load (copy_ under no_grad) is an in-place update too.
    with torch.no_grad():
        a.copy_(torch.zeros_like(a))
    torch.testing.assert_close(call(), torch.nn.functional.linear(x, w), rtol=0, atol=0)


def test_calls_without_grad_keep_no_copy(torch_path):
    a = torch.nn.Parameter(torch.randn(4, 24))
    b = torch.nn.Parameter(torch.randn(20, 4))
    x, w = torch.randn(8, 24, dtype=torch.bfloat16), torch.randn(20, 24, dtype=torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        lora_linear(x, w, a, b, 1.0)
    assert _lora._CACHE_ATTR not in a.__dict__


def test_patched_model_draws_one_seed_per_forward(torch_path, monkeypatch):
    """One RNG draw per training forward of the whole model, whatever the number of adapters;
    each adapter adds its own offset; none in eval."""
    torch.manual_seed(0)
    model = tiny_model("llama", num_layers=5)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")
    apply_midblock(model, MidBlockConfig(band=[1, 2, 3], rank=4, targets=targets, dropout=0.1))
    loras = [m for _, _, m in lora_modules(model)]
    assert len({m.seed_offset for m in loras}) == len(loras) == 18
    draws = []
    real = torch.randint

    def randint(*args, **kwargs):
        draws.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "randint", randint)
    ids = torch.randint(0, 100, (2, 9))
    draws.clear()
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(draws) == 1
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert len(draws) == 1
