"""Data: JSONL loading and its errors, tokenization and loss masks, packing, bundled data."""

from __future__ import annotations

import contextlib
import functools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from fastmid.engine.loss import IGNORE_INDEX
from fastmid.errors import UserError
from fastmid.recipe import synth
from fastmid.recipe.data import (
    Example,
    TokenizedExamples,
    batch_to,
    bundled_path,
    collate_packed,
    collate_padded,
    load_records,
    pack_batches,
    records_fingerprint,
    split_records,
    tokenize_records,
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@functools.cache
def _tiny_backend() -> Tokenizer:
    # A byte-level BPE trained on the bundled questions: small vocab, no download.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = bundled_path("train").read_text().splitlines()[:300]
    tok.train_from_iterator(lines, trainer)
    return tok


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh ~400-token byte-level BPE tokenizer with a ChatML template and EOS = <|im_end|>."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_tiny_backend(), eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.chat_template = CHATML
    return tok


def tiny_llama(vocab_size: int = 400, layers: int = 2) -> torch.nn.Module:
    """A random-init 2-layer Llama with SDPA attention."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        attn_implementation="sdpa",
    )
    return AutoModelForCausalLM.from_config(config).eval()


def _write(tmp_path: Path, text: str, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------- loading and its errors


def test_load_records_reads_all_three_shapes_and_skips_blank_lines(tmp_path: Path) -> None:
    lines = [
        {"prompt": "p", "response": "r"},
        {"question": "q", "answer": "a"},
        {"messages": [{"role": "user", "content": "hi"}]},
    ]
    path = _write(tmp_path, "\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert load_records(path) == lines


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        (
            '{"question": "q", "answer": "a"}\n{"question": "q", \n',
            r"data\.jsonl:2: malformed JSON at column 19 \(Expecting property name",
        ),
        (
            '{"question": "q", "answer": "a"}\n{"question": "q", "answer": "unterminated}\n',
            r"data\.jsonl:2: malformed JSON at column 29 \(Unterminated string\)",
        ),
        ('{"question": "q", "answer": "a"}\n{"text": "x", "id": 3}\n', r":2: .*keys \[id, text\]"),
        ("[1, 2]\n", r":1: .*a JSON list"),
        ("\n\n", r"no records"),
    ],
)
def test_load_records_errors_name_file_and_line(tmp_path: Path, text: str, pattern: str) -> None:
    with pytest.raises(UserError, match=pattern):
        load_records(_write(tmp_path, text))


def test_load_records_missing_and_directory_and_undecodable(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_records(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="directory"):
        load_records(tmp_path)
    bad = tmp_path / "bin.jsonl"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match="cannot read"):
        load_records(bad)


# ---------------------------------------------------------------- tokenization


def test_qa_targets_are_shifted_response_tokens_ending_in_eos() -> None:
    tok = tiny_tokenizer()
    record = {"question": "Sam has 3 apples. How many?", "answer": "3 + 0 = 3\n#### 3"}
    (ex,) = tokenize_records([record], tok, fmt="qa")
    prompt_ids = tok("Question: Sam has 3 apples. How many?\nAnswer:").input_ids
    assert ex.input_ids[: len(prompt_ids)] == prompt_ids
    assert ex.targets[-1] == IGNORE_INDEX
    # Every labelled position predicts the next input token.
    for t, target in enumerate(ex.targets):
        if target != IGNORE_INDEX:
            assert target == ex.input_ids[t + 1]
    # The first label sits on the last prompt token and the labels spell the response + EOS.
    assert ex.targets.index(next(t for t in ex.targets if t != IGNORE_INDEX)) == len(prompt_ids) - 1
    labels = [t for t in ex.targets if t != IGNORE_INDEX]
    assert tok.decode(labels) == " 3 + 0 = 3\n#### 3<|im_end|>"
    assert ex.num_loss_tokens == len(ex.input_ids) - len(prompt_ids)


def test_prompt_response_records_and_loss_on_all() -> None:
    tok = tiny_tokenizer()
    records = [{"prompt": "Ava buys 2 pens.", "response": "#### 2"}]
    (resp,) = tokenize_records(records, tok, loss_on="response")
    (full,) = tokenize_records(records, tok, loss_on="all")
    assert full.input_ids == resp.input_ids
    assert full.num_loss_tokens == len(full.input_ids) - 1
    assert full.targets[:-1] == full.input_ids[1:]
    assert resp.num_loss_tokens < full.num_loss_tokens


def test_truncation_and_filtering() -> None:
    tok = tiny_tokenizer()
    long = {"question": "Zoe has many marbles. " * 10, "answer": "#### 1"}
    short = {"question": "Ben is 5.", "answer": "#### 5"}
    examples = tokenize_records([long, short], tok, max_length=20)
    # The long example lost its whole response to truncation and is dropped.
    assert len(examples) == 1 and examples[0].num_loss_tokens > 0
    (cut,) = tokenize_records([long], tok, max_length=20, loss_on="all")
    assert len(cut.input_ids) == 20 and cut.targets[-1] == IGNORE_INDEX
    with pytest.raises(UserError, match="no examples left"):
        tokenize_records([long], tok, max_length=20)


def test_chat_format_puts_loss_on_every_assistant_turn_only() -> None:
    tok = tiny_tokenizer()
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Ava has 2 pens."},
            {"role": "assistant", "content": "Ok 2."},
            {"role": "user", "content": "And Ben?"},
            {"role": "assistant", "content": "Ben has 7."},
        ]
    }
    (ex,) = tokenize_records([record], tok, fmt="chat")
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(record["messages"], tokenize=False)
    labelled = tok.decode([t if t != IGNORE_INDEX else tok.pad_token_id for t in ex.targets])
    spans = [s for s in labelled.split("<|endoftext|>") if s]
    assert spans == ["Ok 2.<|im_end|>\n", "Ben has 7.<|im_end|>\n"]


def test_chat_format_from_question_answer_and_errors() -> None:
    tok = tiny_tokenizer()
    (ex,) = tokenize_records([{"question": "Hi?", "answer": "#### 4"}], tok, fmt="chat")
    assert tok.decode([t for t in ex.targets if t != IGNORE_INDEX]) == "#### 4<|im_end|>\n"
    with pytest.raises(UserError, match="unknown record shape"):
        tokenize_records([{"text": "x"}], tok)
    with pytest.raises(UserError, match="unknown data format"):
        tokenize_records([{"question": "q", "answer": "a"}], tok, fmt="alpaca")
    tok.chat_template = None
    with pytest.raises(UserError, match="chat template"):
        tokenize_records([{"question": "q", "answer": "a"}], tok, fmt="chat")


def _alone(records: list[dict], tok: PreTrainedTokenizerFast, **settings: object) -> list[Example]:
    """Each record tokenized by itself; those left without a label are skipped."""
    out = []
    for record in records:
        with contextlib.suppress(UserError):
            out.extend(tokenize_records([record], tok, **settings))
    return out


def test_batched_tokenization_matches_one_record_at_a_time() -> None:
    tok = tiny_tokenizer()
    records = list(load_records(bundled_path("train"))[:40])
    for fmt, loss_on in [("qa", "response"), ("chat", "response"), ("qa", "all")]:
        settings = {"fmt": fmt, "max_length": 96, "loss_on": loss_on}
        together = tokenize_records(records, tok, **settings)
        alone = _alone(records, tok, **settings)
        assert list(together) == alone
        assert together.num_loss_tokens() == sum(e.num_loss_tokens for e in alone)
        pair = alone[3].num_loss_tokens + alone[7].num_loss_tokens
        assert together.num_loss_tokens([3, 7]) == pair
        assert together.lengths.tolist() == [len(e) for e in alone]
    # Some records lost their whole response to truncation at 96 tokens, and are dropped.
    assert len(_alone(records, tok, max_length=96)) < len(records)
    assert TokenizedExamples.from_examples(alone)[5] == alone[5]


class _CountingTokenizer:
    """A tokenizer that counts its encode calls and otherwise is ``tok``."""

    def __init__(self, tok: PreTrainedTokenizerFast) -> None:
        self.tok, self.calls = tok, 0

    def __call__(self, *args: object, **kwargs: object) -> object:
        self.calls += 1
        return self.tok(*args, **kwargs)

    def __getattr__(self, name: str) -> object:
        return getattr(self.tok, name)


def test_tokenized_data_is_cached_by_content_tokenizer_and_settings(tmp_path: Path) -> None:
    lines = bundled_path("train").read_text().splitlines()[:30]
    path = _write(tmp_path, "\n".join(lines) + "\n")
    cache = tmp_path / "cache"
    spy = _CountingTokenizer(tiny_tokenizer())

    def tokenize(records: object = None, tokenizer: object = spy, **settings: object) -> object:
        records = load_records(path) if records is None else records
        return tokenize_records(records, tokenizer, max_length=64, cache_dir=cache, **settings)

    first = tokenize()
    assert spy.calls > 0 and len(list(cache.iterdir())) == 1
    spy.calls = 0
    again = tokenize()
    assert spy.calls == 0  # a hit: loaded from the .npy files, no tokenizer call
    assert isinstance(again.ids, np.memmap) and list(again) == list(first)
    # Any setting, the tokenizer or the file's bytes changing is a miss with its own entry.
    for change in [
        {"max_length": 48},
        {"loss_on": "all"},
        {"fmt": "chat"},
    ]:
        settings = {"max_length": 64, **change}
        max_length = settings.pop("max_length")
        spy.calls = 0
        tokenize_records(
            load_records(path), spy, max_length=max_length, cache_dir=cache, **settings
        )
        assert spy.calls > 0
    other = tiny_tokenizer()
    other.chat_template = CHATML.replace("<|im_start|>", "<|im_start|> ")
    other_spy = _CountingTokenizer(other)
    tokenize(tokenizer=other_spy)
    assert other_spy.calls > 0
    assert len(list(cache.iterdir())) == 5
    spy.calls = 0
    path.write_text("\n".join(lines[:-1]) + "\n")
    tokenize()
    assert spy.calls > 0 and len(list(cache.iterdir())) == 6
    # A cache location that cannot be written is skipped, not an error.
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    kept = tokenize_records(load_records(path), spy, max_length=64, cache_dir=blocked / "cache")
    assert len(kept) == len(tokenize())
    # Records made in memory have no content fingerprint and are not cached.
    before = sorted(cache.iterdir())
    tokenize(records=[{"question": "q", "answer": "#### 1"}])
    assert sorted(cache.iterdir()) == before


def test_a_split_of_the_records_has_its_own_cache_entry(tmp_path: Path) -> None:
    path = _write(tmp_path, "\n".join(bundled_path("train").read_text().splitlines()[:20]))
    records = load_records(path)
    train_a, held_a = split_records(records, 0.25, seed=1)
    train_b, _ = split_records(records, 0.25, seed=2)
    prints = {records_fingerprint(r) for r in (records, train_a, held_a, train_b)}
    assert None not in prints and len(prints) == 4
    assert records_fingerprint(split_records(load_records(path), 0.25, seed=1)[0]) == (
        records_fingerprint(train_a)
    )


def test_a_file_read_before_is_hashed_not_parsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastmid.recipe import data

    lines = bundled_path("train").read_text().splitlines()[:12]
    path = _write(tmp_path, "\n".join(lines) + "\n")
    cache = tmp_path / "cache"
    parsed: list[Path] = []
    real_parse = data._parse_jsonl
    monkeypatch.setattr(data, "_parse_jsonl", lambda p, f: (parsed.append(p), real_parse(p, f))[1])
    cold = load_records(path, cache_dir=cache)
    assert parsed == [path] and len(cold) == 12
    warm = load_records(path, cache_dir=cache)
    assert parsed == [path]  # only hashed: the count comes from the note
    assert len(warm) == 12 and warm.fingerprint == cold.fingerprint
    # The streamed key is the key of the bytes parsed on a cold run, whatever the chunk size.
    monkeypatch.setattr(data, "HASH_CHUNK", 7)
    assert load_records(path, cache_dir=cache).fingerprint == cold.fingerprint
    # A record asked for is parsed then, and is the record a cold read gives.
    assert warm[3] == cold[3] and list(warm) == list(cold) and len(parsed) == 2
    # One byte changed: a miss, parsed again under another key.
    path.write_bytes(path.read_bytes().replace(b"?", b"!", 1))
    changed = load_records(path, cache_dir=cache)
    assert len(parsed) == 3 and changed.fingerprint != cold.fingerprint
    # A malformed line fails the cold read naming file:line, and notes nothing for next time.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + "\n{oops\n")
    for _ in range(2):
        with pytest.raises(UserError, match=r"bad\.jsonl:2: malformed JSON"):
            load_records(bad, cache_dir=cache)
    # A file that changed between its hash and its parse is not silently mixed up.
    stale = data.JsonlRecords(path, None, cold.fingerprint, 12)
    with pytest.raises(UserError, match="changed while the run was reading it"):
        stale[0]


# ---------------------------------------------------------------- packing and collation


def _examples(lengths: list[int]) -> list[Example]:
    return [Example(list(range(n)), [*range(1, n), IGNORE_INDEX]) for n in lengths]


def _compositions(batches: list[list[int]]) -> set[tuple[int, ...]]:
    return {tuple(b) for b in batches}


def test_pack_batches_respects_budget_and_is_deterministic() -> None:
    lengths = [(i * 37) % 90 + 10 for i in range(200)]
    examples = _examples(lengths)
    batches = pack_batches(examples, max_tokens=256, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(200))
    assert all(sum(lengths[i] for i in b) <= 256 for b in batches)
    assert all(b == sorted(b) for b in batches)
    # Best-fit decreasing wastes little: within one batch of the lower bound.
    assert len(batches) <= -(-sum(lengths) // 256) + 1
    assert pack_batches(examples, 256, seed=3) == batches
    assert pack_batches(examples, 256, seed=3, shuffle=False) == pack_batches(
        examples, 256, seed=99, shuffle=False
    )
    with pytest.raises(UserError, match="more than the batch budget"):
        pack_batches(examples, max_tokens=50, seed=0)


def test_seeds_and_epochs_change_which_examples_share_a_batch() -> None:
    gen = np.random.default_rng(0)
    lengths = gen.integers(20, 200, size=3000).tolist()
    flat = TokenizedExamples(
        np.zeros(sum(lengths), np.int32),
        np.ones(sum(lengths), np.bool_),
        np.concatenate(([0], np.cumsum(lengths))),
    )
    base = pack_batches(flat, 2048, seed=0, epoch=0)
    same = _compositions(base)
    for seed, epoch in [(1, 0), (0, 1)]:
        other = pack_batches(flat, 2048, seed=seed, epoch=epoch)
        # Another seed or epoch: the same number of batches, few of them with the same members.
        assert len(other) == len(base)
        assert len(_compositions(other) & same) < len(base) // 10
        assert sorted(i for b in other for i in b) == list(range(3000))
        assert all(sum(lengths[i] for i in b) <= 2048 for b in other)
    assert pack_batches(flat, 2048, seed=0, epoch=0) == base
    # 3000 examples over 181 lengths are rounded to 2 tokens; little is wasted.
    assert len(base) <= -(-sum(lengths) // 2048) * 1.03 + 1
    # The flat arrays and a list of Examples of the same lengths pack alike.
    assert pack_batches(_examples(lengths), 2048, seed=0, epoch=0) == base


def test_one_example_per_bin_when_each_fills_the_budget() -> None:
    # Budget 1031 → 2-token units, 515 of them: 1031 tokens round to 516 units, past the
    # capacity, and still fill a bin alone; 1028 + 2 tokens share one.
    lengths = [1031, 1028, 2, 1030]
    batches = pack_batches(_examples(lengths), 1031, seed=0)
    assert sorted(map(sorted, batches)) == [[0], [1, 2], [3]]


def test_collators_shapes_positions_and_targets() -> None:
    a, b = _examples([3, 5])
    packed = collate_packed([a, b])
    assert packed["input_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]
    assert packed["targets"].tolist() == [[1, 2, IGNORE_INDEX, 1, 2, 3, 4, IGNORE_INDEX]]
    # Host-side metadata: example boundaries for varlen attention, label positions for the head.
    assert packed["cu_seqlens"].dtype == torch.int32
    assert packed["cu_seqlens"].tolist() == [0, 3, 8]
    assert packed["label_index"].tolist() == [0, 1, 3, 4, 5, 6]
    padded = collate_padded([a, b], pad_id=9)
    assert padded["input_ids"].tolist() == [[0, 1, 2, 9, 9], [0, 1, 2, 3, 4]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert padded["targets"][0].tolist() == [1, 2, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert padded["position_ids"][1].tolist() == [0, 1, 2, 3, 4]


def test_cu_seqlens_of_uneven_examples_and_batch_to_keeps_them_on_the_host() -> None:
    examples = _examples([4, 1, 6, 4])
    batch = collate_packed(examples)
    assert batch["cu_seqlens"].tolist() == [0, 4, 5, 11, 15]
    # The one-token example has no label (its only target is the shifted-away -100).
    assert batch["label_index"].tolist() == [0, 1, 2, 5, 6, 7, 8, 9, 11, 12, 13]
    moved = batch_to(batch, "meta")
    assert moved["cu_seqlens"] is batch["cu_seqlens"]
    assert {k for k, v in moved.items() if v.is_meta} == set(batch) - {"cu_seqlens"}


def _packed_and_alone(model: torch.nn.Module, use_cache: bool, restart: bool) -> float:
    """Largest |logit difference| between a packed row and each example run alone."""
    gen = torch.Generator().manual_seed(1)
    examples = [
        Example(torch.randint(3, 400, (n,), generator=gen).tolist(), [IGNORE_INDEX] * n)
        for n in (7, 12, 5)
    ]
    batch = collate_packed(examples)
    positions = batch["position_ids"]
    if not restart:
        positions = torch.arange(positions.shape[1])[None]
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"],
            position_ids=positions,
            attention_mask=None,
            use_cache=use_cache,
        ).logits[0]
        alone = torch.cat(
            [
                model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0]
                for e in examples
            ]
        )
    return (packed - alone).abs().max().item()


def test_packed_row_matches_examples_alone_only_with_restarting_positions_and_no_cache() -> None:
    model = tiny_llama()
    assert _packed_and_alone(model, use_cache=False, restart=True) < 1e-5
    # The controls show the check can fail: with a KV cache transformers does not derive the
    # block-diagonal mask, and without restarting positions it cannot see the boundaries.
    assert _packed_and_alone(model, use_cache=True, restart=True) > 1e-3
    assert _packed_and_alone(model, use_cache=False, restart=False) > 1e-3


def test_packed_logits_match_padded_batch_at_labelled_positions() -> None:
    tok = tiny_tokenizer()
    model = tiny_llama()
    records = load_records(bundled_path("train"))[:4]
    examples = tokenize_records(records, tok)
    packed = collate_packed(examples)
    padded = collate_padded(examples, tok.pad_token_id)
    with torch.no_grad():
        p = model(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False
        ).logits[0]
        q = model(
            input_ids=padded["input_ids"],
            attention_mask=padded["attention_mask"],
            position_ids=padded["position_ids"],
            use_cache=False,
        ).logits
    keep_p = packed["targets"][0] != IGNORE_INDEX
    keep_q = padded["targets"] != IGNORE_INDEX
    assert packed["targets"][0][keep_p].tolist() == padded["targets"][keep_q].tolist()
    torch.testing.assert_close(p[keep_p], q[keep_q], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- bundled data


def test_synth_regenerates_the_bundled_files_byte_for_byte(tmp_path: Path) -> None:
    assert synth.main(["--out", str(tmp_path)]) == 0
    for split in ("train", "test"):
        assert (tmp_path / f"gsm_{split}.jsonl").read_bytes() == bundled_path(split).read_bytes()


def test_bundled_problems_are_correct_multi_step_and_disjoint() -> None:
    train, test = load_records(bundled_path("train")), load_records(bundled_path("test"))
    assert (len(train), len(test)) == (synth.TRAIN_SIZE, synth.TEST_SIZE)
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    steps = set()
    for record in train + test:
        *lines, final = record["answer"].split("\n")
        calcs = [re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", line) for line in lines]
        assert all(len(c) == 1 for c in calcs), record
        for ((a, op, b, c),) in calcs:
            x, y = int(a), int(b)
            value = {"+": x + y, "-": x - y, "*": x * y, "/": x // y if x % y == 0 else -1}[op]
            assert value == int(c), record
        assert final == f"#### {calcs[-1][0][3]}"
        steps.add(len(lines))
    assert steps >= {1, 2, 3, 4}


def test_synth_makes_a_second_independent_set_from_other_seeds(tmp_path: Path) -> None:
    assert synth.main(["--out", str(tmp_path), "--seeds", "4321", "8765"]) == 0
    bundled = {
        json.loads(line)["question"]
        for split in ("train", "test")
        for line in (synth.RESOURCES / f"gsm_{split}.jsonl").read_text().splitlines()
    }
    fresh = [json.loads(x) for x in (tmp_path / "gsm_train.jsonl").read_text().splitlines()]
    test = [json.loads(x) for x in (tmp_path / "gsm_test.jsonl").read_text().splitlines()]
    assert (len(fresh), len(test)) == (synth.TRAIN_SIZE, synth.TEST_SIZE)
    # Mostly new problems (a few short ones can coincide), none shared between its splits.
    overlap = sum(r["question"] in bundled for r in fresh) / len(fresh)
    assert overlap < 0.05
    assert not {r["question"] for r in test} & {r["question"] for r in fresh}
    assert synth.splits(4321, 8765)["train"] == fresh
