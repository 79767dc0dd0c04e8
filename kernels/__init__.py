"""fastmid.kernels: fused LoRA operations (Triton on CUDA, a fast torch path elsewhere).

Depends only on torch and triton, so other trainers can import it on its own::

    from fastmid.kernels import lora_linear
"""

from ._common import use_triton
from .lora_linear import LoraLinearFunction, lora_linear, lora_linear_reference

__all__ = ["LoraLinearFunction", "lora_linear", "lora_linear_reference", "use_triton"]
