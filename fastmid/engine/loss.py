"""The training loss: decoder body everywhere, LM head only where a label exists.

Two entry points share one head-and-loss function, :func:`linear_cross_entropy`:

- :func:`forward_loss` is the trainer's: packed batches whose targets are already shifted;
- :func:`install_label_only_loss` makes ``model(input_ids=..., labels=...)`` (HF Trainer, TRL,
  a user's loop) do the same on an ``apply_midblock`` model: labels shifted as transformers
  does (-100 ignored), the head applied to the labelled positions only, cross-entropy in
  chunks. In training mode the returned ``logits`` are ``None`` (as Liger and Unsloth do):
  the full (B, T, V) tensor is exactly what this path exists to avoid. In eval mode (and
  without labels) the model's own forward runs unchanged and returns its logits, so
  evaluation loops that read ``outputs.logits`` keep working.

``linear_cross_entropy`` never holds fp32 logits for more than one chunk of rows: the
gradient with respect to the hidden states is computed chunk by chunk during the forward (the
head is frozen, so that is all backward needs) and backward only scales it. On CUDA with
``liger_kernel`` installed, Liger's fused linear cross-entropy does the same in Triton.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# The target of a position that carries no loss (cross-entropy's ignore_index).
IGNORE_INDEX = -100

# Rows of one logits chunk: 256 x vocab 49k fp32 is 48 MiB, small beside a step's
# activations, and large enough that the head GEMM stays efficient.
CHUNK_ROWS = 256
# Keyword arguments of transformers' loss functions, which the decoder body must not see.
_LOSS_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index")


# --------------------------------------------------------------------------------------------
# Head + cross-entropy on selected rows


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed CE of ``softcap(hidden Wᵀ + b)`` against ``labels``, one row chunk at a time.

    Forward computes, per chunk, ``z = h Wᵀ`` in fp32, the loss ``lse(z) - z[y]`` and, when
    ``hidden`` needs a gradient, ``dh = (softmax(z) - onehot(y)) · dz/dz_raw · W``. Only ``dh``
    (the size of ``hidden``) is saved; the frozen head gets no gradient.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        softcap: float | None,
        chunk: int,
        need_grad: bool,
    ) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            y = labels[start : start + chunk]
            z = F.linear(h, weight, bias).float()
            if softcap:
                t = torch.tanh(z / softcap)
                z = t * softcap
            lse = torch.logsumexp(z, dim=-1)
            total += (lse - z.gather(1, y[:, None]).squeeze(1)).sum()
            if grad_hidden is not None:
                # softmax - onehot, in place over the chunk's logits buffer.
                g = z.sub_(lse[:, None]).exp_()
                g[torch.arange(g.shape[0], device=g.device), y] -= 1.0
                if softcap:
                    g.mul_(1.0 - t * t)
                grad_hidden[start : start + chunk] = g.to(weight.dtype) @ weight
        if grad_hidden is not None:
            ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        d_hidden = grad_hidden * grad_out.to(grad_hidden.dtype)
        grads = {"hidden": d_hidden}
        return tuple(
            grads.get(n)
            for n in ("hidden", "weight", "bias", "labels", "softcap", "chunk", "need_grad")
        )


def _liger_loss(device: torch.device) -> Any:
    """Liger's fused linear cross-entropy module class where it runs: CUDA, liger_kernel."""
    if device.type != "cuda":
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss


def linear_cross_entropy(
    hidden: torch.Tensor,
    head: nn.Linear,
    labels: torch.Tensor,
    softcap: float | None = None,
    chunk: int = CHUNK_ROWS,
) -> torch.Tensor:
    """Summed cross-entropy of ``softcap(head(hidden))`` against ``labels``.

    ``hidden`` (n, H) holds only rows that carry a label, ``labels`` (n,). With a frozen head
    (fastmid never trains it): Liger's fused kernel on CUDA when installed, otherwise chunked
    torch that never holds more than ``chunk`` rows of fp32 logits. A head that needs a
    gradient gets plain autograd over the full logits.
    """
    if torch.is_grad_enabled() and any(p.requires_grad for p in head.parameters()):
        # A trainable head needs its own gradient: plain autograd over the full logits.
        logits = head(hidden).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits, labels, reduction="sum")
    liger = _liger_loss(hidden.device)
    if liger is not None:
        loss_fn = liger(ignore_index=IGNORE_INDEX, reduction="sum", softcap=softcap)
        return loss_fn(head.weight, hidden, labels, head.bias)
    if hidden.shape[0] == 0:
        # Nothing to predict: a zero that still belongs to the graph (backward gives zeros).
        return hidden.float().sum() * 0.0
    # Grad mode is off inside Function.forward, so whether backward will come is decided here.
    need_grad = hidden.requires_grad and torch.is_grad_enabled()
    return _ChunkedLinearCrossEntropy.apply(
        hidden, head.weight, head.bias, labels, softcap, chunk, need_grad
    )


def _softcap(model: nn.Module) -> float | None:
    return getattr(model.config, "final_logit_softcapping", None) or None


def label_loss(
    model: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    label_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """(summed CE, label count) of ``model``'s head on ``hidden`` (..., H) where ``targets``
    (already shifted, same leading shape) is not -100.

    ``label_index``, the flat positions of those labels when the caller knows them (the
    collator does), spares the ``nonzero`` that would otherwise find them: a host sync.
    """
    flat = targets.reshape(-1)
    index = label_index
    if index is None:
        index = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
    labels = flat.index_select(0, index)
    head = model.get_output_embeddings()
    return linear_cross_entropy(picked, head, labels, _softcap(model)), int(index.numel())


# --------------------------------------------------------------------------------------------
# The trainer's loss


def forward_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the label positions of ``batch`` and how many there are.

    ``batch["targets"]`` is already shifted (targets[t] is the token to predict at t; -100 =
    no loss). Packed batches carry ``position_ids`` restarting at 0 per example and no
    ``attention_mask``, so examples never see each other; with the host-side ``cu_seqlens``
    and ``label_index`` of the trainer's packed collator the forward and the loss never wait
    for the device (no mask, no ``nonzero``). The LM head (the largest matmul of a small
    model) runs only on the hidden states that carry a label.
    """
    # Imported here: the attention module imports transformers, which this module leaves to
    # its callers (importing it is slow and noisy).
    from fastmid.engine.attention import packed_forward

    body = model.get_decoder()
    cu_seqlens = batch.get("cu_seqlens")
    packed = nullcontext({}) if cu_seqlens is None else packed_forward(model, cu_seqlens)
    with packed as extra:
        out = body(
            input_ids=batch["input_ids"],
            position_ids=batch.get("position_ids"),
            attention_mask=batch.get("attention_mask"),
            use_cache=False,
            **extra,
        )
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    return label_loss(model, hidden, batch["targets"], batch.get("label_index"))


# --------------------------------------------------------------------------------------------
# model(input_ids=..., labels=...) for every caller


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets per position as transformers shifts them: position t predicts labels[t + 1]."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def _label_only_forward(
    model: nn.Module, forward: Callable[..., Any], active: Callable[[], bool] | None = None
) -> Callable[..., Any]:
    """``forward`` with the LM head applied only at label positions when called with labels
    while ``active()`` (default: the model is in training mode)."""
    active = active or (lambda: model.training)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    signature = inspect.signature(forward)
    var_kw = next(
        (n for n, p in signature.parameters.items() if p.kind is inspect.Parameter.VAR_KEYWORD),
        None,
    )

    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(*args, **kwargs).arguments
        except TypeError:
            return forward(*args, **kwargs)  # let the model raise its own error
        params = dict(bound)
        params.update(params.pop(var_kw, {}) if var_kw else {})
        labels = params.pop("labels", None)
        keep = params.pop("logits_to_keep", 0)
        return_dict = params.pop("return_dict", None)
        if labels is None or not active() or not (isinstance(keep, int) and keep == 0):
            return forward(*args, **kwargs)
        num_items = params.pop("num_items_in_batch", None)
        targets = params.pop("shift_labels", None)
        params.pop("ignore_index", None)
        targets = shift_labels(labels) if targets is None else targets
        if params.get("use_cache") is None:
            # A training step has no use for a KV cache, and with one transformers ignores
            # position_ids restarting per example: packed rows would attend across examples.
            params["use_cache"] = False
        out = model.get_decoder()(**params)
        loss_sum, count = label_loss(model, out.last_hidden_state, targets.to(labels.device))
        denom = num_items if num_items is not None else max(count, 1)
        if torch.is_tensor(denom):
            denom = denom.to(loss_sum.device)
        output = CausalLMOutputWithPast(
            loss=loss_sum / denom,
            logits=None,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )
        return output.to_tuple() if return_dict is False else output

    return run


def _head_matches(model: nn.Module, forward: Callable[..., Any]) -> bool:
    """Whether the label-only path gives this model's own loss (checked once on a probe).

    Families that scale or otherwise post-process their logits beyond a final soft-cap would
    silently get another loss, so the formula is checked on four tokens rather than trusted.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or not hasattr(model, "get_decoder"):
        return False
    params = list(model.parameters())
    if any(p.is_meta or type(p.data) is not torch.Tensor for p in params):
        return False  # meta or fake weights (memory estimates): nothing to compute with
    ids = torch.arange(1, 5, device=head.weight.device)[None] % model.config.vocab_size
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            expected = forward(input_ids=ids, labels=ids, use_cache=False).loss
            probe = _label_only_forward(model, forward, active=lambda: True)
            got = probe(input_ids=ids, labels=ids, use_cache=False)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return bool(torch.allclose(got.loss.float(), expected.float(), rtol=1e-4, atol=1e-5))


def install_label_only_loss(model: nn.Module, wrap: Callable[..., None]) -> bool:
    """Give ``model`` (this instance only) the label-only loss forward; False if it does not fit.

    ``wrap(module, make)`` installs ``make(module, module.forward)`` as the instance's forward (the
    patcher's wrapper, so unpatching restores the original).
    """
    if not _head_matches(model, model.forward):
        return False
    wrap(model, _label_only_forward)
    return True
