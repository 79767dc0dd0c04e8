"""fastmid inside Hugging Face ``Trainer`` and TRL's ``SFTTrainer``.

Patch the model, then hand it to :class:`MidBlockTrainer` (a ``transformers.Trainer``) or
``MidBlockSFTTrainer`` (a ``trl.SFTTrainer``, defined when TRL is installed)::

    cfg = MidBlockTrainingConfig(band=(0.2, 0.8), rank=16, equalize_updates=True)
    model = fastmid.apply_midblock(model, cfg)
    trainer = MidBlockTrainer(model=model, args=TrainingArguments(...), train_dataset=...)
    trainer.train()            # or trainer.train(resume_from_checkpoint=True)
    trainer.save_model("out")  # out/adapter_config.json + out/adapter_model.safetensors

What the trainers add to their base class (:class:`MidBlockTrainerMixin`, which a custom
``Trainer`` subclass can mix in the same way):

- **Optimizer**: ``apply_midblock`` leaves only the LoRA factors with ``requires_grad``, and
  ``Trainer`` builds its optimizer from exactly those parameters. ``create_optimizer`` then
  checks that the optimizer holds every adapter parameter and nothing else (a user-supplied
  optimizer over ``model.parameters()`` is refused with one line).
- **Saving**: ``save_model()`` and every checkpoint write the adapter in PEFT format with
  :func:`fastmid.save_adapter` (``adapter_config.json`` + ``adapter_model.safetensors``, the files
  of ``fastmid train``'s ``adapter/``) and the tokenizer, never the frozen base weights.
  Checkpoints keep ``Trainer``'s own ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth`` and
  ``trainer_state.json`` beside it.
- **Resuming**: ``Trainer.train(resume_from_checkpoint=...)`` restores the model through
  ``_load_from_checkpoint`` (and ``load_best_model_at_end`` through ``_load_best_model``), which
  know full weights and ``PeftModel`` adapters only; both are overridden to read the adapter with
  :func:`fastmid.load_adapter` into the patched model, in place, before ``Trainer`` builds the
  optimizer and loads its state, scheduler and RNG state as usual.
- **Loss**: ``Trainer.compute_loss`` calls ``model(**inputs)`` with labels, which on a patched
  model in training mode is fastmid's label-only loss: the LM head runs on the labelled positions
  only, in chunks, and ``outputs.logits`` is ``None``. ``Trainer`` passes ``num_items_in_batch``,
  so gradient accumulation normalises over all the step's label tokens. Label smoothing and a
  ``compute_loss_func`` read the full logits, so :class:`MidBlockTrainer` refuses them.
  Padding-free batches (``DataCollatorWithFlattening``: one row, ``position_ids`` restarting at
  0 per example, no attention mask) keep examples apart: transformers builds the block-diagonal
  mask from the ``position_ids`` only when no KV cache is in use: the label-only forward leaves
  the cache out, and ``Trainer`` sets ``model.config.use_cache`` to ``args.use_cache`` (False by
  default), which evaluation's full forward follows.
- **Equal-step updates**: with ``equalize_updates=True`` in :class:`MidBlockTrainingConfig` (the
  config given to ``apply_midblock``), :class:`EqualizeUpdatesCallback` wraps every optimizer
  step as ``fastmid train --equalize-updates`` does (after gradient clipping).

TRL's ``SFTTrainer``: older releases computed the token-accuracy metric from
``outputs.logits[..., :-1, :]`` of the model's own forward, which is ``None`` on a patched model in
training. TRL 1.16 (``trl/trainer/sft_trainer.py``) no longer does: ``SFTTrainer.__init__``
calls ``trl.trainer.utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))``,
which replaces the instance's ``forward`` with one that, called as
``model(**inputs, fused_lm_head=True)`` by ``compute_loss``, runs ``model.base_model`` (the patched
decoder: frozen blocks skipped below the band, adapters in it) and scores only the next-token
labels through the head weight in tiles, never the ``(B, T, V)`` logits; ``mean_token_accuracy``
and ``entropy`` come from its ``is_top1``/``entropy`` fields. That head also never builds the full
logits, so
``MidBlockSFTTrainer`` keeps it (dropping it would cost the metrics for nothing) and the loss is
still computed without full logits. Without ``fused_lm_head`` the forward is fastmid's label-only
one, as in ``Trainer``. A TRL without ``add_fused_lm_head`` (whose ``compute_loss`` reads
``outputs.logits``) is refused when ``MidBlockSFTTrainer`` is first used.

Not supported here: FSDP and DeepSpeed (their save and load paths gather full state dicts;
``fastmid train --parallel fsdp`` does that), and ``peft_config`` (the model already has its
adapters). ``TrainingArguments(gradient_checkpointing=True)`` (on by default in ``SFTConfig``)
works, but ``MidBlockConfig(gradient_checkpointing=True)`` recomputes only the band and the
blocks above it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from fastmid import MidBlockConfig, UserError, adapter_parameters, load_adapter, save_adapter
from fastmid.engine.equalize import UpdateEqualizer
from fastmid.engine.midblock import midblock_state

# MidBlockSFTTrainer is also public; it is made by the module __getattr__ below.
__all__ = [
    "EqualizeUpdatesCallback",
    "MidBlockTrainer",
    "MidBlockTrainerMixin",
    "MidBlockTrainingConfig",
]


@dataclass
class MidBlockTrainingConfig(MidBlockConfig):
    """:class:`fastmid.MidBlockConfig` plus the update rule, so one object holds the band, rank
    and targets given to ``apply_midblock`` and what the trainer does at each optimizer step."""

    equalize_updates: bool = field(
        default=False,
        metadata={
            "help": "rescale each layer's update so ‖ΔW‖/‖W‖ is equal across layers every step"
        },
    )


class EqualizeUpdatesCallback(TrainerCallback):
    """Equal-step control (:class:`fastmid.engine.equalize.UpdateEqualizer`) around each
    ``optimizer.step()`` of a ``Trainer``: after gradient clipping, before the scheduler."""

    def __init__(self, model: nn.Module) -> None:
        self.equalizer = UpdateEqualizer(model)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.equalizer.before_step()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.equalizer.after_step()


class MidBlockTrainerMixin:
    """Adapter-only optimizer check, PEFT-format saving and adapter resuming for a ``Trainer``
    subclass (see the module docstring); it goes first: ``class T(MidBlockTrainerMixin, Trainer)``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        state = midblock_state(self.model)  # one clear line for a model never patched
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise UserError(
                f"{type(self).__name__} does not support FSDP or DeepSpeed; "
                "use DDP (torchrun) or fastmid train --parallel fsdp"
            )
        if getattr(state.config, "equalize_updates", False):
            self.add_callback(EqualizeUpdatesCallback(self.model))

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(*args, **kwargs)
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        adapters = {id(p) for p in adapter_parameters(self.model)}
        if held != adapters:
            raise UserError(
                f"the optimizer holds {len(held - adapters)} parameters that are not fastmid "
                f"adapters and misses {len(adapters - held)} adapter parameters; build it from "
                "fastmid.adapter_parameters(model) or let the trainer create it"
            )
        return optimizer

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Replaces Trainer's full-weight save_pretrained: the base is frozen and unchanged.
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        save_adapter(self.model, output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        load_adapter(self.model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_adapter(self.model, self.state.best_model_checkpoint)


class MidBlockTrainer(MidBlockTrainerMixin, Trainer):
    """``transformers.Trainer`` for a model patched by ``apply_midblock``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.label_smoother is not None or self.compute_loss_func is not None:
            raise UserError(
                "label_smoothing_factor and compute_loss_func need the full logits, which a "
                "fastmid model in training does not build; leave them unset"
            )


@functools.cache
def _sft_trainer_class() -> type:
    try:
        import trl
        from trl import SFTTrainer
        from trl.trainer import utils as trl_utils
    except ImportError as e:
        raise ImportError("MidBlockSFTTrainer needs TRL: pip install trl") from e
    if not hasattr(trl_utils, "add_fused_lm_head"):
        raise ImportError(
            f"TRL {trl.__version__}'s SFTTrainer computes its token accuracy from "
            "outputs.logits, which a fastmid model in training does not return; "
            "MidBlockSFTTrainer needs a TRL with trl.trainer.utils.add_fused_lm_head (1.16 does)"
        )

    class MidBlockSFTTrainer(MidBlockTrainerMixin, SFTTrainer):
        """``trl.SFTTrainer`` for a model patched by ``apply_midblock`` (TRL's fused,
        label-only LM head computes the loss and the token metrics)."""

        def __init__(self, *args: Any, peft_config: Any = None, **kwargs: Any) -> None:
            if peft_config is not None:
                raise UserError(
                    "peft_config: the model already has fastmid adapters (apply_midblock)"
                )
            super().__init__(*args, **kwargs)

    MidBlockSFTTrainer.__module__ = __name__
    MidBlockSFTTrainer.__qualname__ = "MidBlockSFTTrainer"
    return MidBlockSFTTrainer


def __getattr__(name: str) -> Any:
    # MidBlockSFTTrainer subclasses trl.SFTTrainer, so it exists only once TRL is imported.
    if name == "MidBlockSFTTrainer":
        return _sft_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
