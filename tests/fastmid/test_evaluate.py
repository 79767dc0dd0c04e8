"""Evaluation: answer extraction, batched greedy accuracy, perplexity, ``fastmid eval``."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from fastmid.cli import main
from fastmid.recipe.data import bundled_path, load_records
from fastmid.recipe.evaluate import (
    extract_last_number,
    gold_answer,
    gsm_accuracy,
    heldout_texts,
    perplexity,
)
from tests.fastmid._runs import RECORDS, as_flags, make_model_dir, tiny_settings, write_jsonl
from tests.fastmid.test_data import tiny_llama, tiny_tokenizer


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("So she pays 3 * 4 = 12 dollars.\n#### 12", 12.0),
        ("The total is 1,234.", 1234.0),
        ("It drops to -5, then 3.5 remain", 3.5),
        ("Answer: 40.\n\nQuestion: next", 40.0),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_last_number(text: str, value: float | None) -> None:
    assert extract_last_number(text) == value


def test_gold_answer_prefers_the_hash_value() -> None:
    assert gold_answer("5 + 6 = 11 apples.\n#### 11") == 11.0
    assert gold_answer("It costs 4 dollars, not 9.") == 9.0


class ScriptedLM(torch.nn.Module):
    """Generates a fixed reply per question; records how it was called."""

    def __init__(self, tokenizer, replies: dict[str, str]) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.replies, self.calls = tokenizer, replies, []

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        self.calls.append((input_ids.shape, attention_mask.clone(), max_new_tokens, kwargs))
        replies = []
        for row, mask in zip(input_ids, attention_mask, strict=True):
            prompt = self.tokenizer.decode(row[mask.bool()])
            question = prompt.removeprefix("Question: ").removesuffix("\nAnswer:")
            ids = [*self.tokenizer(self.replies[question]).input_ids, self.tokenizer.eos_token_id]
            replies.append(ids)
        width = max(map(len, replies))
        pad = self.tokenizer.pad_token_id
        new = torch.tensor([r + [pad] * (width - len(r)) for r in replies])
        return torch.cat([input_ids, new], dim=1)


def test_gsm_accuracy_scores_in_record_order_with_left_padding() -> None:
    tok = tiny_tokenizer()
    tok.padding_side = "right"
    records = [
        {"question": "Ava has 3 apples and buys 4 more apples.", "answer": "3 + 4 = 7\n#### 7"},
        {"question": "Ben is 9.", "answer": "#### 9"},
        {"question": "Cara saves 5 dollars for 2 weeks.", "answer": "5 * 2 = 10\n#### 10"},
    ]
    replies = {records[0]["question"]: " 3 + 4 = 7", records[1]["question"]: " 8 or 1,009"}
    replies[records[2]["question"]] = " 5 * 2 = 10 dollars.\n#### 10"
    model = ScriptedLM(tok, replies).train()
    accuracy, preds = gsm_accuracy(model, tok, records, batch_size=2, max_new_tokens=64)
    assert accuracy == pytest.approx(2 / 3)
    assert [p["correct"] for p in preds] == [True, False, True]
    assert [p["prediction"] for p in preds] == [7.0, 1009.0, 10.0]
    assert [p["gold"] for p in preds] == [7.0, 9.0, 10.0]
    assert preds[2]["output"] == " 5 * 2 = 10 dollars.\n#### 10"
    assert len(model.calls) == 2
    for _shape, mask, max_new, kwargs in model.calls:
        assert mask[:, -1].all()  # left padding: every prompt ends at the last column
        assert max_new == 64 and kwargs["do_sample"] is False
        assert kwargs["eos_token_id"] == [tok.eos_token_id]
    # Shortest prompts first: the first batch holds the two shorter questions.
    assert model.calls[0][0][0] == 2 and model.calls[1][0][0] == 1
    assert tok.padding_side == "right" and model.training


def test_batched_greedy_generation_matches_one_at_a_time() -> None:
    tok = tiny_tokenizer()
    model = tiny_llama()
    records = load_records(bundled_path("test"))[:5]
    _, batched = gsm_accuracy(model, tok, records, batch_size=5, max_new_tokens=8)
    _, single = gsm_accuracy(model, tok, records, batch_size=1, max_new_tokens=8)
    assert [p["output"] for p in batched] == [p["output"] for p in single]
    assert all(p["output"] for p in single)


def test_perplexity_of_uniform_model_is_the_vocab_size_and_batching_is_exact() -> None:
    tok = tiny_tokenizer()
    texts = heldout_texts()[:3]
    model = tiny_llama()
    ppl_1 = perplexity(model, tok, texts, max_length=64, batch_size=1)
    ppl_8 = perplexity(model, tok, texts, max_length=64, batch_size=8)
    assert ppl_1 == pytest.approx(ppl_8, rel=1e-5)
    # A random-init model is close to uniform, but not exactly.
    assert 0.5 * 400 < ppl_1 < 2 * 400 and abs(ppl_1 - 400) > 1e-3
    with torch.no_grad():
        model.lm_head.weight.zero_()
    assert perplexity(model, tok, texts, max_length=64) == pytest.approx(400, rel=1e-5)


def test_bundled_heldout_text_is_a_few_kb_of_paragraphs() -> None:
    texts = heldout_texts()
    assert len(texts) >= 10 and sum(map(len, texts)) > 3000
    assert all("\n" not in t for t in texts)


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    path = tmp_path / "tiny"
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def says_seven_dir(tmp_path: Path) -> Path:
    """A tiny model whose every greedy token is "7", whatever the prompt.

    The blocks add nothing to the residual stream (zero output projections), every token
    embeds with +1 in dimension 0, the final norm keeps only that dimension, and the LM head
    reads it into the logit of "7" alone.
    """
    tok = tiny_tokenizer()
    seven = tok.convert_tokens_to_ids("7")
    model = tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[seven, 0] = 1.0
    path = tmp_path / "says-seven"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_eval_cli_writes_predictions(says_seven_dir: Path, tmp_path: Path, capsys) -> None:
    records = [
        {"question": "What is 7000 + 777?", "answer": "#### 7777"},
        {"question": "What is 1 + 1?", "answer": "#### 2"},
        {"question": "Write 7777.", "answer": "It is 7777.\n#### 7,777"},
    ]
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "preds.jsonl"
    argv = ["eval", "--model", str(says_seven_dir), "--data", str(data)]
    argv += ["--output", str(out), "--precision", "fp32", "--max-new-tokens", "4"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^accuracy 0\.6667 \(2/3\) in ", printed, re.M)
    assert "held-out perplexity" in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["output"].strip() for r in rows] == ["7777"] * 3
    assert [r["correct"] for r in rows] == [True, False, True]
    assert set(rows[0]) == {"question", "gold", "output", "prediction", "correct"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data", "missing.jsonl"], "data file not found: missing.jsonl"),
        (["--output", "no/such/dir/p.jsonl"], "output directory does not exist"),
        (["--adapter", "no_adapter_here"], "adapter directory not found"),
        (["--limit", "0"], "--limit must be positive"),
    ],
)
def test_eval_cli_user_errors(
    tiny_dir: Path, tmp_path: Path, monkeypatch, capsys, extra, message
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--model", str(tiny_dir), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastmid eval: error: ") and message in err
    assert err.count("\n") == 1


@pytest.mark.slow
def test_embedded_model_answers_and_models_text() -> None:
    from fastmid.engine.models import load_model

    model, tok, name = load_model(None, dtype=torch.bfloat16)
    assert name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    records = load_records(bundled_path("test"))[:2]
    _, preds = gsm_accuracy(model, tok, records, max_new_tokens=12)
    # The untuned instruct model already solves the one-step first problem (7 + 9).
    assert preds[0]["gold"] == 16.0 and "16" in preds[0]["output"]
    ppl = perplexity(model, tok, heldout_texts()[:4])
    # ~51 measured in bf16; a random-init model of this vocabulary scores ~49,000.
    assert math.isfinite(ppl) and 3 < ppl < 100


def test_eval_cli_loads_an_adapter(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    # The kernels' interpreter path has its own tests; the torch path keeps this one fast.
    monkeypatch.setattr("fastmid.kernels._common.INTERPRET", False, raising=False)
    from fastmid.engine.adapters import save_adapter
    from fastmid.engine.midblock import MidBlockConfig, adapter_parameters, apply_midblock
    from fastmid.engine.models import load_model

    model, tok, _ = load_model(str(tiny_dir))
    apply_midblock(model, MidBlockConfig(band="all", rank=4, dropout=0.0))
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.normal_(0, 0.5)  # a trained-looking adapter that changes the greedy outputs
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tiny_dir))
    records = load_records(bundled_path("test"))[:3]
    _, tuned = gsm_accuracy(model, tok, records, max_new_tokens=6)
    _, base = gsm_accuracy(load_model(str(tiny_dir))[0], tok, records, max_new_tokens=6)
    assert [p["output"] for p in tuned] != [p["output"] for p in base]

    argv = ["eval", "--model", str(tiny_dir), "--adapter", str(tmp_path / "adapter")]
    argv += ["--limit", "3", "--max-new-tokens", "6", "--precision", "fp32", "--no-perplexity"]
    assert main([*argv, "--output", str(tmp_path / "preds.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert [r["output"] for r in rows] == [p["output"] for p in tuned]


def test_train_summary_and_eval_give_one_perplexity_per_adapter(
    one_thread_torch_path, tmp_path: Path, capsys
) -> None:
    # Train on 64-token examples: the held-out windows must not follow the training length.
    model = make_model_dir(tmp_path, num_layers=4)
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS[:12])
    run = tmp_path / "run"
    settings = tiny_settings(model, data, run, eval=True, max_length=64, max_steps=4)
    assert main(["train", *as_flags(settings)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    capsys.readouterr()

    # The run directory stands for its adapter, and the output names what was evaluated.
    argv = ["eval", "--model", str(model), "--limit", "1", "--max-new-tokens", "2"]
    assert main([*argv, "--precision", "fp32", "--adapter", str(run)]) == 0
    printed = capsys.readouterr().out
    assert f"+ adapter {run / 'adapter'}" in printed
    after = summary["eval_after"]["heldout_ppl"]
    assert f"held-out perplexity {after:.2f}\n" in printed
    assert main([*argv, "--precision", "fp32"]) == 0
    printed = capsys.readouterr().out
    assert "(no adapter)" in printed
    assert f"held-out perplexity {summary['eval_before']['heldout_ppl']:.2f}\n" in printed


def test_eval_reads_other_columns_with_fields(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    rows = [{"problem": "What is 2 + 2?", "solution": "#### 4"}] * 2
    data = write_jsonl(tmp_path / "other.jsonl", rows)
    argv = ["eval", "--model", str(tiny_dir), "--data", str(data), "--no-perplexity"]
    argv += ["--max-new-tokens", "2", "--precision", "fp32"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--fields prompt=COLUMN,response=COLUMN" in err  # the hint names a flag eval has
    assert main([*argv, "--fields", "prompt=problem,response=solution"]) == 0
    assert re.search(r"^accuracy 0\.0000 \(0/2\) in ", capsys.readouterr().out, re.M)
