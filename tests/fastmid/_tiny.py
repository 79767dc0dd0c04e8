"""Tiny random-init causal LMs, one per supported family, for fast tests (no downloads)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "gemma2")

_CONFIGS: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "olmo2": Olmo2Config,
    "gemma2": Gemma2Config,
}


def tiny_config(family: str, num_layers: int = 10, **overrides: Any) -> PretrainedConfig:
    """Config of a tiny model of ``family``: hidden 64, 4 heads (2 KV heads), vocab 256."""
    if family not in _CONFIGS:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    kwargs: dict[str, Any] = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family == "gemma2":
        # Soft-capping and the sliding window are Gemma2 features worth keeping switched on.
        kwargs.update(query_pre_attn_scalar=16, sliding_window=8)
    if family == "mistral":
        kwargs.update(sliding_window=None)
    kwargs.update(overrides)
    config = _CONFIGS[family](**kwargs)
    # Eager attention gives the same numbers on every machine and supports every family.
    config._attn_implementation = "eager"
    return config


def tiny_model(family: str, num_layers: int = 10, **overrides: Any) -> torch.nn.Module:
    """A random-init fp32 causal LM of ``family`` in eval mode, seeded for repeatability."""
    config = tiny_config(family, num_layers, **overrides)
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval()


def randomize_adapters(model: torch.nn.Module, seed: int = 7) -> None:
    """Give every fastmid adapter non-zero A and B so the LoRA path changes the output."""
    from fastmid.engine.midblock import lora_modules

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, m in lora_modules(model):
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=gen) * 0.2)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.05)


def peft_twin(base: torch.nn.Module, patched: torch.nn.Module) -> torch.nn.Module:
    """A PEFT LoRA model on ``base`` (an unpatched copy) with ``patched``'s adapter weights."""
    from peft import LoraConfig, get_peft_model

    from fastmid.engine.lora import LoraLinear

    state = patched.fastmid_state
    config = LoraConfig(
        r=state.rank,
        lora_alpha=state.alpha,
        lora_dropout=state.dropout,
        target_modules=list(state.targets),
        layers_to_transform=state.layers,
        use_rslora=state.config.use_rslora,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base, config)
    ours = {name: m for name, m in patched.named_modules() if isinstance(m, LoraLinear)}
    copied = 0
    with torch.no_grad():
        for name, m in peft_model.base_model.model.named_modules():
            if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict):
                m.lora_A["default"].weight.copy_(ours[name].lora_A)
                m.lora_B["default"].weight.copy_(ours[name].lora_B)
                copied += 1
    if copied != len(ours):
        raise AssertionError(f"PEFT adapted {copied} modules, fastmid {len(ours)}")
    return peft_model
