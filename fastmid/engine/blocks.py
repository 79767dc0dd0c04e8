"""Patch primitives: finding a model's decoder blocks and instance-level forward wrappers.

Everything that patches a model (:mod:`fastmid.engine.midblock`, :mod:`fastmid.engine.lora`,
:mod:`fastmid.engine.liger`, :mod:`fastmid.engine.quantize`, the label-only loss) builds on
these; they import nothing of fastmid's but its errors, so the modules that orchestrate a patch
sit above them and never in a circle with them.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from fastmid.errors import UserError

# Instance attribute names used to remember what a patch replaced, so merge() can undo it.
_ORIG_FORWARD = "_fastmid_orig_forward"


# --------------------------------------------------------------------------------------------
# Finding the decoder blocks


def _num_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "num_hidden_layers", None)


def find_layers_with_path(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, list) of the decoder blocks: the ModuleList of num_hidden_layers same-class blocks."""
    expected = _num_layers(model)
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    for name, mlist in lists:
        if (expected is None or len(mlist) == expected) and len({type(b) for b in mlist}) == 1:
            return name, mlist
    found = ", ".join(f"{n or '<root>'}[{len(m)}]" for n, m in lists) or "none"
    raise UserError(
        f"unknown model layout for {type(model).__name__}: no list of "
        f"num_hidden_layers={expected} decoder blocks (module lists found: {found})"
    )


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder blocks of a HF causal LM (e.g. ``model.model.layers``)."""
    return find_layers_with_path(model)[1]


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``path`` inside ``root``."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


# --------------------------------------------------------------------------------------------
# Instance-level forward wrappers


class _WrappedForward:
    """An instance-level forward built by ``make(module, inner_forward)``.

    ``copy.deepcopy`` of a patched model rebuilds the wrapper around the copy (a plain closure
    would keep calling the original module and leave the copy's parameters without grads).
    """

    def __init__(self, module: nn.Module, make: ForwardMaker, inner: Any) -> None:
        self.module, self.make, self.inner = module, make, inner
        self.run: Callable[..., Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Built on first call: during a deepcopy the module's copy has no attributes yet.
        if self.run is None:
            inner = self.inner or type(self.module).forward.__get__(self.module)
            self.run = self.make(self.module, inner)
        return self.run(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        # Callers that inspect ``model.forward`` (Trainer's unused-column filter, generate's
        # kwargs check) see the parameters of the forward it wraps, not (*args, **kwargs).
        return inspect.signature(self.inner or type(self.module).forward.__get__(self.module))

    def __deepcopy__(self, memo: dict[int, Any]) -> _WrappedForward:
        # The module's copy is in `memo` already: copy registers it before copying its state.
        module = memo.get(id(self.module), self.module)
        return _WrappedForward(module, self.make, copy.deepcopy(self.inner, memo))


ForwardMaker = Callable[[nn.Module, Callable[..., Any]], Callable[..., Any]]


def wrap_forward(module: nn.Module, make: ForwardMaker) -> None:
    """Replace ``module.forward`` on this instance only with ``make(module, forward)``,
    remembering what was there."""
    if _ORIG_FORWARD not in module.__dict__:
        setattr(module, _ORIG_FORWARD, module.__dict__.get("forward"))
    module.forward = _WrappedForward(module, make, module.__dict__.get("forward"))


def unwrap_forward(module: nn.Module) -> None:
    """Undo :func:`wrap_forward` on this instance (no-op when it was never wrapped)."""
    if _ORIG_FORWARD not in module.__dict__:
        return
    orig = module.__dict__.pop(_ORIG_FORWARD)
    module.__dict__.pop("forward", None)
    if orig is not None:
        module.forward = orig


def is_silu(act: Any) -> bool:
    """True for SiLU activation modules (torch's and transformers' own class)."""
    return isinstance(act, nn.SiLU) or type(act).__name__ in {"SiLU", "SiLUActivation"}
