"""How a run is cut into steps: the step plan, the learning-rate schedule and the packed
micro-batches of each epoch. Pure functions of the config, the data size and the seed, so a
resumed run rebuilds exactly the steps and batches an uninterrupted one would have had."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fastmid.recipe.config import TrainConfig
from fastmid.recipe.data import Example, pack_batches


@dataclass(frozen=True)
class StepPlan:
    """How long the run is: optimizer steps, micro-batches, warmup."""

    micro_per_epoch: int
    grad_accum: int
    total_steps: int
    total_micro: int
    warmup_steps: int

    def micro_ids(self, step: int) -> range:
        """Global micro-batch numbers of optimizer step ``step`` (the last step may be short)."""
        first = step * self.grad_accum
        return range(first, min(first + self.grad_accum, self.total_micro))


def plan_steps(micro_per_epoch: int, cfg: TrainConfig) -> StepPlan:
    """The run's length from the data size and the config: ``max_steps`` steps of
    ``grad_accum`` micro-batches, else every micro-batch of ``epochs`` epochs."""
    if cfg.max_steps is not None:
        total_steps = cfg.max_steps
        total_micro = total_steps * cfg.grad_accum
    else:
        total_micro = micro_per_epoch * (cfg.epochs or 1)
        total_steps = math.ceil(total_micro / cfg.grad_accum)
    warmup = cfg.warmup_steps
    if warmup is None:
        # Rounded up, but never every step: a 1-step run trains at the peak lr.
        warmup = min(math.ceil(cfg.warmup_ratio * total_steps), total_steps - 1)
    return StepPlan(micro_per_epoch, cfg.grad_accum, total_steps, total_micro, warmup)


def lr_lambda(total_steps: int, warmup_steps: int, schedule: str) -> Callable[[int], float]:
    """Multiplier of the peak lr at each step: linear warmup, then linear/cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return factor


def make_scheduler(
    optimizer: torch.optim.Optimizer, plan: StepPlan, schedule: str
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup then ``schedule`` decay over the planned steps (see :func:`lr_lambda`)."""
    factor = lr_lambda(plan.total_steps, plan.warmup_steps, schedule)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class EpochBatches:
    """Packed micro-batches (example indices) per epoch. Each epoch's order is a pure function
    of (seed, epoch), so a resumed run rebuilds exactly the batches it would have had."""

    def __init__(self, examples: list[Example], batch_tokens: int, seed: int) -> None:
        self._examples = examples
        self._batch_tokens = batch_tokens
        self._seed = seed
        self._cached: tuple[int, list[list[int]]] | None = None

    def epoch(self, epoch: int) -> list[list[int]]:
        if self._cached is None or self._cached[0] != epoch:
            bins = pack_batches(self._examples, self._batch_tokens, self._seed, epoch=epoch)
            self._cached = (epoch, bins)
        return self._cached[1]

    def for_step(self, plan: StepPlan, step: int) -> list[list[int]]:
        """The micro-batches of optimizer step ``step``, in order."""
        per = plan.micro_per_epoch
        return [self.epoch(g // per)[g % per] for g in plan.micro_ids(step)]


def micro_batch_seed(run_seed: int, step: int, index: int) -> int:
    """The RNG seed of micro-batch ``index`` of optimizer step ``step``: a pure function of the
    three, so whichever rank computes a micro-batch draws the same dropout masks for it."""
    words = [run_seed & (2**64 - 1), step, index]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> 1)
