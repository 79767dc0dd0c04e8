"""Equal-step control: after every step each adapted layer has the same ||ΔW_eff|| / ||W_eff||."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastmid.engine.equalize import UpdateEqualizer, smallest_positive_root
from tests.fastmid._tiny import tiny_model


class _Lora(nn.Module):
    """The attributes UpdateEqualizer reads: frozen weight, lora_A (r,K), lora_B (N,r), scale."""

    def __init__(self, n: int, k: int, r: int, scale: float, weight_scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, k) * weight_scale, requires_grad=False)
        self.lora_A = nn.Parameter(torch.randn(r, k) * 0.3)
        self.lora_B = nn.Parameter(torch.randn(n, r) * 0.3)
        self.scale = scale


def _effective(m: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return m.weight.double() + m.scale * (m.lora_B.double() @ m.lora_A.double())


def _layer_ratios(groups: dict[int, list[nn.Module]], before: dict[int, list[torch.Tensor]]):
    """ratio_l from the stored parameters, computed the slow way with full (N, K) matrices."""
    out = {}
    for layer, mods in groups.items():
        num = sum(
            float((_effective(m) - w0).square().sum())
            for m, w0 in zip(mods, before[layer], strict=True)
        )
        den = sum(float(w0.square().sum()) for w0 in before[layer])
        out[layer] = math.sqrt(num / den)
    return out


def _fake_model(num_layers: int = 4) -> tuple[nn.Module, list[tuple[int, str, nn.Module]]]:
    model = nn.Module()
    modules = []
    for layer in range(num_layers):
        # Layers deliberately differ in weight norm and scale so their natural ratios differ.
        for name, (n, k) in {"q_proj": (12, 10), "o_proj": (10, 12)}.items():
            m = _Lora(n, k, r=3, scale=0.5 + layer, weight_scale=0.1 * 3**layer)
            model.add_module(f"l{layer}_{name}", m)
            modules.append((layer, name, m))
    return model, modules


def test_root_is_exact_and_reduces_to_linear_when_q_vanishes() -> None:
    # a c² = t  ->  c = sqrt(t / a)
    assert smallest_positive_root(4.0, 0.0, 0.0, 9.0) == pytest.approx(1.5, rel=1e-12)
    a, b, q, t = 2.0, -0.3, 0.05, 0.7
    c = smallest_positive_root(a, b, q, t)
    assert a * c**2 + 2 * b * c**3 + q * c**4 == pytest.approx(t, rel=1e-12)
    assert c > 0
    assert math.isnan(smallest_positive_root(0.0, 0.0, 0.0, 1.0))


@pytest.mark.parametrize("lr", [1e-2, 1e-1])
def test_invariant_holds_after_each_adam_step(lr: float) -> None:
    model, modules = _fake_model()
    groups: dict[int, list[nn.Module]] = {}
    for layer, _, m in modules:
        groups.setdefault(layer, []).append(m)
    params = [p for _, _, m in modules for p in (m.lora_A, m.lora_B)]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    eq = UpdateEqualizer(model, modules)
    inputs = {k: torch.randn(16, k) for k in (10, 12)}
    for step in range(3):
        before = {layer: [_effective(m).clone() for m in mods] for layer, mods in groups.items()}
        loss = sum(
            (inputs[m.weight.shape[1]] @ (m.weight + m.scale * m.lora_B @ m.lora_A).T)
            .square()
            .mean()
            for _, _, m in modules
        )
        opt.zero_grad()
        loss.backward()
        a0 = [p.detach().clone() for p in params]
        eq.before_step()
        opt.step()
        steps = [p.detach() - p0 for p, p0 in zip(params, a0, strict=True)]
        natural = _layer_ratios(groups, before)
        stats = eq.after_step()
        got = _layer_ratios(groups, before)
        # The optimizer's own steps are far from equal, so the control did real work ...
        assert max(natural.values()) / min(natural.values()) > 1.5, step
        # ... its reported ratios are the optimizer's, and the target is their mean ...
        for layer in groups:
            assert stats.ratios[layer] == pytest.approx(natural[layer], rel=1e-6)
        assert stats.target == pytest.approx(sum(natural.values()) / len(natural), rel=1e-6)
        # ... and every layer now moved by exactly the target relative change.
        for layer in groups:
            assert got[layer] == pytest.approx(stats.target, rel=1e-5), (step, layer)
        # Direction kept in parameter space: each new delta is c_l times the optimizer's delta.
        layer_of = [layer for layer, _, _ in modules for _ in ("lora_A", "lora_B")]
        for p, p0, d, layer in zip(params, a0, steps, layer_of, strict=True):
            assert torch.allclose(p.detach() - p0, stats.factors[layer] * d, rtol=1e-4, atol=1e-7)


def test_single_layer_and_no_step_are_left_alone() -> None:
    model, modules = _fake_model(num_layers=1)
    eq = UpdateEqualizer(model, modules)
    eq.before_step()
    with torch.no_grad():
        for _, _, m in modules:
            m.lora_A.add_(0.01)
    after = [m.lora_A.detach().clone() for _, _, m in modules]
    stats = eq.after_step()
    assert stats.factors == {0: pytest.approx(1.0, rel=1e-9)}
    assert all(torch.equal(a, m.lora_A) for a, (_, _, m) in zip(after, modules, strict=True))
    eq.before_step()  # a skipped step (e.g. an overflowing fp16 step) changes nothing
    stats = eq.after_step()
    assert stats.target == 0.0 and stats.factors == {0: 1.0}


def test_after_step_requires_before_step() -> None:
    model, modules = _fake_model(num_layers=2)
    with pytest.raises(RuntimeError):
        UpdateEqualizer(model, modules).after_step()


def test_on_a_patched_tiny_model() -> None:
    from fastmid.engine.midblock import MidBlockConfig, apply_midblock, lora_modules

    model = apply_midblock(tiny_model("llama", num_layers=5), MidBlockConfig(rank=4, dropout=0.0))
    model.train()
    mods = list(lora_modules(model))
    groups: dict[int, list[nn.Module]] = {}
    for layer, _, m in mods:
        groups.setdefault(layer, []).append(m)
    assert sorted(groups) == [1, 2, 3]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    eq = UpdateEqualizer(model)
    ids = torch.randint(3, 256, (1, 8))
    for _ in range(2):  # the first step starts from B = 0, the second from B != 0
        before = {layer: [_effective(m).clone() for m in ms] for layer, ms in groups.items()}
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        eq.before_step()
        opt.step()
        stats = eq.after_step()
        got = _layer_ratios(groups, before)
        assert stats.target > 0
        for layer in groups:
            assert got[layer] == pytest.approx(stats.target, rel=1e-5)
