"""Equal-step control: the same relative change of every adapted layer's weight at each step.

Definition (what :class:`UpdateEqualizer` makes true after every optimizer step):

- A layer ``l`` is one decoder block with adapters; its adapted projections ``j`` (q/k/v/o, and
  gate/up/down when targeted) have effective weights ``W_eff_j = W_j + s_j B_j A_j`` (the frozen
  weight plus the scaled LoRA product; the bias is not part of it).
- The layer's relative step is measured over the *stacked* group of its projections::

      ratio_l = sqrt(Σ_j ||ΔW_eff_j||_F²) / sqrt(Σ_j ||W_eff_j||_F²)

  with ``ΔW_eff_j = s_j (B_j' A_j' − B_j A_j)`` (after minus before the step) and ``W_eff_j`` taken
  before the step.
- The target is the mean of ``ratio_l`` over the layers that moved. After :meth:`after_step`,
  every such layer has ``ratio_l`` equal to the target (exactly, up to the float32 rounding of
  the stored adapter weights).

How the step is rescaled. The optimizer moved the adapters by ``(dA_j, dB_j)``. Each layer gets
one factor ``c_l > 0`` and its adapters are reset to ``A_j + c_l·dA_j``, ``B_j + c_l·dB_j``: the
optimizer's update direction in parameter space is kept, only its length changes. Because the
effective weight is a product, its change is not linear in ``c``::

      ΔW_eff_j(c) = s_j [ c·(dB_j A_j + B_j dA_j) + c²·dB_j dA_j ] = c·P_j + c²·Q_j

so ``||ΔW_eff(c)||²`` summed over the layer is the quartic ``a c² + 2b c³ + q c⁴`` with
``a = Σ||P_j||², b = Σ<P_j, Q_j>, q = Σ||Q_j||²``. ``c_l`` is its smallest positive root of
``= (target · ||W_eff||)²`` (the first point on the path from no step to the optimizer's step, and
further along it, where the layer's relative change equals the target). All norms are computed in
float64 from the rank-r factors (``<U V, U' V'> = Σ (UᵀU') ⊙ (V V'ᵀ)``), never forming an
``(N, K)`` product except ``Bᵀ W`` for the ``<W, BA>`` term. The optimizer state is left as is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["EqualizeStats", "UpdateEqualizer", "smallest_positive_root"]


@dataclass
class EqualizeStats:
    """What the last :meth:`UpdateEqualizer.after_step` did."""

    target: float  # the common relative change every moved layer now has
    ratios: dict[int, float]  # layer -> ratio_l of the optimizer's own step, before rescaling
    factors: dict[int, float]  # layer -> c_l applied to the step of that layer's adapters


def _inner(u1: Tensor, v1: Tensor, u2: Tensor, v2: Tensor) -> Tensor:
    """Frobenius inner product ``<u1 @ v1, u2 @ v2>`` from the thin factors."""
    return ((u1.T @ u2) * (v1 @ v2.T)).sum()


def smallest_positive_root(a: float, b: float, q: float, target_sq: float) -> float:
    """Smallest ``c > 0`` with ``a c² + 2b c³ + q c⁴ = target_sq`` (``a, q >= 0``), refined by
    Newton steps in float64; ``nan`` when there is none."""
    if target_sq <= 0 or (a <= 0 and q <= 0):
        return math.nan
    # Scale to unit right-hand side so numpy's companion-matrix roots are well conditioned.
    coeffs = np.array([q, 2 * b, a, 0.0, -target_sq]) / target_sq
    while coeffs[0] == 0:  # a pure quadratic/cubic when Q (or both Q and b) vanish
        coeffs = coeffs[1:]
    roots = np.roots(coeffs)
    real = [r.real for r in roots if abs(r.imag) <= 1e-6 * max(1.0, abs(r.real)) and r.real > 0]
    if not real:
        return math.nan
    c = min(real)
    for _ in range(3):
        f = a * c * c + 2 * b * c**3 + q * c**4 - target_sq
        df = 2 * a * c + 6 * b * c * c + 4 * q * c**3
        if df == 0:
            break
        c -= f / df
    return c


class UpdateEqualizer:
    """Rescales each adapted layer's optimizer step so ``||ΔW_eff||/||W_eff||`` is equal across
    layers (see the module docstring for the exact definition).

    Use around the optimizer step::

        eq = UpdateEqualizer(model)
        eq.before_step(); optimizer.step(); eq.after_step()

    ``modules`` defaults to ``fastmid.engine.midblock.lora_modules(model)``: ``(layer, name,
    module)`` with ``module.weight``, ``module.lora_A (r, K)``, ``module.lora_B (N, r)`` and
    ``module.scale``.
    """

    def __init__(
        self, model: nn.Module, modules: Iterable[tuple[int, str, nn.Module]] | None = None
    ) -> None:
        if modules is None:
            from fastmid.engine.midblock import lora_modules

            modules = lora_modules(model)
        self.layers: dict[int, list[nn.Module]] = {}
        for layer, _name, module in modules:
            self.layers.setdefault(int(layer), []).append(module)
        if not self.layers:
            raise ValueError("the model has no LoRA modules to equalize")
        # Frozen weights never change: their squared norms are computed once.
        with torch.no_grad():
            self._w_sq = {
                id(m): float(m.weight.detach().double().square().sum())
                for mods in self.layers.values()
                for m in mods
            }
        self._snapshot: dict[int, Tensor] | None = None
        self.last: EqualizeStats | None = None

    @torch.no_grad()
    def before_step(self) -> None:
        """Remember the adapters as they are before ``optimizer.step()``."""
        # Keyed by parameter, not module: fused projections may share one lora_A.
        self._snapshot = {
            id(p): p.detach().clone()
            for mods in self.layers.values()
            for m in mods
            for p in (m.lora_A, m.lora_B)
        }

    @torch.no_grad()
    def after_step(self) -> EqualizeStats:
        """Rescale the step just taken so every moved layer has the target relative change."""
        if self._snapshot is None:
            raise RuntimeError("after_step() called without before_step()")
        snap, self._snapshot = self._snapshot, None
        order = sorted(self.layers)
        # Per layer: [a, b, q, ||W_eff||² - ||W||²], gathered into one tensor so the host reads
        # them with a single device sync per step.
        rows = []
        for layer in order:
            row = torch.zeros(4, dtype=torch.float64, device=self.layers[layer][0].lora_A.device)
            for m in self.layers[layer]:
                a0, b0 = snap[id(m.lora_A)].double(), snap[id(m.lora_B)].double()
                da = m.lora_A.detach().double() - a0
                db = m.lora_B.detach().double() - b0
                s = float(m.scale)
                up, vp = torch.cat([db, b0], 1), torch.cat([a0, da], 0)  # P/s = up @ vp
                # <W, B A> via the (r, K) product Bᵀ W; float32 is plenty for a norm's cross term.
                w_ba = ((b0.float().T @ m.weight.detach().float()).double() * a0).sum()
                row += torch.stack(
                    [
                        s * s * _inner(up, vp, up, vp),
                        s * s * _inner(up, vp, db, da),
                        s * s * _inner(db, da, db, da),
                        2 * s * w_ba + s * s * _inner(b0, a0, b0, a0),
                    ]
                )
            rows.append(row.cpu())
        coef = torch.stack(rows).tolist()

        weff_sq, ratios = {}, {}
        for layer, (a, b, q, extra) in zip(order, coef, strict=True):
            weff_sq[layer] = sum(self._w_sq[id(m)] for m in self.layers[layer]) + extra
            step_sq = max(a + 2 * b + q, 0.0)
            ratios[layer] = math.sqrt(step_sq / weff_sq[layer]) if weff_sq[layer] > 0 else 0.0
        moved = [layer for layer in order if ratios[layer] > 0 and math.isfinite(ratios[layer])]
        target = sum(ratios[layer] for layer in moved) / len(moved) if moved else 0.0

        factors = {}
        for layer, (a, b, q, _) in zip(order, coef, strict=True):
            c = 1.0
            if layer in moved:
                root = smallest_positive_root(a, b, q, target * target * weff_sq[layer])
                c = root if math.isfinite(root) else 1.0
            factors[layer] = c
            if c == 1.0:
                continue
            params = {id(p): p for m in self.layers[layer] for p in (m.lora_A, m.lora_B)}
            for key, param in params.items():
                old = snap[key].double()
                param.copy_((old + c * (param.detach().double() - old)).to(param.dtype))
        self.last = EqualizeStats(target=target, ratios=ratios, factors=factors)
        return self.last
