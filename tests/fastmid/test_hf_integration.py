"""fastmid inside transformers' Trainer and TRL's SFTTrainer: a few steps on a tiny Llama."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn
from transformers import DataCollatorWithFlattening, TrainerCallback, TrainingArguments

from fastmid.engine.adapters import CONFIG_NAME, WEIGHTS_NAME, save_adapter
from fastmid.engine.midblock import (
    MidBlockConfig,
    adapter_parameters,
    apply_midblock,
    lora_modules,
)
from fastmid.errors import UserError
from fastmid.integrations.hf import (
    EqualizeUpdatesCallback,
    MidBlockTrainer,
    MidBlockTrainingConfig,
)
from tests.fastmid._runs import RECORDS, make_tokenizer
from tests.fastmid._tiny import randomize_adapters, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread_torch_path")

try:
    import trl
except ImportError:
    trl = None
needs_trl = pytest.mark.skipif(
    trl is None,
    reason="trl is not installed (it is in fastmid's dev extra); MidBlockSFTTrainer subclasses "
    "trl.SFTTrainer",
)

ADAPTER_FILES = {CONFIG_NAME, WEIGHTS_NAME}
# What Trainer writes beside the model in every checkpoint.
TRAINER_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"}


def patched(**cfg) -> nn.Module:
    """A 4-layer tiny Llama with adapters on layers 1 and 2."""
    model = tiny_model("llama", 4, initializer_range=0.2)
    settings = {"band": (0.25, 0.75), "rank": 4, "alpha": 8.0, "dropout": 0.0, **cfg}
    return apply_midblock(model, MidBlockTrainingConfig(**settings))


def counting_sequences(n: int = 8) -> Dataset:
    """Rows the tiny model can learn in a few steps: runs of consecutive token ids."""
    rows = [list(range(3 + 7 * i, 3 + 7 * i + 6 + i % 3)) for i in range(n)]
    return Dataset.from_list([{"input_ids": r, "labels": r} for r in rows])


def training_args(out: Path, **over) -> TrainingArguments:
    values = dict(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_steps=2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    values.update(over)
    return TrainingArguments(**values)


def trainer_for(model: nn.Module, out: Path, **over) -> MidBlockTrainer:
    return MidBlockTrainer(
        model=model,
        args=training_args(out, **over),
        train_dataset=counting_sequences(),
        data_collator=DataCollatorWithFlattening(),
    )


def losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def frozen_state(model: nn.Module) -> dict[str, torch.Tensor]:
    adapters = {id(p) for p in adapter_parameters(model)}
    return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in adapters}


def count_head_calls(model: nn.Module) -> list[tuple[int, ...]]:
    """Shapes of every output of the LM head module (the full-logits path goes through it)."""
    calls: list[tuple[int, ...]] = []
    model.get_output_embeddings().register_forward_hook(lambda m, i, o: calls.append(o.shape))
    return calls


def adapter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * 4 for p in adapter_parameters(model))


def check_adapter_dir(path: Path, model: nn.Module, extra: set[str] = frozenset()) -> None:
    """``path`` holds the PEFT adapter of ``model`` (plus ``extra`` files) and no base weight."""
    assert {f.name for f in path.iterdir()} == ADAPTER_FILES | extra
    size = (path / WEIGHTS_NAME).stat().st_size
    # fp32 A and B plus the safetensors header (a few KiB): 21 KiB here, the base is 1.6 MB.
    assert adapter_bytes(model) < size < adapter_bytes(model) + 16_384
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert size * 20 < base_bytes
    keys = load_file(path / WEIGHTS_NAME).keys()
    assert keys and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)


# --------------------------------------------------------------------------------------------
# Trainer


def test_trainer_trains_only_adapters_and_saves_peft_adapters(tmp_path):
    model = patched()
    frozen = frozen_state(model)
    head_calls = count_head_calls(model)
    trainer = trainer_for(model, tmp_path / "run")
    trainer.train()

    steps = losses(trainer)
    assert list(steps) == [1, 2, 3, 4]
    assert steps[4] < steps[1] - 0.2, steps
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in adapter_parameters(model)}
    for name, value in frozen_state(model).items():
        assert torch.equal(value, frozen[name]), name
    # Training went through the label-only loss: the head module never produced logits.
    assert head_calls == []

    for step in (2, 4):
        check_adapter_dir(tmp_path / "run" / f"checkpoint-{step}", model, TRAINER_FILES)
    trainer.save_model(str(tmp_path / "final"))
    check_adapter_dir(tmp_path / "final", model)


def test_saved_adapter_gives_the_same_logits_in_peft(tmp_path):
    model = patched()
    base = copy.deepcopy(model)  # the frozen weights, before the adapters train
    trainer = trainer_for(model, tmp_path / "run")
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))

    fresh = tiny_model("llama", 4, initializer_range=0.2)
    peft_model = PeftModel.from_pretrained(fresh, str(tmp_path / "final")).eval()
    ids = torch.tensor([[3, 4, 5, 6, 7, 40, 41, 42]])
    model.eval()
    with torch.no_grad():
        ours, theirs = model(ids).logits, peft_model(ids).logits
        untrained = base.eval()(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (ours - untrained).abs().max() > 1e-2  # the adapters moved the output


def test_resume_continues_with_the_losses_of_an_uninterrupted_run(tmp_path):
    # Dropout on: the resumed run also needs the restored RNG state to match.
    whole = trainer_for(patched(dropout=0.1), tmp_path / "whole")
    whole.train()

    # Another adapter init: the checkpoint's adapter must replace it.
    torch.manual_seed(99)
    model = patched(dropout=0.1)
    resumed = trainer_for(model, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))

    expected, got = losses(whole), losses(resumed)
    assert list(got) == [1, 2, 3, 4]  # steps 1 and 2 from the checkpoint's trainer state
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], rel=1e-6)
    for a, b in zip(adapter_parameters(whole.model), adapter_parameters(model), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_resume_without_the_adapter_restore_would_differ(tmp_path):
    # The check above can fail: loading the optimizer state alone leaves the fresh adapters.
    whole = trainer_for(patched(), tmp_path / "whole")
    whole.train()
    torch.manual_seed(99)
    resumed = trainer_for(patched(), tmp_path / "resumed")
    resumed._load_from_checkpoint = lambda *a, **k: None
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    assert losses(resumed)[3] != pytest.approx(losses(whole)[3], rel=1e-3)


def test_load_best_model_at_end_reads_the_best_adapter(tmp_path):
    model = patched()
    trainer = MidBlockTrainer(
        model=model,
        args=training_args(
            tmp_path,
            max_steps=4,
            eval_strategy="steps",
            eval_steps=2,
            load_best_model_at_end=True,
            metric_for_best_model="loss",
            # The loss falls, so the highest one is the first: the best is not the last state.
            greater_is_better=True,
        ),
        train_dataset=counting_sequences(),
        eval_dataset=counting_sequences(),
        data_collator=DataCollatorWithFlattening(),
    )
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    evals = {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}
    assert evals[4] < evals[2] and best.name == "checkpoint-2"
    saved = load_file(best / WEIGHTS_NAME)
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and isinstance(module.lora_A, torch.nn.Parameter):
            torch.testing.assert_close(
                module.lora_A.detach(), saved[f"base_model.model.{name}.lora_A.weight"]
            )
            torch.testing.assert_close(
                module.lora_B.detach(), saved[f"base_model.model.{name}.lora_B.weight"]
            )


def test_packed_rows_keep_examples_apart_in_training_and_evaluation(tmp_path):
    model = patched()
    randomize_adapters(model)
    model.train()
    rows = [list(range(3, 12)), list(range(40, 45)), list(range(90, 97))]
    batch = DataCollatorWithFlattening()([{"input_ids": r, "labels": r} for r in rows])
    assert batch["position_ids"].tolist() == [[*range(9), *range(5), *range(7)]]
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed = model(**batch).loss
        # Each example alone, weighted by its label count (n - 1 after the shift).
        alone = [model(input_ids=torch.tensor([r]), labels=torch.tensor([r])).loss for r in rows]
        # Without restarting positions, or with a KV cache, the examples see each other.
        crossed = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        cached = model(**batch, use_cache=True).loss
    weights = [len(r) - 1 for r in rows]
    expected = sum(w * loss for w, loss in zip(weights, alone, strict=True)) / sum(weights)
    torch.testing.assert_close(packed, expected, rtol=1e-5, atol=1e-6)
    assert abs(crossed.item() - expected.item()) > 1e-3
    assert abs(cached.item() - expected.item()) > 1e-3

    trainer = MidBlockTrainer(
        model=model,
        args=training_args(tmp_path, per_device_eval_batch_size=3),
        data_collator=DataCollatorWithFlattening(),
    )
    rows_data = Dataset.from_list([{"input_ids": r, "labels": r} for r in rows])
    metrics = trainer.evaluate(eval_dataset=rows_data)
    assert metrics["eval_loss"] == pytest.approx(expected.item(), rel=1e-5)


class _StepRatios(TrainerCallback):
    """Each adapted layer's ‖ΔW_eff‖/‖W_eff‖ over every optimizer step."""

    def __init__(self, model: nn.Module) -> None:
        self.layers: dict[int, list[nn.Module]] = {}
        for layer, _, module in lora_modules(model):
            self.layers.setdefault(layer, []).append(module)
        self.steps: list[dict[int, float]] = []

    def _effective(self) -> dict[int, list[torch.Tensor]]:
        return {
            layer: [(m.weight + m.scale * m.lora_B @ m.lora_A).detach().double() for m in mods]
            for layer, mods in self.layers.items()
        }

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.before = self._effective()

    def on_optimizer_step(self, args, state, control, **kwargs):
        after = self._effective()
        ratios = {}
        for layer, old in self.before.items():
            pairs = zip(after[layer], old, strict=True)
            step = sum(float((a - b).square().sum()) for a, b in pairs)
            ratios[layer] = math.sqrt(step / sum(float(b.square().sum()) for b in old))
        self.steps.append(ratios)


@pytest.mark.parametrize("equalize", [True, False])
def test_equalize_updates_from_the_config_equalizes_every_step(tmp_path, equalize):
    model = patched(equalize_updates=equalize)
    randomize_adapters(model)  # B = 0 would make the first step's product change vanish
    trainer = trainer_for(model, tmp_path / "run", max_steps=3, save_strategy="no")
    callbacks = trainer.callback_handler.callbacks
    assert sum(isinstance(c, EqualizeUpdatesCallback) for c in callbacks) == int(equalize)
    ratios = _StepRatios(model)
    trainer.add_callback(ratios)  # after the equalizer: it sees the rescaled step
    trainer.train()
    assert len(ratios.steps) == 3
    assert all(min(step.values()) > 0 for step in ratios.steps)
    spread = max(max(step.values()) / min(step.values()) - 1 for step in ratios.steps)
    if equalize:
        assert spread < 1e-4, ratios.steps
    else:
        assert spread > 1e-2, ratios.steps  # without it the layers' steps do differ


def test_optimizer_over_frozen_weights_is_refused(tmp_path):
    model = patched()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trainer = MidBlockTrainer(
        model=model,
        args=training_args(tmp_path),
        train_dataset=counting_sequences(),
        data_collator=DataCollatorWithFlattening(),
        optimizers=(optimizer, None),
    )
    with pytest.raises(UserError, match="not fastmid adapters"):
        trainer.train()


def test_unpatched_model_and_full_logits_options_are_refused(tmp_path):
    with pytest.raises(UserError, match="not patched"):
        MidBlockTrainer(model=tiny_model("llama", 4), args=training_args(tmp_path))
    with pytest.raises(UserError, match="label_smoothing_factor"):
        MidBlockTrainer(model=patched(), args=training_args(tmp_path, label_smoothing_factor=0.1))


def test_transformers_activation_checkpointing_keeps_the_gradients():
    def grads(checkpointing: bool) -> list[torch.Tensor]:
        model = patched()
        randomize_adapters(model)
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        ids = torch.tensor([[3, 9, 27, 81, 4, 12, 36, 108, 5, 15]])
        model(input_ids=ids, labels=ids).loss.backward()
        return [p.grad for p in adapter_parameters(model)]

    plain, checkpointed = grads(False), grads(True)
    assert all(g is not None for g in checkpointed)
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------
# Serving


def test_budget_matched_adapter_config_is_what_vllm_reads(tmp_path):
    # 10 layers, band 0.2-0.8 = 6 layers: rank floor(64 * 10 / 6) = 106, as for SmolLM2's 30.
    model = tiny_model("llama", 10, hidden_size=128, num_key_value_heads=4, head_dim=32)
    apply_midblock(model, MidBlockConfig())
    out = save_adapter(model, tmp_path / "adapter")
    config = json.loads((out / CONFIG_NAME).read_text())
    # vLLM serves a rank r adapter only with --max-lora-rank >= r (its choices: 8, 16, 32,
    # 64, 128, ...), so this one needs --max-lora-rank 128.
    assert config["r"] == 106
    assert config["lora_alpha"] == 128 and config["use_rslora"] is False
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    # One rank and one alpha for every module: vLLM scales every module by lora_alpha / r.
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    assert config["layers_to_transform"] == [2, 3, 4, 5, 6, 7]
    # vLLM refuses adapters with trained biases, extra saved modules or DoRA.
    assert config["bias"] == "none" and config["modules_to_save"] is None
    assert config["use_dora"] is False and config["peft_type"] == "LORA"
    # vLLM takes the modules and the rank from the tensor names and shapes.
    tensors = load_file(out / WEIGHTS_NAME)
    layers, targets = set(), set()
    for key, value in tensors.items():
        parts = key.split(".")
        assert parts[:4] == ["base_model", "model", "model", "layers"], key
        layers.add(int(parts[4]))
        targets.add(parts[6])
        assert (value.shape[0] if parts[7] == "lora_A" else value.shape[1]) == 106
    assert sorted(layers) == config["layers_to_transform"]
    assert targets == set(config["target_modules"])


# --------------------------------------------------------------------------------------------
# TRL's SFTTrainer


def sft_setup():
    """(patched tiny Llama, its tokenizer, prompt/completion records)."""
    texts = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in RECORDS]
    tokenizer = make_tokenizer(texts)
    model = tiny_model(
        "llama",
        4,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.2,
    )
    apply_midblock(model, MidBlockTrainingConfig(band=(0.25, 0.75), rank=4, alpha=8.0, dropout=0.0))
    rows = [
        {"prompt": f"Question: {r['question']}\nAnswer:", "completion": f" {r['answer']}"}
        for r in RECORDS[:8]
    ]
    return model, tokenizer, Dataset.from_list(rows)


def sft_trainer(model, tokenizer, data, out: Path):
    from trl import SFTConfig

    from fastmid.integrations.hf import MidBlockSFTTrainer

    args = SFTConfig(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        logging_steps=1,
        save_steps=2,
        report_to="none",
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
        seed=0,
        packing=True,  # padding-free rows, position_ids restarting per example
        max_length=64,
    )
    return MidBlockSFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=tokenizer
    )


@needs_trl
def test_sft_trainer_trains_adapters_with_the_label_only_head(tmp_path):
    model, tokenizer, data = sft_setup()
    frozen = frozen_state(model)
    head_calls = count_head_calls(model)
    trainer = sft_trainer(model, tokenizer, data, tmp_path / "run")
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    trainer.train()

    steps = losses(trainer)
    assert list(steps) == [1, 2, 3, 4]
    assert steps[4] < steps[1] - 0.2, steps
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all(0 <= h["mean_token_accuracy"] <= 1 and h["entropy"] > 0 for h in logged)
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in adapter_parameters(model)}
    for name, value in frozen_state(model).items():
        assert torch.equal(value, frozen[name]), name
    assert head_calls == []

    # TRL's fused head and fastmid's label-only forward give the same loss on a packed batch.
    model.train()
    with torch.no_grad():
        fused = model(**batch, fused_lm_head=True).loss
        ours = model(**batch).loss
    torch.testing.assert_close(fused, ours, rtol=1e-5, atol=1e-6)

    tokenizer_files = {"tokenizer.json", "tokenizer_config.json"}
    check_adapter_dir(tmp_path / "run" / "checkpoint-2", model, TRAINER_FILES | tokenizer_files)
    trainer.save_model(str(tmp_path / "final"))
    check_adapter_dir(tmp_path / "final", model, tokenizer_files)


@needs_trl
def test_sft_trainer_resumes_from_its_adapter_checkpoint(tmp_path):
    whole = sft_trainer(*sft_setup(), tmp_path / "whole")
    whole.train()
    torch.manual_seed(99)
    resumed = sft_trainer(*sft_setup(), tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    expected, got = losses(whole), losses(resumed)
    assert list(got) == [1, 2, 3, 4]  # steps 1 and 2 from the checkpoint's trainer state
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], rel=1e-6)


@needs_trl
def test_sft_trainer_refuses_a_peft_config(tmp_path):
    from peft import LoraConfig

    from fastmid.integrations.hf import MidBlockSFTTrainer

    model, tokenizer, data = sft_setup()
    with pytest.raises(UserError, match="peft_config"):
        MidBlockSFTTrainer(
            model=model, train_dataset=data, processing_class=tokenizer, peft_config=LoraConfig()
        )
