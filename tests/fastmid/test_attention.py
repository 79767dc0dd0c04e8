"""Varlen attention: packed rows give SDPA's block-diagonal result, faster, with no leakage."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastmid.engine import attention
from fastmid.engine.attention import VARLEN_ATTENTION, enable_varlen_attention
from fastmid.engine.midblock import MidBlockConfig, adapter_parameters, apply_midblock
from tests.fastmid._tiny import randomize_adapters, tiny_model

VARLEN_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "olmo2")
# Lengths of the packed examples: two of equal length exercise the batched call.
LENGTHS = (5, 9, 5, 7)


def _packed(lengths: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (1, sum(lengths)), generator=gen)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    return ids, pos


def _pair(family: str) -> tuple[nn.Module, nn.Module]:
    """The same patched tiny model twice: plain SDPA and varlen attention."""
    model = tiny_model(family, num_layers=3)
    apply_midblock(model, MidBlockConfig(rank=4, dropout=0.0))
    randomize_adapters(model)
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("sdpa")
    enable_varlen_attention(model)
    return ref, model


def _logits_and_grads(
    model: nn.Module, ids: torch.Tensor, pos: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    (logits * weights).sum().backward()
    return logits.detach(), [p.grad.clone() for p in adapter_parameters(model)]


@pytest.fixture
def no_delegation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if a call that should take the varlen path falls back to plain SDPA."""

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("packed call was delegated to sdpa")

    monkeypatch.setattr(attention, "sdpa_attention_forward", fail)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("family", VARLEN_FAMILIES)
def test_packed_matches_sdpa_block_diagonal(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Logits and every LoRA grad agree with SDPA's block-diagonal result.

    The fp32 LoRA grads sum many large terms that cancel, so plain SDPA itself differs from
    eager attention by up to ~1e-4 relative; the varlen grads must be as close to eager as
    SDPA's are (2x, plus a small floor).
    """
    ref, model = _pair(family)
    eager = copy.deepcopy(ref)
    eager.set_attn_implementation("eager")
    ids, pos = _packed(LENGTHS)
    want_logits, want_grads = _logits_and_grads(ref, ids, pos)
    _, exact_grads = _logits_and_grads(eager, ids, pos)
    delegated = attention.sdpa_attention_forward
    monkeypatch.setattr(attention, "sdpa_attention_forward", None)  # must not be reached
    got_logits, got_grads = _logits_and_grads(model, ids, pos)
    monkeypatch.setattr(attention, "sdpa_attention_forward", delegated)
    torch.testing.assert_close(got_logits, want_logits)
    assert len(got_grads) == len(want_grads) > 0
    for got, want, exact in zip(got_grads, want_grads, exact_grads, strict=True):
        assert exact.abs().sum() > 0
        assert _rel_err(got, exact) <= 2 * _rel_err(want, exact) + 1e-5


@pytest.mark.parametrize("family", ("qwen3",))
def test_packed_matches_each_example_alone(family: str) -> None:
    _, model = _pair(family)
    ids, pos = _packed(LENGTHS)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        start = 0
        for n in LENGTHS:
            alone = model(input_ids=ids[:, start : start + n], use_cache=False).logits
            torch.testing.assert_close(packed[:, start : start + n], alone)
            start += n


def _leaks(model: nn.Module) -> bool:
    """Whether changing the first example's tokens changes the second example's logits."""
    ids, pos = _packed((6, 8))
    other = ids.clone()
    other[0, :6] = (other[0, :6] + 17) % 250 + 3
    with torch.no_grad():
        a = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        b = model(input_ids=other, position_ids=pos, use_cache=False).logits
    assert not torch.allclose(a[:, :6], b[:, :6])  # the perturbation does reach example 1
    return not torch.equal(a[:, 6:], b[:, 6:])


def test_no_leakage_between_examples(no_delegation: None, monkeypatch: pytest.MonkeyPatch) -> None:
    _, model = _pair("llama")
    assert not _leaks(model)
    # The check catches leakage: one causal segment over the whole row lets example 2 see 1.
    monkeypatch.setattr(attention, "_packed_segments", lambda q, *_: [(0, q.shape[2])])
    assert _leaks(model)


def test_non_packed_padding_mask_is_honoured() -> None:
    """A caller's padding mask on a row with restarting positions is not dropped."""
    ref, model = _pair("llama")
    ids, pos = _packed(LENGTHS)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        want = ref(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False).logits
        got = model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("family", ("qwen2",))
def test_generation_with_left_padding_and_cache(family: str) -> None:
    ref, model = _pair(family)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 256, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    ids[0, :3] = 0
    mask[0, :3] = 0
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=True)
    want = ref.generate(input_ids=ids, attention_mask=mask, **kwargs)
    got = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(got, want)


def test_softcapped_family_stays_on_its_attention() -> None:
    model = tiny_model("gemma2", num_layers=2)
    enable_varlen_attention(model)
    assert model.config._attn_implementation == "eager"
    llama = tiny_model("llama", num_layers=2)
    enable_varlen_attention(llama)
    assert llama.config._attn_implementation == VARLEN_ATTENTION


def _windowed_pair(window: int | None) -> tuple[nn.Module, nn.Module]:
    """A patched tiny Mistral with attention window ``window``: plain SDPA and varlen."""
    model = tiny_model("mistral", num_layers=3, sliding_window=window)
    apply_midblock(model, MidBlockConfig(rank=4, dropout=0.0))
    randomize_adapters(model)
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("sdpa")
    enable_varlen_attention(model)
    return ref, model


def test_sliding_window_longer_than_an_example_falls_back_to_sdpa(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Per-example causal SDPA ignores a sliding window, so a packed row holding an example
    longer than the window goes to transformers' SDPA (which applies it); shorter ones stay."""
    ref, model = _windowed_pair(window=6)
    real = attention.sdpa_attention_forward
    delegated: list[int] = []

    def counting(*args: object, **kwargs: object):
        delegated.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "sdpa_attention_forward", counting)
    with torch.no_grad():
        ids, pos = _packed((5, 6, 4))  # every example fits in the window
        got = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        assert delegated == []
        want = ref(input_ids=ids, position_ids=pos, use_cache=False).logits
        torch.testing.assert_close(got, want)

        ids, pos = _packed(LENGTHS)  # a 9-token example: the window cuts into it
        delegated.clear()
        got = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        assert len(delegated) == 3  # every layer fell back
        delegated.clear()
        want = ref(input_ids=ids, position_ids=pos, use_cache=False).logits
        torch.testing.assert_close(got, want)
        # The window is real here: without it the long example's last tokens come out otherwise.
        _, unwindowed = _windowed_pair(window=None)
        plain = unwindowed(input_ids=ids, position_ids=pos, use_cache=False).logits
    long_example = slice(LENGTHS[0] + 6, LENGTHS[0] + LENGTHS[1])
    assert (plain[:, long_example] - got[:, long_example]).abs().max() > 1e-3
    torch.testing.assert_close(plain[:, : LENGTHS[0]], got[:, : LENGTHS[0]])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("length", [1, 7, 100])
def test_half_precision_cpu_attention_takes_the_fp32_kernel(dtype: torch.dtype, length: int):
    # Output and every gradient as close to the fp64 result as the half-precision kernel's own,
    # and only half-precision activations (plus the fp32 log-sum-exp) saved for backward.
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(2, h, length, 64, generator=gen, dtype=torch.float64) for h in (9, 3, 3))
    grad = torch.randn(2, 9, length, 64, generator=gen, dtype=torch.float64)

    def run(fn, dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(grad.to(dt))
        return [out.double()] + [t.grad.double() for t in leaves]

    def sdpa(a, b, c):
        return F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True)

    def ours(a, b, c):
        return attention._causal_attention(a, b, c, 0.0, None)

    exact, half, got_all = run(sdpa, torch.float64), run(sdpa, dtype), run(ours, dtype)
    for name, want, theirs, got in zip(
        ("out", "dq", "dk", "dv"), exact, half, got_all, strict=True
    ):
        bound = 1.25 * (theirs - want).abs().max() + 1e-6
        assert (got - want).abs().max() <= bound, name
    node = ours(*(t.to(dtype).requires_grad_() for t in (q, k, v))).grad_fn
    assert type(node).__name__ == "_Fp32CausalAttentionBackward"
    assert [t.dtype for t in node.saved_tensors] == [dtype] * 4 + [torch.float32]


@pytest.mark.parametrize("family", ("llama", "qwen2"))
def test_right_padded_rows_run_causal_attention_with_the_same_real_rows(
    family: str, no_delegation: None
) -> None:
    # HF-collator batches (right padding): the mask is dropped for plain causal attention, and
    # every real position's logits and the adapters' grads match masked SDPA.
    ref, model = _pair(family)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 256, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    mask[2, 10:] = 0
    weights = torch.randn(3, 12, ref.config.vocab_size, generator=gen) * mask[..., None]

    def run(m: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
        m.zero_grad()
        logits = m(input_ids=ids, attention_mask=mask, use_cache=False).logits
        (logits * weights).sum().backward()
        return logits.detach(), [p.grad.clone() for p in adapter_parameters(m)]

    want, want_grads = run(ref)
    got, got_grads = run(model)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real])
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_left_padding_keeps_the_mask() -> None:
    # Pads before real tokens are not a causal pattern: the call goes to masked SDPA.
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :2] = False
    idx = torch.arange(6)
    full = (idx[:, None] >= idx[None, :]) & mask[:, None, :]
    assert not attention._is_right_padded_causal(full[:, None])
    right = (idx[:, None] >= idx[None, :]) & mask.flip(1)[:, None, :]
    assert attention._is_right_padded_causal(right[:, None])


def test_masks_and_positions_made_in_inference_mode_are_read_without_a_cache() -> None:
    # Inference tensors carry no version counter: evaluation under torch.inference_mode works.
    ref, model = _pair("llama")
    ids = torch.randint(3, 256, (2, 8), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.inference_mode():
        want = ref(input_ids=ids, attention_mask=mask, use_cache=False).logits
        got = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        packed_ids, pos = _packed(LENGTHS)
        model(input_ids=packed_ids, position_ids=pos, use_cache=False)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()])
