"""fastmid.kernels: fused LoRA operations (Triton on CUDA, a fast torch path elsewhere).

Depends only on torch and triton, so other trainers can import it on its own::

    from fastmid.kernels import lora_linear
"""
