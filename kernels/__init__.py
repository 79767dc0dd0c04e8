"""fastmid.kernels: fused LoRA operations (Triton on CUDA, a fast torch path elsewhere).

Depends only on torch and triton, so other trainers can import it on its own::

    from fastmid.kernels import lora_linear

The ops are `torch.library` custom ops (`torch.ops.fastmid.*`) with registered autograd, so
torch.compile traces a model that uses them without a graph break.
"""

# With a source checkout's root on sys.path (pytest, `python -m` from the checkout), a probe for
# an unrelated top-level package named "kernels" (transformers looks for one) can import this
# folder under that bare name. It then defines nothing, so the probe stays cheap and harmless.
if __name__ != "kernels":
    from ._common import use_triton
    from .lora_gate_up import lora_gate_up, lora_gate_up_reference
    from .lora_linear import lora_linear, lora_linear_reference
    from .lora_qkv import lora_qkv, lora_qkv_reference

__all__ = [
    "lora_gate_up",
    "lora_gate_up_reference",
    "lora_linear",
    "lora_linear_reference",
    "lora_qkv",
    "lora_qkv_reference",
    "use_triton",
]
