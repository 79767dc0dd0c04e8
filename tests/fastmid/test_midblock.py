"""Mid-Block patching: band and rank rules, equivalence with PEFT, work actually skipped."""

from __future__ import annotations

import copy

import fastmid.kernels._common as kernel_dispatch
import pytest
import torch
from torch import nn

from fastmid.engine.blocks import find_decoder_layers
from fastmid.engine.lora import LoraLinear, is_fused
from fastmid.engine.midblock import (
    KNOWN_TARGETS,
    MidBlockConfig,
    adapter_parameters,
    apply_midblock,
    lora_modules,
    resolve_band,
    resolve_rank,
)
from fastmid.errors import UserError
from tests.fastmid._tiny import FAMILIES, peft_twin, randomize_adapters, tiny_model

ALL = KNOWN_TARGETS
VOCAB = 256


@pytest.fixture(autouse=True)
def torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the kernels' torch path unless a test asks for the interpreted Triton kernels."""
    monkeypatch.setattr(kernel_dispatch, "INTERPRET", False)


def batch(seed: int = 0, b: int = 2, t: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, t), generator=gen)
    return ids, ids.clone()


def patched(family: str = "llama", num_layers: int = 10, **cfg) -> tuple[nn.Module, nn.Module]:
    """(fastmid model with random non-zero adapters, untouched copy of the same base)."""
    model = tiny_model(family, num_layers)
    base = copy.deepcopy(model)
    cfg.setdefault("dropout", 0.0)
    cfg.setdefault("rank", 4)  # the default budget gives ranks wider than the tiny layers
    apply_midblock(model, MidBlockConfig(**cfg))
    randomize_adapters(model)
    return model, base


def loss_and_grads(model: nn.Module, params: list[nn.Parameter]) -> tuple[torch.Tensor, ...]:
    ids, labels = batch()
    out = model(input_ids=ids, labels=labels)
    grads = torch.autograd.grad(out.loss, params)
    # In training mode a patched model returns no logits with labels (the loss needs only the
    # labelled positions); a label-free call gives them.
    logits = out.logits if out.logits is not None else model(input_ids=ids).logits
    return logits.detach(), out.loss.detach(), *grads


def assert_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    """fp32 agreement up to summation order: max error <= rel * the tensor's own scale."""
    err = (a - b).abs().max().item()
    assert err <= rel * b.abs().max().item() + 1e-7, f"max error {err:.3g}"


# Whole-network gradients are as accurate as stock PEFT's within this factor, tensor by tensor
# (norm-wise, against an fp64 PEFT run). Rounding differences grow differently through the
# blocks above each adapter: fastmid measured up to 8.2x PEFT's error (~1e-4 relative) on
# the q/k adapters of layer 0 under rsLoRA's scale of 90 with fused q/k/v, about 2x elsewhere.
GRAD_FACTOR = 10.0


def assert_as_accurate_as_peft(model: nn.Module, base: nn.Module) -> None:
    """fastmid's logits and loss are as close to an fp64 PEFT run as fp32 PEFT is (within 2x,
    as ``tests/kernels/_tolerance.py`` rules), and each LoRA grad within GRAD_FACTOR."""
    ref_model = peft_twin(copy.deepcopy(base).double(), model).double()
    ref = loss_and_grads(ref_model, peft_params(ref_model, model))
    peft_model = peft_twin(base, model)  # wraps `base` in place
    ours = loss_and_grads(model, adapter_parameters(model))
    theirs = loss_and_grads(peft_model, peft_params(peft_model, model))
    assert len(ours) == len(theirs) == len(ref)
    assert all(t.dtype == torch.float32 for t in ours)
    eps = torch.finfo(torch.float32).eps
    for i, (a, b, r) in enumerate(zip(ours, theirs, ref, strict=True)):
        err, err_peft = ((t.double() - r).norm().item() / r.norm().item() for t in (a, b))
        factor = 2.0 if i < 2 else GRAD_FACTOR
        assert err <= factor * err_peft + 4 * eps, (i, err, err_peft)


def peft_params(peft_model: nn.Module, model: nn.Module) -> list[nn.Parameter]:
    """PEFT's A/B parameters in the same order as fastmid's adapter_parameters(model)."""
    named = dict(peft_model.base_model.model.named_modules())
    out = []
    for name, m in model.named_modules():
        if isinstance(m, LoraLinear):
            out += [named[name].lora_A["default"].weight, named[name].lora_B["default"].weight]
    return out


# ---------------------------------------------------------------------------------------------
# Band and rank


@pytest.mark.parametrize(
    ("num_layers", "first", "last"), [(16, 3, 11), (30, 6, 23), (32, 6, 24), (40, 8, 31)]
)
def test_band_table_matches_the_papers_five_segment_rule(num_layers, first, last):
    assert resolve_band((0.2, 0.8), num_layers) == list(range(first, last + 1))


def test_band_uses_exact_arithmetic():
    # 0.6 * 10 is 5.999999999999999 in floats; the band must still start at layer 6.
    assert resolve_band((0.6, 1.0), 10) == [6, 7, 8, 9]
    assert resolve_band((0.3, 0.7), 10) == [3, 4, 5, 6]
    assert resolve_band([0.6, 1.0], 10) == [6, 7, 8, 9]  # YAML gives lists, not tuples


def test_band_all_and_explicit_lists():
    assert resolve_band("all", 4) == [0, 1, 2, 3]
    assert resolve_band([5, 1, 3], 8) == [1, 3, 5]
    assert resolve_band((0, 1), 3) == [0, 1, 2]


def test_budget_matched_rank():
    # The paper's example: L=32, 19 active layers, budget 64 -> 107.
    assert resolve_rank(None, 64, 32, 19) == 107
    assert resolve_rank(None, 64, 30, 18) == 106
    assert resolve_rank(None, 8, 10, 10) == 8
    assert resolve_rank(5, 64, 32, 19) == 5


@pytest.mark.parametrize(
    ("band", "message"),
    [
        ((0.0, 0.05), "selects no layer"),
        ((0.5, 0.5), "below its end"),
        ((0.8, 0.2), "below its end"),
        ((-0.1, 0.5), r"in \[0, 1\]"),
        ((0.2, 1.5), r"in \[0, 1\]"),
        ((0.2, float("nan")), r"in \[0, 1\]"),
        ([], "empty list"),
        ([2, 10], "outside the layers 0..9"),
        ([2, 2], "twice"),
        ("middle", "band must be"),
        ((0.1, 0.2, 0.3), "band must be"),
    ],
)
def test_bad_band_is_one_clear_error(band, message):
    with pytest.raises(UserError, match=message):
        resolve_band(band, 10)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (dict(rank=0), "rank must be a positive integer"),
        (dict(rank=-3), "rank must be a positive integer"),
        (dict(rank=33), r"rank 33 is larger than k_proj of layer 2 \(32x64\); use rank <= 32"),
        (dict(rank_budget=0), "rank_budget must be a positive integer"),
        (dict(targets=("q_proj", "qkv_proj")), "unknown target 'qkv_proj'"),
        (dict(targets=()), "targets must name at least one"),
        (dict(dropout=1.0), "dropout must be in"),
        (dict(band=(0.9, 0.95)), "selects no layer"),
    ],
)
def test_bad_config_is_one_clear_error_and_leaves_model_untouched(cfg, message):
    model = tiny_model("llama")
    with pytest.raises(UserError, match=message):
        apply_midblock(model, MidBlockConfig(**cfg))
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_budget_rank_wider_than_a_layer_is_clamped_to_its_width():
    # Budget 16 over 1 of 10 layers -> rank 160, wider than k_proj (32 outputs x 64 inputs).
    model = apply_midblock(tiny_model("llama"), MidBlockConfig(band=[4], rank_budget=16))
    state = model.fastmid_state
    assert state.rank == 32
    assert {m.rank for _, _, m in lora_modules(model)} == {32}
    assert state.rank_note == (
        "rank 160 from the budget is wider than k_proj of layer 4 (32x64); using rank 32"
    )
    # Within the width nothing is clamped or said.
    fits = apply_midblock(tiny_model("llama"), MidBlockConfig(band=[4], rank_budget=2))
    assert (fits.fastmid_state.rank, fits.fastmid_state.rank_note) == (20, None)


def test_explicit_rank_wider_than_a_layer_is_an_error():
    with pytest.raises(UserError, match=r"rank 33 is larger than k_proj of layer 4 \(32x64\)"):
        apply_midblock(tiny_model("llama"), MidBlockConfig(band=[4], rank=33))


def test_unknown_layout_names_what_was_found():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stack = nn.ModuleList([nn.Linear(4, 4), nn.ReLU()])

    with pytest.raises(UserError, match=r"unknown model layout for Odd.*stack\[2\]"):
        apply_midblock(Odd(), MidBlockConfig())


def test_target_missing_from_the_family_names_its_linears():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=5, num_attention_heads=4,
        intermediate_size=64,
    )  # fmt: skip
    with pytest.raises(UserError, match=r"'q_proj' not found in layer 1 .*query_key_value"):
        apply_midblock(GPTNeoXForCausalLM(config), MidBlockConfig())


def test_patching_twice_is_refused():
    model, _ = patched()
    with pytest.raises(UserError, match="already patched"):
        apply_midblock(model, MidBlockConfig())


# ---------------------------------------------------------------------------------------------
# Structure


def test_state_modules_and_trainable_set():
    model, _ = patched(rank=None, rank_budget=6)
    state = model.fastmid_state
    assert state.layers == [2, 3, 4, 5, 6, 7]
    assert state.rank == 10  # floor(6 * 10 / 6)
    assert state.scale == pytest.approx(128 / 10)
    names = [(i, t) for i, t, _ in lora_modules(model)]
    assert names == [(i, t) for i in range(2, 8) for t in ("q_proj", "k_proj", "v_proj", "o_proj")]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in adapter_parameters(model)}
    assert len(trainable) == 6 * 4 * 2
    for _, _, m in lora_modules(model):
        assert m.lora_A.dtype == torch.float32 and m.lora_B.shape == (m.out_features, 10)
    assert find_decoder_layers(model) is model.model.layers
    # Liger is CUDA-only: on CPU no frozen norm or MLP gets another forward.
    frozen = model.model.layers[9]
    assert not any("forward" in m.__dict__ for m in frozen.modules())


def test_fresh_adapters_leave_the_model_unchanged_and_take_over_weights():
    model = tiny_model("qwen2")
    base = copy.deepcopy(model)
    q_weight = model.model.layers[4].self_attn.o_proj.weight
    apply_midblock(model, MidBlockConfig(rank=4))
    # o_proj is not grouped: its LoraLinear holds the very same Parameter, no copy.
    assert model.model.layers[4].self_attn.o_proj.weight is q_weight
    assert torch.count_nonzero(model.model.layers[4].self_attn.q_proj.lora_A) > 0
    ids, _ = batch()
    torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=1e-5)


def test_grouped_qkv_weights_are_views_into_one_matrix():
    model, base = patched("qwen2", targets=ALL, rank=4)
    attn, ref = model.model.layers[3].self_attn, base.model.layers[3].self_attn
    storages = {
        m.weight.untyped_storage().data_ptr() for m in (attn.q_proj, attn.k_proj, attn.v_proj)
    }
    assert len(storages) == 1  # one shared frozen matrix, not three plus a concatenation
    assert attn.q_proj.weight.untyped_storage().nbytes() == 4 * (64 + 32 + 32) * 64
    torch.testing.assert_close(attn.v_proj.weight, ref.v_proj.weight, rtol=0, atol=0)
    torch.testing.assert_close(attn.k_proj.bias, ref.k_proj.bias, rtol=0, atol=0)
    assert "forward" in model.model.layers[3].mlp.__dict__  # SwiGLU MLP runs lora_gate_up


def test_gemma2_gelu_mlp_keeps_its_own_forward():
    model, _ = patched("gemma2", targets=ALL, rank=4)
    assert "forward" not in model.model.layers[3].mlp.__dict__


# ---------------------------------------------------------------------------------------------
# Numerical equivalence with PEFT (identical LoRA weights, B non-zero, dropout 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_peft_logits_loss_and_every_lora_grad(family):
    model, base = patched(family, targets=ALL, rank=4, alpha=16)
    with torch.no_grad():
        base_logits = base(batch()[0]).logits
        ours_logits = model(batch()[0]).logits
    assert len(adapter_parameters(model)) == 6 * 7 * 2
    # The adapters change the logits by far more than the tolerance, so a missing or
    # misplaced adapter cannot pass.
    assert (ours_logits - base_logits).abs().max() > 1e-2
    assert_as_accurate_as_peft(model, base)


def test_ungrouped_path_matches_grouped_path():
    grouped, base = patched("llama", targets=ALL, rank=4, band=(0.3, 0.7))
    separate, _ = patched("llama", targets=ALL, rank=4, band=(0.3, 0.7), fuse_groups=False)
    assert is_fused(grouped) and not is_fused(separate)
    assert_as_accurate_as_peft(grouped, copy.deepcopy(base))
    assert_as_accurate_as_peft(separate, base)


def test_all_layers_band_matches_peft():
    model, base = patched("mistral", band="all", rank=2, num_layers=3, use_rslora=True)
    assert model.fastmid_state.scale == pytest.approx(128 / 2**0.5)
    assert_as_accurate_as_peft(model, base)


def test_interpreted_triton_kernels_match_torch_path(monkeypatch):
    model, _ = patched("llama", num_layers=3, targets=ALL, rank=2, band=[1])
    ref = loss_and_grads(model, adapter_parameters(model))
    monkeypatch.setattr(kernel_dispatch, "INTERPRET", True)
    got = loss_and_grads(model, adapter_parameters(model))
    for a, b in zip(got, ref, strict=True):
        assert_close(a, b)


def to_bf16_base(model: nn.Module) -> None:
    """Frozen weights to bf16 in place; LoRA weights stay fp32 (the trainer's CPU setup)."""
    for name, p in model.named_parameters():
        if "lora_" not in name:
            p.data = p.data.to(torch.bfloat16)


def test_bf16_base_under_autocast_is_as_accurate_as_peft():
    model, base = patched("llama", targets=ALL, rank=4)
    peft_model = peft_twin(base, model)
    ref = loss_and_grads(model, adapter_parameters(model))  # fp32 reference
    to_bf16_base(model)
    to_bf16_base(peft_model)
    assert model.model.layers[3].self_attn.q_proj.weight.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = loss_and_grads(model, adapter_parameters(model))
        theirs = loss_and_grads(peft_model, peft_params(peft_model, model))
    assert all(g.dtype == torch.float32 for g in ours[2:])

    # Error against fp32 at most ~2x what stock PEFT gets wrong in the same precision, for the
    # logits, the loss and all LoRA gradients together (single near-zero gradients of a random
    # model are mostly bf16 rounding noise, for PEFT as much as for fastmid).
    def rel_err(got: tuple[torch.Tensor, ...], part: slice) -> float:
        a = torch.cat([t.float().flatten() for t in got[part]])
        b = torch.cat([t.flatten() for t in ref[part]])
        return ((a - b).norm() / b.norm()).item()

    for part in (slice(0, 1), slice(1, 2), slice(2, None)):
        assert rel_err(ours, part) <= 2 * rel_err(theirs, part) + 1e-3


# ---------------------------------------------------------------------------------------------
# Work actually skipped


def saved_bytes_per_block(
    model: nn.Module, blocks: nn.ModuleList, embeds: torch.Tensor | None = None
) -> dict[int, tuple[int, int]]:
    """{block: (tensors saved for backward, activation bytes)} over one training step.

    Bytes count each saved activation once and leave out parameters, which backward keeps
    alive anyway; ``embeds`` replaces the token ids by input embeddings.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    counts = {i: [0, {}] for i in range(len(blocks))}
    current: list[int | None] = [None]
    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(lambda *_, i=i: current.__setitem__(0, i)))
        handles.append(block.register_forward_hook(lambda *_: current.__setitem__(0, None)))

    def pack(t: torch.Tensor) -> torch.Tensor:
        if current[0] is not None:
            counts[current[0]][0] += 1
            if t.untyped_storage().data_ptr() not in params:
                key = (t.data_ptr(), t.shape, t.stride())
                counts[current[0]][1][key] = t.numel() * t.element_size()
        return t

    ids, labels = batch(t=32)
    inputs = {"input_ids": ids} if embeds is None else {"inputs_embeds": embeds}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**inputs, labels=labels, use_cache=False).loss
    loss.backward()
    for h in handles:
        h.remove()
    return {i: (c, sum(b.values())) for i, (c, b) in counts.items()}


def test_nothing_saved_below_the_band_and_no_frozen_grads():
    model, base = patched("llama", band=(0.3, 0.8), targets=ALL)
    seen_inputs = []
    first = model.model.layers[3]
    hook = first.register_forward_pre_hook(lambda _m, args: seen_inputs.append(args[0]))
    saved = saved_bytes_per_block(model, model.model.layers)
    hook.remove()
    assert [saved[i][0] for i in range(3)] == [0, 0, 0]
    assert all(saved[i][0] > 0 for i in range(3, 10))
    # The lowest adapted layer gets an input that needs no grad, so its kernels skip dx.
    assert seen_inputs and not seen_inputs[0].requires_grad
    for name, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name

    # Same band with PEFT: the fused gate/up recomputes silu instead of keeping both
    # pre-activations, so every adapted block keeps fewer activation bytes.
    peft_model = peft_twin(base, model)
    peft_saved = saved_bytes_per_block(peft_model, peft_model.base_model.model.model.layers)
    assert all(saved[i][1] < peft_saved[i][1] for i in range(3, 8))
    assert all(saved[i][1] == peft_saved[i][1] for i in range(8, 10))


def test_blocks_below_the_band_skip_autograd_even_for_inputs_needing_grad():
    # e.g. embeddings from a trainable prompt: stock LoRA would record the frozen blocks.
    model, base = patched("qwen3", band=(0.5, 1.0))
    embeds = model.model.embed_tokens(batch(t=32)[0]).detach().requires_grad_(True)
    saved = saved_bytes_per_block(model, model.model.layers, embeds)
    assert [saved[i][0] for i in range(5)] == [0] * 5
    assert embeds.grad is None
    peft_model = peft_twin(base, model)
    layers = peft_model.base_model.model.model.layers
    peft_saved = saved_bytes_per_block(peft_model, layers, embeds.detach().requires_grad_(True))
    assert all(peft_saved[i][0] > 0 for i in range(5))


def test_gradient_checkpointing_saves_less_and_keeps_grads_with_dropout():
    plain, _ = patched("llama", dropout=0.1)
    ckpt, _ = patched("llama", dropout=0.1, gradient_checkpointing=True)
    plain.train()
    ckpt.train()
    torch.manual_seed(3)
    ref = loss_and_grads(plain, adapter_parameters(plain))
    torch.manual_seed(3)
    got = loss_and_grads(ckpt, adapter_parameters(ckpt))
    for a, b in zip(got, ref, strict=True):
        assert_close(a, b)
    saved_plain = saved_bytes_per_block(plain, plain.model.layers)
    saved_ckpt = saved_bytes_per_block(ckpt, ckpt.model.layers)
    assert [saved_ckpt[i][0] for i in range(2)] == [0, 0]
    # A checkpointed block keeps only its inputs: far fewer tensors than a plain block.
    assert all(saved_ckpt[i][0] < saved_plain[i][0] / 4 for i in range(2, 10))


def test_dropout_is_active_in_training_only():
    model, _ = patched("llama", dropout=0.3)
    ids, _ = batch()
    model.eval()
    torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)
    model.train()
    torch.manual_seed(1)
    a = model(ids).logits
    torch.manual_seed(2)
    b = model(ids).logits
    torch.manual_seed(1)
    c = model(ids).logits
    assert (a - b).abs().max() > 1e-3
    torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_qkv_group_serves_any_call_order():
    grouped, _ = patched("qwen2", rank=4)
    separate, _ = patched("qwen2", rank=4, fuse_groups=False)
    attn, ref = grouped.model.layers[4].self_attn, separate.model.layers[4].self_attn
    x, y = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    with torch.no_grad():
        # v first, then q twice (the second call recomputes), k on another input, then k on x.
        calls = [("v_proj", x), ("q_proj", x), ("q_proj", x), ("k_proj", y), ("k_proj", x)]
        for name, inp in calls:
            got = getattr(attn, name)(inp)
            assert_close(got, getattr(ref, name)(inp), rel=1e-5)


def test_deepcopy_of_a_patched_model_runs_its_own_modules():
    # Instance-level forwards (below-band no-grad, fused SwiGLU, label-only loss) must call the
    # copy's modules, or the copy's adapters get no gradient and the original's get them.
    model, _ = patched(targets=ALL, gradient_checkpointing=True)
    twin = copy.deepcopy(model)
    ids, labels = batch()
    twin(input_ids=ids, labels=labels).loss.backward()
    assert all(p.grad is None for p in adapter_parameters(model))
    grads = [p.grad for p in adapter_parameters(twin)]
    assert all(g is not None for g in grads) and any(g.abs().max() > 0 for g in grads)
    want = torch.autograd.grad(model(input_ids=ids, labels=labels).loss, adapter_parameters(model))
    for got, ref in zip(grads, want, strict=True):
        torch.testing.assert_close(got, ref)
