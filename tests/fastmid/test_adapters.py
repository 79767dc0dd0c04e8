"""Adapters in PEFT format: round trips both ways, merge, and clear errors."""

from __future__ import annotations

import copy
import json

import fastmid.kernels._common as kernel_dispatch
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

from fastmid.engine.adapters import CONFIG_NAME, WEIGHTS_NAME, load_adapter, merge, save_adapter
from fastmid.engine.lora import LoraLinear
from fastmid.engine.midblock import MidBlockConfig, apply_midblock, lora_modules
from fastmid.errors import UserError
from tests.fastmid._tiny import randomize_adapters, tiny_model

IDS = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 128, 64, 31]])


@pytest.fixture(autouse=True)
def torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about files and weights: the kernels' torch path is enough."""
    monkeypatch.setattr(kernel_dispatch, "INTERPRET", False)


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def patched(family: str = "llama", **cfg) -> tuple[nn.Module, nn.Module]:
    """(patched model with non-zero adapters, an untouched copy of its base)."""
    model = tiny_model(family)
    base = copy.deepcopy(model)
    cfg = {"rank": 4, "alpha": 16, "dropout": 0.0, **cfg}
    apply_midblock(model, MidBlockConfig(**cfg))
    randomize_adapters(model)
    return model, base


def test_saved_files_use_peft_names_and_config(tmp_path):
    model, _ = patched(targets=("q_proj", "v_proj", "down_proj"), use_rslora=True)
    out = save_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny/llama")
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4 and config["lora_alpha"] == 16 and config["use_rslora"] is True
    assert config["target_modules"] == ["q_proj", "v_proj", "down_proj"]
    assert config["layers_to_transform"] == [2, 3, 4, 5, 6, 7]
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    assert config["base_model_name_or_path"] == "tiny/llama"
    tensors = load_file(out / WEIGHTS_NAME)
    assert len(tensors) == 6 * 3 * 2
    a = tensors["base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.7.mlp.down_proj.lora_B.weight"]
    assert a.shape == (4, 64) and b.shape == (64, 4) and a.dtype == torch.float32
    torch.testing.assert_close(a, model.model.layers[2].self_attn.q_proj.lora_A.detach())
    # Atomic writes leave no temp files behind.
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


@pytest.mark.parametrize("rslora", [False, True])
def test_fastmid_adapter_loads_in_peft_with_equal_logits(tmp_path, rslora: bool):
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj")
    model, base = patched("qwen2", targets=targets, use_rslora=rslora)
    # alpha 16, rank 4: rsLoRA scales by 16 / sqrt(4) = 8, plain LoRA by 16 / 4 = 4.
    assert model.fastmid_state.scale == (8.0 if rslora else 4.0)
    save_adapter(model, tmp_path)
    base_logits = logits(base)
    peft_model = PeftModel.from_pretrained(base, tmp_path)  # injects into `base` in place
    q = peft_model.base_model.model.model.layers[3].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(model.fastmid_state.scale)
    ours = logits(model)
    assert (ours - base_logits).abs().max() > 0.01  # the adapter matters
    torch.testing.assert_close(logits(peft_model), ours, rtol=1e-4, atol=1e-5)


def test_fastmid_adapter_loads_through_transformers_adapter_api(tmp_path):
    # transformers' own PEFT integration checks the installed PEFT version: this fails when
    # the pinned transformers and PEFT do not work together.
    model, base = patched(targets=("q_proj", "v_proj"))
    save_adapter(model, tmp_path)
    base_logits = logits(base)
    base.load_adapter(str(tmp_path), adapter_name="mid")
    assert base.active_adapters() == ["mid"]
    got = logits(base)
    assert (got - base_logits).abs().max() > 0.01
    torch.testing.assert_close(got, logits(model), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_loads_into_unpatched_model_with_equal_logits(tmp_path, rslora: bool):
    peft_base = tiny_model("mistral")
    fresh = copy.deepcopy(peft_base)
    config = LoraConfig(
        r=3,
        lora_alpha=12,
        target_modules=["k_proj", "o_proj", "gate_proj"],
        layers_to_transform=[1, 4, 5],
        lora_dropout=0.0,
        use_rslora=rslora,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(peft_base, config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    peft_model.save_pretrained(tmp_path)
    expected = logits(peft_model)

    load_adapter(fresh, tmp_path)
    state = fresh.fastmid_state
    assert state.layers == [1, 4, 5] and state.rank == 3
    assert state.targets == ("k_proj", "o_proj", "gate_proj")
    assert state.scale == pytest.approx(12 / 3**0.5 if rslora else 4.0)
    torch.testing.assert_close(logits(fresh), expected, rtol=1e-4, atol=1e-5)


def test_round_trip_into_a_patched_model(tmp_path):
    model, base = patched("olmo2")
    save_adapter(model, tmp_path)
    other = apply_midblock(base, MidBlockConfig(rank=4, alpha=16, dropout=0.0))
    assert (logits(other) - logits(model)).abs().max() > 0.01
    load_adapter(other, tmp_path)
    torch.testing.assert_close(logits(other), logits(model), rtol=0, atol=0)


def test_merge_gives_a_plain_model_with_the_same_outputs(tmp_path):
    model, _ = patched(
        "llama", targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")
    )
    expected = logits(model)
    merged = merge(model)
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert not hasattr(merged, "fastmid_state")
    assert all("forward" not in m.__dict__ for m in merged.modules())
    attn = merged.model.layers[3].self_attn
    assert type(attn.q_proj) is nn.Linear
    # Merged q/k/v own separate storage again (save_pretrained refuses shared tensors).
    assert attn.q_proj.weight.data_ptr() != attn.k_proj.weight.data_ptr()
    torch.testing.assert_close(logits(merged), expected, rtol=1e-4, atol=1e-5)
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    torch.testing.assert_close(logits(reloaded), expected, rtol=1e-4, atol=1e-5)


def test_merge_keeps_bf16_base_dtype():
    model, _ = patched("qwen3")
    expected = logits(model)
    # What bf16 costs by itself: the exact (fp32) merge, rounded to bf16 once at the end.
    rounded = merge(copy.deepcopy(model)).to(torch.bfloat16)
    for name, p in model.named_parameters():
        if "lora_" not in name:
            p.data = p.data.to(torch.bfloat16)
    merged = merge(model)
    assert merged.model.layers[4].self_attn.v_proj.weight.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = logits(merged).float()
        ref = logits(rounded).float()
    # Merging into bf16 weights rounds twice (the base, then base + ΔW): at most ~2x the
    # error of rounding the exact merge once.
    err, ref_err = (got - expected).abs().max(), (ref - expected).abs().max()
    assert 0 < ref_err < 0.05 * expected.abs().max()
    assert err <= 2 * ref_err


def test_load_errors_are_one_clear_line(tmp_path):
    model, _ = patched()
    with pytest.raises(UserError, match=r"adapter_config\.json not found"):
        load_adapter(model, tmp_path / "missing")

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / CONFIG_NAME).write_text("{not json")
    (bad / WEIGHTS_NAME).write_bytes(b"")
    with pytest.raises(UserError, match="invalid JSON"):
        load_adapter(model, bad)

    # An adapter for layers the model does not have.
    save_adapter(model, tmp_path / "ten")
    small = tiny_model("llama", num_layers=4)
    with pytest.raises(UserError, match="targets layer 4, the model has 4 layers"):
        load_adapter(small, tmp_path / "ten")

    # An adapter for modules the patched model does not adapt.
    only_q, _ = patched(targets=("q_proj",))
    with pytest.raises(UserError, match=r"model\.layers\.2\.self_attn\.k_proj.*does not adapt"):
        load_adapter(only_q, tmp_path / "ten")

    # The other way round: the model adapts modules the adapter holds no weights for, which
    # would keep their old weights.
    save_adapter(only_q, tmp_path / "only_q")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    message = r"no weights for model\.layers\.2\.self_attn\.k_proj \(18 of the model's 24 adapted"
    with pytest.raises(UserError, match=message):
        load_adapter(model, tmp_path / "only_q")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_" in n)

    # A different rank.
    rank8, _ = patched(rank=8)
    with pytest.raises(UserError, match=r"lora_A has shape \(4, 64\), the model's is \(8, 64\)"):
        load_adapter(rank8, tmp_path / "ten")

    # Non-LoRA tensors are refused, not silently ignored.
    tensors = load_file(tmp_path / "ten" / WEIGHTS_NAME)
    tensors["base_model.model.lm_head.weight"] = torch.zeros(2, 2)
    save_file(tensors, tmp_path / "ten" / WEIGHTS_NAME)
    with pytest.raises(UserError, match=r"unsupported tensor 'base_model\.model\.lm_head\.weight'"):
        load_adapter(model, tmp_path / "ten")


def test_unpatched_model_errors():
    with pytest.raises(UserError, match="not patched"):
        merge(tiny_model("llama", num_layers=2))
    with pytest.raises(UserError, match="not patched"):
        save_adapter(tiny_model("llama", num_layers=2), "unused")


def test_loaded_scale_follows_the_adapter(tmp_path):
    model, base = patched(alpha=16)
    save_adapter(model, tmp_path)
    other = apply_midblock(base, MidBlockConfig(rank=4, alpha=64, dropout=0.0))
    load_adapter(other, tmp_path)
    assert {m.scale for _, _, m in lora_modules(other)} == {4.0}
    torch.testing.assert_close(logits(other), logits(model), rtol=0, atol=0)


@pytest.mark.slow
def test_embedded_smollm2_band_step_and_peft_load(tmp_path):
    from fastmid.engine.midblock import adapter_parameters
    from fastmid.engine.models import load_model

    model, tokenizer, _ = load_model()
    base = copy.deepcopy(model)
    apply_midblock(model, MidBlockConfig())  # the paper's defaults
    state = model.fastmid_state
    assert state.layers == list(range(6, 24)) and state.rank == 106  # floor(64 * 30 / 18)

    ids = tokenizer("Question: What is 12 + 30?\nAnswer: 42", return_tensors="pt").input_ids
    model.train()
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    assert torch.isfinite(loss)
    lora_b = adapter_parameters(model)[1::2]  # B starts at zero but its gradient does not
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)

    randomize_adapters(model)
    model.eval()
    save_adapter(model, tmp_path)
    with torch.no_grad():
        expected = model(ids).logits
        got = PeftModel.from_pretrained(base, tmp_path)(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-4)
