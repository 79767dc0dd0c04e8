"""The label-only loss: chunked head + cross-entropy against the full-logits formula, and a
patched model called as ``model(input_ids=..., labels=...)`` against transformers' own loss."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmid.engine.loss import IGNORE_INDEX, linear_cross_entropy
from fastmid.engine.midblock import (
    MidBlockConfig,
    adapter_parameters,
    apply_midblock,
    unpatch_forwards,
)
from tests.fastmid._tiny import randomize_adapters, tiny_model
from tests.kernels._tolerance import assert_within_torch_error


def _full_logits_loss(hidden, head, labels, softcap):
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, labels, reduction="sum")


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunk", [7, 1000])
def test_chunked_linear_cross_entropy_matches_full_logits(softcap, chunk):
    gen = torch.Generator().manual_seed(3)
    n, h, v = 41, 24, 97
    head = nn.Linear(h, v, bias=False).requires_grad_(False)
    head.weight.copy_(torch.randn(v, h, generator=gen))
    hidden = torch.randn(n, h, generator=gen)
    labels = torch.randint(0, v, (n,), generator=gen)
    results = {}
    for name, dtype in (("fp32", torch.float32), ("fp64", torch.float64)):
        x = hidden.to(dtype).requires_grad_(True)
        lin = nn.Linear(h, v, bias=False, dtype=dtype).requires_grad_(False)
        lin.weight.copy_(head.weight)
        ours = linear_cross_entropy(x, lin, labels, softcap, chunk=chunk)
        (grad,) = torch.autograd.grad(2.5 * ours, x)
        y = x.detach().requires_grad_(True)
        ref = _full_logits_loss(y, lin, labels, softcap)
        (ref_grad,) = torch.autograd.grad(2.5 * ref, y)
        results[name] = (ours, grad, ref, ref_grad)
    ours, grad, ref32, ref_grad32 = results["fp32"]
    _, _, ref64, ref_grad64 = results["fp64"]
    assert_within_torch_error("loss", ours.reshape(1), ref64.reshape(1), ref32.reshape(1))
    assert_within_torch_error("grad", grad, ref_grad64, ref_grad32)


def test_trainable_head_gets_its_weight_gradient():
    # A model fastmid did not patch keeps a trainable head: the loss must not cut its gradient.
    gen = torch.Generator().manual_seed(4)
    head = nn.Linear(8, 13, bias=True)
    hidden = torch.randn(9, 8, generator=gen)
    labels = torch.randint(0, 13, (9,), generator=gen)
    ours = linear_cross_entropy(hidden, head, labels, softcap=2.0)
    (grad,) = torch.autograd.grad(ours, head.weight)
    ref = _full_logits_loss(hidden, head, labels, 2.0)
    (ref_grad,) = torch.autograd.grad(ref, head.weight)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(grad, ref_grad)
    assert grad.abs().max() > 0


def test_linear_cross_entropy_without_labels_is_a_differentiable_zero():
    head = nn.Linear(8, 11, bias=False).requires_grad_(False)
    x = torch.randn(0, 8, requires_grad=True)
    loss = linear_cross_entropy(x, head, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and x.grad.shape == (0, 8)


def _batch(vocab: int):
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, vocab, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # a right-padded row
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :5] = IGNORE_INDEX  # a prompt without loss
    return ids, mask, labels


def _patched(family: str, **overrides):
    model = tiny_model(family, **overrides)
    apply_midblock(model, MidBlockConfig(band=(0.2, 0.8), rank=4, dropout=0.0))
    randomize_adapters(model)
    return model


def _loss_and_grads(model, **inputs):
    out = model(**inputs)
    grads = torch.autograd.grad(out.loss, adapter_parameters(model))
    return out, grads


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_label_only_forward_gives_transformers_loss_and_gradients(family: str):
    # A cap near the logits' size (about 0.5 here), so capping changes the loss.
    extra = {"final_logit_softcapping": 0.3} if family == "gemma2" else {}
    model = _patched(family, **extra)
    ids, mask, labels = _batch(model.config.vocab_size)
    # Eval mode runs the model's own forward (full logits, HF's shifted mean CE); with dropout 0
    # the two modes compute the same function, so they must agree.
    want, want_grads = _loss_and_grads(
        model.eval(), input_ids=ids, attention_mask=mask, labels=labels
    )
    assert want.logits.shape == (*ids.shape, model.config.vocab_size)
    got, got_grads = _loss_and_grads(
        model.train(), input_ids=ids, attention_mask=mask, labels=labels
    )
    assert got.logits is None
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        # fp32 sums in another order: an error small against the tensor's own scale.
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * float(w.abs().max()))
    if family == "gemma2":
        # The soft-cap really is applied: without it the loss would differ.
        model.config.final_logit_softcapping = None
        uncapped = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        assert (uncapped - got.loss).abs() > 1e-3


def test_label_only_forward_takes_every_calling_convention():
    model = _patched("llama").train()
    ids, mask, labels = _batch(model.config.vocab_size)
    with torch.no_grad():
        mean = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        positional = model(ids, mask, labels=labels).loss
        # HF Trainer's gradient accumulation passes the label count of the whole step.
        summed = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=100)
        as_tuple = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
        # No labels: the logits of every position, as transformers returns them.
        logits = model(input_ids=ids, attention_mask=mask).logits
    n = int((labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(positional, mean)
    torch.testing.assert_close(summed.loss, mean * n / 100)
    torch.testing.assert_close(as_tuple[0], mean)
    assert logits.shape == (*ids.shape, model.config.vocab_size)


def test_label_only_forward_is_not_installed_where_the_head_formula_differs():
    # Llama's forward ignores final_logit_softcapping; the label-only path would apply it, so
    # the probe at patch time must see the mismatch and keep the model's own forward.
    model = _patched("llama", final_logit_softcapping=1.0).train()
    ids, mask, labels = _batch(model.config.vocab_size)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is not None
    assert "forward" not in model.__dict__


def test_unpatch_restores_the_model_forward():
    model = _patched("llama").train()
    assert "forward" in model.__dict__
    unpatch_forwards(model)
    ids, mask, labels = _batch(model.config.vocab_size)
    with torch.no_grad():
        assert model(input_ids=ids, attention_mask=mask, labels=labels).logits is not None


@pytest.mark.gpu
def test_liger_fused_loss_matches_on_cuda():
    pytest.importorskip("liger_kernel")
    gen = torch.Generator().manual_seed(3)
    head = nn.Linear(64, 500, bias=False).requires_grad_(False)
    head.weight.copy_(torch.randn(500, 64, generator=gen))
    hidden = torch.randn(300, 64, generator=gen)
    labels = torch.randint(0, 500, (300,), generator=gen)
    for softcap in (None, 5.0):
        x = hidden.cuda().requires_grad_(True)
        lin = head.cuda()
        got = linear_cross_entropy(x, lin, labels.cuda(), softcap)
        (grad,) = torch.autograd.grad(got, x)
        y = hidden.double().requires_grad_(True)
        ref = _full_logits_loss(y, head.double(), labels, softcap)
        (ref_grad,) = torch.autograd.grad(ref, y)
        torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(grad.double().cpu(), ref_grad, rtol=1e-3, atol=1e-4)


def test_trainable_head_gets_its_gradient():
    gen = torch.Generator().manual_seed(4)
    head = nn.Linear(6, 13)
    hidden = torch.randn(9, 6, generator=gen, requires_grad=True)
    labels = torch.randint(0, 13, (9,), generator=gen)
    loss = linear_cross_entropy(hidden, head, labels, chunk=4)
    want = _full_logits_loss(hidden, head, labels, None)
    torch.testing.assert_close(loss, want)
    got = torch.autograd.grad(loss, [hidden, head.weight, head.bias])
    ref = torch.autograd.grad(want, [hidden, head.weight, head.bias])
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r)


class _StandInLigerLoss(nn.Module):
    """Liger's ``LigerFusedLinearCrossEntropyLoss`` interface (constructor keywords, then
    ``forward(lin_weight, _input, target, bias=None)``), its math in plain torch."""

    made: ClassVar[list[dict]] = []

    def __init__(self, ignore_index=-100, lse_square_scale=0.0, label_smoothing=0.0,
                 reduction="mean", softcap=None):  # fmt: skip
        super().__init__()
        _StandInLigerLoss.made.append(dict(ignore_index=ignore_index, reduction=reduction,
                                           softcap=softcap))  # fmt: skip
        self.ignore_index, self.reduction, self.softcap = ignore_index, reduction, softcap

    def forward(self, lin_weight, _input, target, bias=None):
        assert lin_weight.shape[1] == _input.shape[1] and target.shape == _input.shape[:1]
        logits = (_input @ lin_weight.T).float()
        if bias is not None:
            logits = logits + bias.float()
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return F.cross_entropy(
            logits, target, ignore_index=self.ignore_index, reduction=self.reduction
        )


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_liger_fused_loss_gets_the_head_the_rows_the_labels_and_the_cap(monkeypatch, softcap):
    from fastmid.engine import loss as loss_mod

    # Where Liger runs (CUDA with liger_kernel), linear_cross_entropy hands it everything; on
    # this CPU a stand-in with Liger's interface takes its place.
    assert loss_mod._liger_loss(torch.device("cpu")) is None
    monkeypatch.setattr(loss_mod, "_liger_loss", lambda device: _StandInLigerLoss)
    monkeypatch.setattr(_StandInLigerLoss, "made", [])
    gen = torch.Generator().manual_seed(6)
    head = nn.Linear(16, 37, bias=True).requires_grad_(False)
    head.weight.copy_(torch.randn(37, 16, generator=gen))
    head.bias.copy_(torch.randn(37, generator=gen) * 3)  # large: a dropped bias shows
    hidden = torch.randn(23, 16, generator=gen, requires_grad=True)
    labels = torch.randint(0, 37, (23,), generator=gen)
    got = linear_cross_entropy(hidden, head, labels, softcap)
    (grad,) = torch.autograd.grad(got, hidden)
    assert _StandInLigerLoss.made == [dict(ignore_index=-100, reduction="sum", softcap=softcap)]
    x = hidden.detach().requires_grad_(True)
    want = _full_logits_loss(x, head, labels, softcap)
    (want_grad,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, want_grad)
    # The same numbers as fastmid's own chunked path, which runs without the stand-in.
    monkeypatch.setattr(loss_mod, "_liger_loss", lambda device: None)
    torch.testing.assert_close(linear_cross_entropy(hidden, head, labels, softcap), want)


def test_label_only_forward_with_left_padding_matches_transformers():
    model = _patched("llama")
    ids, _, labels = _batch(model.config.vocab_size)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left-padded rows, as generation-style collators build them
    mask[2, :2] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    want, want_grads = _loss_and_grads(
        model.eval(), input_ids=ids, attention_mask=mask, labels=labels
    )
    got, got_grads = _loss_and_grads(
        model.train(), input_ids=ids, attention_mask=mask, labels=labels
    )
    assert got.logits is None
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * float(w.abs().max()))


def test_label_only_forward_takes_shift_labels_and_leaves_logits_to_keep_alone():
    from fastmid.engine.loss import shift_labels

    model = _patched("llama")
    ids, mask, labels = _batch(model.config.vocab_size)
    # Pre-shifted targets (what sequence-parallel trainers pass) with fewer labelled positions.
    shifted = shift_labels(labels).contiguous()
    shifted[:, 8:] = IGNORE_INDEX
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shifted)
    with torch.no_grad():
        want = model.eval()(**inputs).loss
        got = model.train()(**inputs)
        plain = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert got.logits is None
    torch.testing.assert_close(got.loss, want, rtol=1e-5, atol=1e-6)
    assert (got.loss - plain).abs() > 1e-3  # the given targets were used, not labels shifted
    # logits_to_keep asks for logits: the model's own forward runs and returns them, with
    # its own loss (here every position is kept, so the loss is the full one).
    keep_all = ids.shape[1]
    with torch.no_grad():
        kept = model.train()(
            input_ids=ids, attention_mask=mask, labels=labels, logits_to_keep=keep_all
        )
        full = model.eval()(input_ids=ids, attention_mask=mask, labels=labels)
    assert kept.logits.shape == (*ids.shape, model.config.vocab_size)
    torch.testing.assert_close(kept.logits, full.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kept.loss, full.loss, rtol=1e-5, atol=1e-6)
