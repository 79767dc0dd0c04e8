"""Varlen attention: packed rows give SDPA's block-diagonal result, faster, with no leakage."""

from __future__ import annotations

import copy
import itertools

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
    whole_row = lambda q, *_: attention.PackedRows.from_bounds([0, q.shape[2]])
    monkeypatch.setattr(attention, "_packed_rows", whole_row)
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
        packed = model(input_ids=packed_ids, position_ids=pos, use_cache=False).logits
        ends = torch.tensor(LENGTHS).cumsum(0).tolist()
        alone = [
            ref(input_ids=packed_ids[:, end - n : end], use_cache=False).logits
            for n, end in zip(LENGTHS, ends, strict=True)
        ]
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()])
    # The packed batch's block-diagonal mask built under inference mode too: each example's
    # logits are those of the example run alone.
    torch.testing.assert_close(packed, torch.cat(alone, dim=1))


# --------------------------------------------------------------------------------------------
# Packed rows with host-side boundaries (the trainer's path)


def _packed_batch(lengths: tuple[int, ...]) -> dict[str, torch.Tensor]:
    from fastmid.recipe.data import Example, collate_packed

    ids, _ = _packed(lengths)
    examples, start = [], 0
    for n in lengths:
        row = ids[0, start : start + n].tolist()
        examples.append(Example(row, [*row[1:], -100]))
        start += n
    return collate_packed(examples)


@pytest.mark.parametrize(
    ("device", "dtype", "head_dim", "dropout", "torch_has", "flash_has", "want"),
    [
        ("cuda", torch.bfloat16, 64, 0.0, True, True, "torch"),
        ("cuda", torch.float16, 128, 0.0, True, False, "torch"),
        ("cuda", torch.bfloat16, 64, 0.1, True, True, "flash_attn"),  # torch's has no dropout
        ("cuda", torch.bfloat16, 64, 0.1, True, False, "sdpa"),
        ("cuda", torch.bfloat16, 64, 0.0, False, True, "flash_attn"),
        ("cuda", torch.bfloat16, 64, 0.0, False, False, "sdpa"),
        ("cuda", torch.float32, 64, 0.0, True, True, "sdpa"),  # flash kernels: half only
        ("cuda", torch.bfloat16, 60, 0.0, True, True, "sdpa"),  # head dim not a multiple of 8
        ("cuda", torch.bfloat16, 320, 0.0, True, True, "sdpa"),  # head dim over 256
        ("cpu", torch.bfloat16, 64, 0.0, True, True, "sdpa"),  # CPU: per-example SDPA
    ],
)
def test_varlen_backend_choice(
    monkeypatch: pytest.MonkeyPatch,
    device: str,
    dtype: torch.dtype,
    head_dim: int,
    dropout: float,
    torch_has: bool,
    flash_has: bool,
    want: str,
) -> None:
    monkeypatch.setattr(attention, "_torch_varlen", lambda: object() if torch_has else None)
    monkeypatch.setattr(attention, "_flash_varlen", lambda: object() if flash_has else None)
    monkeypatch.setattr(attention, "_flash_capable", lambda d: True)
    assert attention.varlen_backend(torch.device(device), dtype, head_dim, dropout) == want


def test_varlen_backend_needs_an_sm80_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "_torch_varlen", lambda: object())
    monkeypatch.setattr(attention, "_flash_capable", lambda d: False)
    assert attention.varlen_backend(torch.device("cuda"), torch.bfloat16, 64, 0.0) == "sdpa"


def test_this_torch_has_varlen_attention_and_cpu_does_not_take_it() -> None:
    # torch 2.13 ships torch.nn.attention.varlen; its kernel is aten's CUDA flash attention.
    assert attention._torch_varlen() is not None
    q = torch.randn(6, 2, 16, dtype=torch.bfloat16)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(NotImplementedError):
        attention._torch_varlen()(q, q, q, cu, cu, 4, 4, window_size=(-1, 0))


def test_packed_rows_from_cu_seqlens() -> None:
    rows = attention.packed_rows(torch.tensor([0, 5, 14, 19, 26], dtype=torch.int32))
    assert rows.segments == [(0, 5), (5, 14), (14, 19), (19, 26)]
    assert (rows.max_len, rows.total) == (9, 26)
    assert rows.cu_seqlens_on(torch.device("cpu")).tolist() == [0, 5, 14, 19, 26]
    for bad in ([0], [1, 4], [0, 4, 4], [0, 5, 3]):
        with pytest.raises(ValueError, match="cu_seqlens"):
            attention.packed_rows(torch.tensor(bad, dtype=torch.int32))


def _reference_varlen(calls: list[dict]):
    """A CPU stand-in with varlen_attn's signature: causal SDPA per segment of cu_seqlens, so
    the layout, head and boundary plumbing around the real CUDA kernel can run here."""
    import torch.nn.functional as F

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size, enable_gqa):
        calls.append(dict(shape=tuple(q.shape), cu=cu_q.tolist(), max_q=max_q, gqa=enable_gqa))
        assert window_size == (-1, 0) and torch.equal(cu_q, cu_k) and max_q == max_k
        out = torch.empty_like(q)
        bounds = cu_q.tolist()
        for s, e in itertools.pairwise(bounds):
            x = [t[s:e].transpose(0, 1)[None] for t in (q, k, v)]
            o = F.scaled_dot_product_attention(*x, is_causal=True, scale=scale, enable_gqa=True)
            out[s:e] = o[0].transpose(0, 1)
        return out

    return varlen


def test_one_varlen_call_per_layer_matches_per_example_sdpa(
    monkeypatch: pytest.MonkeyPatch, no_delegation: None
) -> None:
    """The varlen route (tokens-major layout, GQA, cu_seqlens, output layout) gives what
    per-example SDPA gives, with one call per layer; the kernel is a CPU stand-in here."""
    from fastmid.engine.loss import forward_loss

    _, model = _pair("llama")
    batch = _packed_batch(LENGTHS)

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss, n = forward_loss(model, batch)
        assert n == sum(LENGTHS) - len(LENGTHS)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in adapter_parameters(model)]

    want, want_grads = loss_and_grads()
    calls: list[dict] = []
    monkeypatch.setattr(attention, "_torch_varlen", lambda: _reference_varlen(calls))
    monkeypatch.setattr(attention, "varlen_backend", lambda *a: "torch")
    got, got_grads = loss_and_grads()
    assert len(calls) == 3  # one per layer
    assert calls[0] == dict(shape=(sum(LENGTHS), 4, 16), cu=[0, 5, 14, 19, 26], max_q=9, gqa=True)
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w)


def test_packed_forward_builds_no_mask_and_matches_position_ids_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the collator's cu_seqlens no mask is built and nothing is read off position_ids;
    the loss equals the one found from position_ids alone (mask built and checked)."""
    import transformers.masking_utils as mu

    from fastmid.engine.loss import forward_loss

    _, model = _pair("qwen2")
    batch = _packed_batch(LENGTHS)
    positions_only = {k: batch[k] for k in ("input_ids", "position_ids", "targets")}
    with torch.no_grad():
        want, n_want = forward_loss(model, positions_only)
    masks: list[int] = []
    real_find = mu.find_packed_sequence_indices

    def counting_find(position_ids: torch.Tensor):
        masks.append(1)
        return real_find(position_ids)

    monkeypatch.setattr(mu, "find_packed_sequence_indices", counting_find)
    with torch.no_grad():
        got, n_got = forward_loss(model, batch)
    assert masks == []
    assert model.config._attn_implementation == VARLEN_ATTENTION  # restored afterwards
    assert n_got == n_want == sum(LENGTHS) - len(LENGTHS)
    torch.testing.assert_close(got, want)
    # The counter sees the mask path: without cu_seqlens transformers inspects the positions.
    with torch.no_grad():
        forward_loss(model, positions_only)
    assert masks == [1]


def test_cu_seqlens_that_do_not_cover_the_row_are_refused() -> None:
    from fastmid.engine.loss import forward_loss

    _, model = _pair("llama")
    batch = _packed_batch(LENGTHS)
    batch["cu_seqlens"] = torch.tensor([0, 5, 14], dtype=torch.int32)
    with pytest.raises(ValueError, match="covers 14 positions, the row has 26"):
        forward_loss(model, batch)
    assert model.config._attn_implementation == VARLEN_ATTENTION


def test_block_causal_mask_is_compared_once_per_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    # Callers with position ids only: the mask check (a host sync on a GPU) runs once, not
    # once per layer.
    _, model = _pair("llama")
    ids, pos = _packed(LENGTHS)
    checks: list[int] = []
    real = attention._is_block_causal.compute

    def counting(mask: torch.Tensor, segments: tuple) -> bool:
        checks.append(1)
        return real(mask, segments)

    monkeypatch.setattr(attention._is_block_causal, "compute", counting)
    with torch.no_grad():
        model(input_ids=ids, position_ids=pos, use_cache=False)
    assert checks == [1]


def _cuda_case(family: str, dtype: torch.dtype, lengths: tuple[int, ...]):
    from fastmid.engine.loss import forward_loss

    model = tiny_model(family, num_layers=2, head_dim=64).to("cuda", dtype)
    apply_midblock(model, MidBlockConfig(rank=4, dropout=0.0))
    randomize_adapters(model)
    enable_varlen_attention(model)
    from fastmid.recipe.data import batch_to

    batch = batch_to(_packed_batch(lengths), "cuda")

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss, _ = forward_loss(model, batch)
        loss.backward()
        return loss.detach().float(), [p.grad.float().clone() for p in adapter_parameters(model)]

    return run


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "flash_attn"])
def test_cuda_varlen_matches_per_example_sdpa(backend: str, monkeypatch: pytest.MonkeyPatch):
    if backend == "flash_attn" and attention._flash_varlen() is None:
        pytest.skip("flash-attn is not installed")
    run = _cuda_case("llama", torch.bfloat16, (37, 129, 37, 300, 1))
    monkeypatch.setattr(attention, "varlen_backend", lambda *a: "sdpa")
    want, want_grads = run()
    monkeypatch.setattr(attention, "varlen_backend", lambda *a: backend)
    got, got_grads = run()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-2)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert _rel_err(g, w) < 2e-2


@pytest.mark.gpu
def test_cuda_packed_step_takes_torch_varlen_without_a_sync() -> None:
    assert attention.varlen_backend(torch.device("cuda"), torch.bfloat16, 64, 0.0) == "torch"
    run = _cuda_case("qwen2", torch.bfloat16, (64, 200, 17))
    run()  # warm-up: lazy initialisation may synchronize
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
