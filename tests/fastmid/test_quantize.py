"""quantize_frozen: NF4 / int8 frozen base under the Mid-Block band (tiny models from config)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastmid.engine.adapters import load_adapter, merge, save_adapter
from fastmid.engine.blocks import find_decoder_layers
from fastmid.engine.lora import LoraLinear
from fastmid.engine.midblock import MidBlockConfig, adapter_parameters, apply_midblock
from fastmid.engine.quantize import (
    QuantizedLinear,
    QuantizedWeight,
    dequantize_frozen,
    frozen_weight_bytes,
    quantize_frozen,
)
from fastmid.errors import UserError
from fastmid.recipe.config import TrainConfig

from ._tiny import randomize_adapters, tiny_model

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")
METHODS = ("nf4", "int8")


def base() -> nn.Module:
    # Every width a multiple of NF4's 64-value blocks (the default tiny MLP is 96 wide). In
    # bf16, as quantized bases train, which also keeps these model-level tests on the torch
    # path (the kernels' own tests cover Triton under the interpreter).
    return tiny_model("llama", intermediate_size=128).to(torch.bfloat16)


def patched(method: str, model: nn.Module | None = None, **kw) -> nn.Module:
    model = base() if model is None else model
    cfg = MidBlockConfig(targets=TARGETS, rank=8, dropout=0.0, quantize=method, **kw)
    apply_midblock(model, cfg)
    randomize_adapters(model)
    return model


IDS = torch.tensor(
    [[5, 17, 99, 3, 42, 7, 8, 200, 31, 64, 12], [9, 9, 120, 33, 4, 250, 6, 1, 2, 5, 3]]
)


def loss_and_grads(model: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=IDS, labels=IDS, use_cache=False).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in adapter_parameters(model)]


def test_nf4_dequantizes_bit_for_bit_like_torchao():
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    for dtype in (torch.bfloat16, torch.float32):
        model = patched("none", base().to(dtype))
        block = find_decoder_layers(model)[0]
        w = block.mlp.down_proj.weight.detach().clone()
        quantize_frozen(model, "nf4")
        ours = block.mlp.down_proj.weight
        assert isinstance(ours, QuantizedWeight) and ours.dtype == dtype
        expected = to_nf4(w, 64, ours.payload.scaler_block_size).get_original_weight()
        assert torch.equal(ours.to(dtype), expected)
        assert torch.equal(ours.float(), expected.float())


@pytest.mark.parametrize("method", METHODS)
def test_every_frozen_decoder_linear_is_stored_quantized(method):
    model = patched(method)
    plain_before = {n: p for n, p in base().named_parameters() if "layers" not in n}
    for block in find_decoder_layers(model):
        for module in block.modules():
            assert not isinstance(module, nn.Linear)
            if isinstance(module, (LoraLinear, QuantizedLinear)):
                assert isinstance(module.weight, QuantizedWeight)
    # Embeddings, norms and the LM head are untouched plain tensors.
    for name, p in model.named_parameters():
        if "layers" not in name:
            assert type(p.data) is torch.Tensor
            torch.testing.assert_close(p, plain_before[name], rtol=0, atol=0)
    counts = frozen_weight_bytes(model)
    assert counts["plain"] == 0
    # NF4: 4 bits + one int8 scale per 64 values (+ a few per-group factors); int8: 8 bits +
    # one fp32 scale per row.
    ratio = counts["quantized"] / counts["bf16"]
    assert (0.25 < ratio < 0.27) if method == "nf4" else (0.5 < ratio < 0.53)


def test_fused_members_are_views_of_the_one_quantized_matrix():
    model = patched("nf4")
    attn = find_decoder_layers(model)[model.fastmid_state.layers[0]].self_attn
    group = attn.q_proj._group
    whole = group.weight.payload.data
    start = whole.data_ptr()
    for name in ("q_proj", "k_proj", "v_proj"):
        part = getattr(attn, name).weight.payload.data
        assert start <= part.data_ptr() < start + whole.numel()
    parts = [getattr(attn, n).weight.to(torch.float32) for n in ("q_proj", "k_proj", "v_proj")]
    assert torch.equal(torch.cat(parts), group.weight.to(torch.float32))


@pytest.mark.parametrize("method", METHODS)
def test_adapter_grads_equal_the_dequantized_reference(method):
    model = patched(method)
    reference = dequantize_frozen(patched(method))
    assert not any(isinstance(p, QuantizedWeight) for p in reference.parameters())
    loss, grads = loss_and_grads(model)
    ref_loss, ref_grads = loss_and_grads(reference)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for g, r in zip(grads, ref_grads, strict=True):
        assert r.abs().max() > 0
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5 * r.abs().max().item())
    # And the quantized base really differs from the original one (not a silent no-op).
    original = patched("none")
    assert (loss_and_grads(original)[0] - loss).abs() > 1e-4


@pytest.mark.parametrize("method", METHODS)
def test_backward_keeps_no_dequantized_weight(method):
    model = patched(method)
    shapes = {
        tuple(m.weight.shape)
        for block in find_decoder_layers(model)
        for m in block.modules()
        if isinstance(m, (LoraLinear, QuantizedLinear))
    }
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=IDS, labels=IDS, use_cache=False).loss
    quantized = [t for t in saved if isinstance(t, QuantizedWeight)]
    weight_sized = [
        t
        for t in saved
        if type(t) is torch.Tensor and t.is_floating_point() and tuple(t.shape) in shapes
    ]
    assert len(quantized) >= 4  # the band's fused and single LoRA ops keep the 4/8-bit form
    assert weight_sized == []
    loss.backward()


@pytest.mark.parametrize("method", METHODS)
def test_adapter_save_load_round_trip(method, tmp_path):
    model = patched(method)
    model.eval()
    save_adapter(model, tmp_path)
    fresh = base()
    load_adapter(fresh, tmp_path)
    quantize_frozen(fresh, method)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS).logits, model(IDS).logits, rtol=0, atol=0)


def test_merge_refuses_then_dequantizes_on_request():
    # fp32: a bf16 merge rounds W + s·B·A to bf16, which alone moves the logits by ~0.1.
    model = patched("nf4", base().float())
    model.eval()
    with torch.no_grad():
        expected = model(IDS).logits
    with pytest.raises(UserError, match=r"merge.*dequantize=True") as err:
        merge(model)
    assert "\n" not in str(err.value)
    merged = merge(model, dequantize=True)
    assert all(type(p.data) is torch.Tensor for p in merged.parameters())
    assert not any(isinstance(m, (LoraLinear, QuantizedLinear)) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, expected, rtol=1e-4, atol=1e-4)


def test_block_size_must_divide_the_layer_width():
    model = tiny_model("llama")  # MLP width 96: down_proj's input is not a multiple of 64
    with pytest.raises(UserError, match=r"block size 64.*down_proj has 96") as err:
        apply_midblock(model, MidBlockConfig(rank=8, quantize="nf4"))
    assert "\n" not in str(err.value)
    # Checked before anything was replaced; int8 has no block constraint.
    assert not any(isinstance(p, QuantizedWeight) for p in model.parameters())
    fresh = tiny_model("llama")
    apply_midblock(fresh, MidBlockConfig(rank=8, quantize="int8"))
    assert isinstance(find_decoder_layers(fresh)[0].mlp.down_proj, QuantizedLinear)


def test_bad_combinations_are_one_line_errors():
    with pytest.raises(UserError, match=r"quantize must be one of none\|nf4\|int8"):
        apply_midblock(base(), MidBlockConfig(quantize="fp4"))
    with pytest.raises(UserError, match="quantize must be one of"):
        TrainConfig(midblock=MidBlockConfig(quantize="nf3")).validate()
    with pytest.raises(UserError, match="trains with --parallel ddp"):
        TrainConfig(midblock=MidBlockConfig(quantize="nf4"), nproc=2, parallel="fsdp").validate()
    TrainConfig(midblock=MidBlockConfig(quantize="nf4"), nproc=2).validate()  # DDP: allowed
    model = quantize_frozen(base(), "nf4")
    with pytest.raises(UserError, match="patch the model before quantizing"):
        apply_midblock(model, MidBlockConfig(rank=8))
    with pytest.raises(UserError, match="already quantized"):
        quantize_frozen(model, "int8")


def test_quantized_base_model_runs_without_adapters():
    model = base()
    expected = copy.deepcopy(model)
    quantize_frozen(model, "nf4")
    with torch.no_grad():
        got, want = model(IDS).logits, expected(IDS).logits
    # NF4 perturbs the output but keeps it close to the original one.
    assert 0 < (got - want).abs().max() < 0.2 * want.abs().max()


def test_gradient_checkpointing_on_a_quantized_base_gives_the_same_grads():
    loss, grads = loss_and_grads(patched("nf4"))
    gc_loss, gc_grads = loss_and_grads(patched("nf4", gradient_checkpointing=True))
    torch.testing.assert_close(gc_loss, loss, rtol=0, atol=0)
    for g, r in zip(gc_grads, grads, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


def test_int8_keeps_every_weight_within_half_a_step_and_the_logits_close():
    # fp32, so the original weights are exact and the bound is the quantizer's alone.
    model = base().float()
    original = copy.deepcopy(model)
    quantize_frozen(model, "int8")
    checked = 0
    for name, module in model.named_modules():
        if not isinstance(module, QuantizedLinear):
            continue
        w = original.get_submodule(name).weight.detach()
        payload = module.weight.payload
        step = payload.scale.float()[:, None]
        # One step per row: the row's largest magnitude over 127, so nothing is clipped.
        torch.testing.assert_close(step[:, 0], w.abs().amax(dim=1) / 127, rtol=1e-6, atol=0)
        got = module.weight.dequantize(torch.float32)
        # Half a step, plus the fp32 rounding of w / step and of data · step.
        rounding = 2 * torch.finfo(torch.float32).eps * w.abs()
        assert ((got - w).abs() <= step / 2 + rounding).all(), name
        # The row maximum maps to ±127 and comes back (to fp32 rounding of 127 · max/127).
        top = w.abs().argmax(dim=1, keepdim=True)
        assert (payload.data.gather(1, top).abs() == 127).all(), name
        torch.testing.assert_close(got.gather(1, top), w.gather(1, top), rtol=1e-6, atol=0)
        checked += 1
    assert checked == 7 * len(find_decoder_layers(model))
    with torch.no_grad():
        got, want = model(IDS).logits, original(IDS).logits
    # int8's per-row error is under 0.4% of the row maximum: the logits barely move.
    assert 0 < (got - want).abs().max() < 0.02 * want.abs().max()
