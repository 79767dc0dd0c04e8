"""The LoRA layers: :class:`LoraLinear` and the fused q/k/v and SwiGLU gate/up groups.

A :class:`LoraLinear` is a frozen linear plus an adapter, computed by ``fastmid.kernels``. When
q, k and v (or a SwiGLU MLP's gate and up) are all adapted, their frozen weights are
concatenated once and shared, so one kernel call serves the group. :mod:`fastmid.engine.midblock`
decides where these go; :mod:`fastmid.engine.quantize` swaps their frozen matrices.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fastmid import kernels
from fastmid.engine.blocks import is_silu, wrap_forward

QKV = ("q_proj", "k_proj", "v_proj")


# The concatenated frozen [W_gate; W_up] of a fused SwiGLU MLP (a plain attribute: gate and up
# already own the matrix, as views).
GATE_UP_WEIGHT = "_fastmid_gate_up_weight"


# --------------------------------------------------------------------------------------------
# The LoRA module


class DropoutSeed:
    """The LoRA dropout seed of one model: one 0-dim int64 tensor drawn from torch's generator
    at the start of each training forward (a forward pre-hook), shared by every adapter, each
    adding its own layer offset (`LoraLinear.seed_offset`) in the kernels. So no adapter call
    draws from the generator, and the masks are reproducible under ``torch.manual_seed``.

    ``current`` is None until the first training forward of the whole model; an adapter called
    on its own then draws a seed per call (as the functional ops do). A checkpointed block
    recomputes with the seed its forward saw (``midblock._checkpointed_forward``), so run each
    micro-batch's backward before the next micro-batch's forward, as every training loop does.
    """

    def __init__(self, probe: nn.Parameter) -> None:
        self.probe = probe  # an adapter: the seed lives on its device
        self.current: torch.Tensor | None = None

    def draw(self, model: nn.Module, _args: Any) -> None:
        if model.training:
            self.current = torch.randint(
                0, 2**31 - 1, (), device=self.probe.device, dtype=torch.int64
            )


def _seed_of(module: LoraLinear) -> torch.Tensor | None:
    seeds = module._seeds
    return None if seeds is None else seeds.current


class _QKVGroup:
    """q/k/v of one attention sharing a frozen ``cat([Wq, Wk, Wv])`` and one kernel call.

    The attention code still calls q_proj(x), k_proj(x), v_proj(x) one after the other. The
    first of the three calls computes all projections with ``lora_qkv`` and keeps the other two
    outputs, keyed by the identity of ``x`` (and the grad mode); the next calls on the same
    tensor take theirs and the stash is dropped once empty. A call that finds no matching stash
    (another input, or a module called twice) computes the three projections afresh.
    """

    def __init__(self, modules: dict[str, LoraLinear], weight: torch.Tensor, bias: Any) -> None:
        self.modules = modules
        self.weight = weight
        self.bias = bias
        self._x: torch.Tensor | None = None
        self._grad_mode = False
        self._outputs: dict[str, torch.Tensor] = {}

    def take(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        if self._x is x and self._grad_mode == torch.is_grad_enabled() and name in self._outputs:
            out = self._outputs.pop(name)
            if not self._outputs:
                self._x = None
            return out
        return None

    def compute(self, name: str, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (self.modules[n] for n in QKV)
        outs = kernels.lora_qkv(
            x,
            self.weight,
            q.lora_A,
            k.lora_A,
            v.lora_A,
            q.lora_B,
            k.lora_B,
            v.lora_B,
            (q.scale, k.scale, v.scale),
            bias_qkv=self.bias,
            dropout_p=q.dropout_p if q.training else 0.0,
            seed=_seed_of(q),
            seed_offset=q.seed_offset,
        )
        self._outputs = {n: o for n, o in zip(QKV, outs, strict=True) if n != name}
        self._x, self._grad_mode = x, torch.is_grad_enabled()
        return outs[QKV.index(name)]


class LoraLinear(nn.Module):
    """A frozen linear plus a LoRA adapter: ``y = x Wᵀ + b + scale·(drop(x) Aᵀ) Bᵀ``.

    ``weight`` and ``bias`` are the original linear's (frozen) tensors; ``lora_A`` (r, K) and
    ``lora_B`` (N, r) are fp32 parameters whatever the base dtype. Under autocast the kernels
    keep their compute-dtype copies until the optimizer changes them; gradients come back in
    fp32 for autograd to accumulate into ``.grad`` (see ``fastmid.kernels._lora``).
    ``seed_offset`` is this adapter's offset to the model's dropout seed (``DropoutSeed``).
    """

    def __init__(
        self, base: nn.Linear, rank: int, scale: float, dropout_p: float, name: str = ""
    ) -> None:
        super().__init__()
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.name = name
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        # Same init as PEFT: A Kaiming-uniform, B zero, so the patched model starts unchanged.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = scale
        self.dropout_p = dropout_p
        self.seed_offset = 0
        self._seeds: DropoutSeed | None = None
        self._group: _QKVGroup | None = None

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self._group
        if group is not None:
            out = group.take(self.name, x)
            return out if out is not None else group.compute(self.name, x)
        return kernels.lora_linear(
            x,
            self.weight,
            self.lora_A,
            self.lora_B,
            self.scale,
            bias=self.bias,
            dropout_p=self.dropout_p if self.training else 0.0,
            seed=_seed_of(self),
            seed_offset=self.seed_offset,
        )

    def merged_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ``W + scale·B·A`` folded in (in fp32, cast back)."""
        w = self.weight.detach()
        delta = self.scale * (self.lora_B.detach().float() @ self.lora_A.detach().float())
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device="meta"
        )
        # A fresh contiguous tensor: grouped weights are views into one shared matrix, which
        # save_pretrained would refuse as shared storage.
        linear.weight = nn.Parameter((w.float() + delta).to(w.dtype), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, scale={self.scale:g}, dropout={self.dropout_p:g}"
        )


# --------------------------------------------------------------------------------------------
# Fused groups: q/k/v and a SwiGLU's gate/up share one frozen matrix


def _swiglu_forward(mlp: nn.Module, recompute: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    gate, up = mlp.gate_proj, mlp.up_proj

    def forward(x: torch.Tensor) -> torch.Tensor:
        h = kernels.lora_gate_up(
            x,
            # Read per call: quantize_frozen may replace the matrix after patching.
            mlp._fastmid_gate_up_weight,
            gate.lora_A,
            up.lora_A,
            gate.lora_B,
            up.lora_B,
            (gate.scale, up.scale),
            dropout_p=gate.dropout_p if mlp.training else 0.0,
            seed=_seed_of(gate),
            seed_offset=gate.seed_offset,
            recompute=recompute,
        )
        return mlp.down_proj(h)

    return forward


def _is_swiglu(mlp: nn.Module) -> bool:
    """True when ``mlp`` computes down(silu(gate(x)) * up(x)) with bias-free gate and up.

    Checked numerically once on a small probe input rather than trusted from the class name,
    so a family with another MLP formula keeps its own forward.
    """
    gate, up, down = (getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
    if not all(isinstance(m, LoraLinear) for m in (gate, up)) or down is None:
        return False
    if gate.bias is not None or up.bias is not None:
        return False
    if not is_silu(getattr(mlp, "act_fn", None)):
        return False
    w = gate.weight
    with torch.no_grad():
        x = torch.randn(2, gate.in_features, dtype=w.dtype, device=w.device)
        expected = down(torch.nn.functional.silu(x @ w.T) * (x @ up.weight.T))
        got = type(mlp).forward(mlp, x)
    return torch.allclose(got.float(), expected.float(), rtol=1e-2, atol=1e-3)


def fuse_qkv(mods: dict[str, LoraLinear]) -> None:
    """Share one frozen cat([Wq, Wk, Wv]) between q, k and v (weights become views into it)."""
    if not all(n in mods for n in QKV):
        return
    q, k, v = (mods[n] for n in QKV)
    if len({m.weight.dtype for m in (q, k, v)}) != 1 or len({m.rank for m in (q, k, v)}) != 1:
        return
    has_bias = [m.bias is not None for m in (q, k, v)]
    if any(has_bias) and not all(has_bias):
        return
    weight = torch.cat([m.weight.detach() for m in (q, k, v)], 0)
    bias = torch.cat([m.bias.detach() for m in (q, k, v)], 0) if all(has_bias) else None
    start = 0
    for m in (q, k, v):
        n = m.out_features
        m.weight = nn.Parameter(weight[start : start + n], requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(bias[start : start + n], requires_grad=False)
        start += n
    group = _QKVGroup({n: mods[n] for n in QKV}, weight, bias)
    for m in (q, k, v):
        m._group = group


def fuse_gate_up(
    block: nn.Module, paths: dict[str, str], mods: dict[str, LoraLinear], recompute: bool
) -> None:
    """Run a SwiGLU MLP as lora_gate_up + down when gate and up are both targets; `recompute`
    is lora_gate_up's memory mode."""
    if "gate_proj" not in mods or "up_proj" not in mods:
        return
    mlp_path = paths["gate_proj"].rpartition(".")[0]
    if paths["up_proj"].rpartition(".")[0] != mlp_path:
        return
    mlp = block.get_submodule(mlp_path) if mlp_path else block
    if not _is_swiglu(mlp):
        return
    gate, up = mods["gate_proj"], mods["up_proj"]
    if gate.weight.dtype != up.weight.dtype or gate.rank != up.rank:
        return
    weight = torch.cat([gate.weight.detach(), up.weight.detach()], 0)
    gate.weight = nn.Parameter(weight[: gate.out_features], requires_grad=False)
    up.weight = nn.Parameter(weight[gate.out_features :], requires_grad=False)
    setattr(mlp, GATE_UP_WEIGHT, weight)
    wrap_forward(mlp, lambda module, _forward: _swiglu_forward(module, recompute))


def fused_weights(block: nn.Module) -> list[tuple[Any, str, list[LoraLinear]]]:
    """Each frozen concatenated weight of ``block`` as (holder, attribute name, member modules
    in row order): q/k/v's shared matrix and a fused SwiGLU's gate/up matrix. A later pass
    (quantization) replaces the matrix and the members' row views of it together."""
    out: list[tuple[Any, str, list[LoraLinear]]] = []
    for module in block.modules():
        group = module._group if isinstance(module, LoraLinear) else None
        if group is not None and all(g is not group for g, _, _ in out):
            out.append((group, "weight", [group.modules[n] for n in QKV]))
        if GATE_UP_WEIGHT in module.__dict__:
            out.append((module, GATE_UP_WEIGHT, [module.gate_proj, module.up_proj]))
    return out


def is_fused(model: nn.Module) -> bool:
    """True when q/k/v or gate/up of some block run from one concatenated frozen weight.

    FSDP cannot shard such a copy; it needs a model patched with ``fuse_groups=False``.
    """
    for module in model.modules():
        if isinstance(module, LoraLinear) and module._group is not None:
            return True
        if GATE_UP_WEIGHT in vars(module):
            return True
    return False


def unfuse(module: nn.Module) -> None:
    """Drop what :func:`fuse_qkv` and :func:`fuse_gate_up` attached to ``module`` (its group,
    the concatenated matrix); a no-op for any other module."""
    module.__dict__.pop(GATE_UP_WEIGHT, None)
    if isinstance(module, LoraLinear):
        module._group = None
