"""Held-out loss: the mean negative log-likelihood per answer token of tokenized records.

At small scale it separates runs long before accuracy on a few dozen problems can; the training
loop logs it every ``eval_every`` steps and ``fastmid compare`` ranks placements by it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fastmid.engine.loss import forward_loss
from fastmid.recipe.data import Example, collate_padded


@torch.no_grad()
def answer_nll(model: Any, examples: Sequence[Example], pad_id: int, batch_size: int = 16) -> float:
    """Mean NLL per label token of ``examples`` (right-padded batches; the model's mode is kept)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate_padded(list(examples[start : start + batch_size]), pad_id)
            loss_sum, n = forward_loss(model, {k: v.to(device) for k, v in batch.items()})
            total += float(loss_sum)
            count += n
    finally:
        model.train(was_training)
    return total / max(count, 1)
