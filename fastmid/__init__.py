"""fastmid: Mid-Block Efficient Tuning for Hugging Face causal LMs.

The public API is imported lazily so that ``import fastmid.kernels`` stays light (torch and
triton only) for trainers that use just the kernels.
"""

from __future__ import annotations

import importlib
from typing import Any

from fastmid import notices

# Before anything imports transformers (which imports torchao when installed).
notices.install()

__version__ = "0.1.0"

_EXPORTS = {
    "MidBlockConfig": "fastmid.engine.midblock",
    "apply_midblock": "fastmid.engine.midblock",
    "resolve_band": "fastmid.engine.midblock",
    "lora_modules": "fastmid.engine.midblock",
    "adapter_parameters": "fastmid.engine.midblock",
    "save_adapter": "fastmid.engine.adapters",
    "load_adapter": "fastmid.engine.adapters",
    "merge": "fastmid.engine.adapters",
    "quantize_frozen": "fastmid.engine.quantize",
    "UserError": "fastmid.errors",
}

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fastmid' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
