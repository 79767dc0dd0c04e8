"""Training data: JSONL records, tokenization with loss masks, packing and collation.

Records are ``{"prompt", "response"}``, ``{"question", "answer"}`` or ``{"messages": [...]}``.
Two formats:

- ``qa``: the paper's ``Question: {q}\\nAnswer: {a}`` + EOS. Prompt and response are tokenized
  separately and joined, so the prompt tokens are exactly what evaluation feeds the model.
- ``chat``: the tokenizer's chat template; the loss covers the assistant turns.

Targets are pre-shifted: ``targets[t]`` is the token to predict at position ``t`` (``-100``
where there is no loss, always at an example's last position), so a trainer can run the LM
head only where ``targets != -100`` without shifting anything.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from fastmid.errors import UserError

IGNORE_INDEX = -100
QA_PROMPT = "Question: {question}\nAnswer:"
_BUNDLED = {"train": "gsm_train.jsonl", "test": "gsm_test.jsonl", "heldout": "heldout.txt"}
_SHAPES = "{prompt, response}, {question, answer} or {messages}"


@dataclass
class Example:
    """One tokenized example; ``targets`` is already shifted (see the module docstring)."""

    input_ids: list[int]
    targets: list[int]

    @property
    def num_loss_tokens(self) -> int:
        """Positions that carry a label."""
        return sum(t != IGNORE_INDEX for t in self.targets)

    def __len__(self) -> int:
        return len(self.input_ids)


def bundled_path(name: str) -> Path:
    """Path of a file shipped with fastmid: ``train``/``test`` GSM-style splits or ``heldout``."""
    if name not in _BUNDLED:
        raise UserError(f"unknown bundled data {name!r}; expected one of {', '.join(_BUNDLED)}")
    return Path(str(resources.files("fastmid") / "resources" / _BUNDLED[name]))


def _record_kind(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("messages"), list):
        return "messages"
    if isinstance(record.get("question"), str) and isinstance(record.get("answer"), str):
        return "qa"
    if isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
        return "qa"
    return None


def _shape_error(record: Any, where: str) -> UserError:
    if isinstance(record, dict):
        got = "keys [" + ", ".join(sorted(map(str, record))) + "]"
    else:
        got = f"a JSON {type(record).__name__}"
    return UserError(f"{where}: unknown record shape with {got}; expected {_SHAPES}")


def _record_problem(record: dict) -> str | None:
    """Why a record of a known shape cannot be used (a malformed turn, a blank answer), or None."""
    if _record_kind(record) == "messages":
        turns = record["messages"]
        for turn in turns:
            fields = ("role", "content")
            if not (isinstance(turn, dict) and all(isinstance(turn.get(k), str) for k in fields)):
                return "each message needs 'role' and 'content' strings"
        answers = [t["content"] for t in turns if t["role"] == "assistant"]
    else:
        answers = [record["answer"] if "answer" in record else record["response"]]
    if any(not a.strip() for a in answers):
        return "empty answer (the record has nothing to learn)"
    return None


def load_records(path: str | Path) -> list[dict]:
    """Read a JSONL file of records; UserError naming ``file:line`` for a bad line."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"data file not found: {path}")
    if path.is_dir():
        raise UserError(f"data path is a directory, not a JSONL file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read data file {path}: {err}") from None
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{lineno}: malformed JSON ({err.msg})") from None
        if _record_kind(record) is None:
            raise _shape_error(record, f"{path}:{lineno}")
        problem = _record_problem(record)
        if problem is not None:
            raise UserError(f"{path}:{lineno}: {problem}")
        records.append(record)
    if not records:
        raise UserError(f"data file has no records: {path}")
    return records


def _question_answer(record: dict, index: int) -> tuple[str, str]:
    if "question" in record and "answer" in record:
        return record["question"], record["answer"]
    if "prompt" in record and "response" in record:
        return record["prompt"], record["response"]
    turns = record["messages"]

    def said_by(role: str) -> list[str]:
        return [m.get("content", "") for m in turns if m.get("role") == role]

    users, bots = said_by("user"), said_by("assistant")
    if len(users) != 1 or len(bots) != 1:
        raise UserError(f"record {index}: qa format needs one user and one assistant message")
    return users[0], bots[0]


def _messages(record: dict, index: int) -> list[dict]:
    if "messages" in record:
        turns = record["messages"]
        for turn in turns:
            if not (isinstance(turn, dict) and "role" in turn and "content" in turn):
                raise UserError(f"record {index}: each message needs 'role' and 'content'")
        return turns
    question, answer = _question_answer(record, index)
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _shift(ids: list[int], loss_mask: list[bool]) -> list[int]:
    """targets[t] = ids[t+1] where token t+1 carries loss; -100 elsewhere and at the end."""
    shifted = [ids[t + 1] if loss_mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)]
    return [*shifted, IGNORE_INDEX]


def _encode_qa(record: dict, index: int, tokenizer: Any) -> tuple[list[int], list[bool]]:
    question, answer = _question_answer(record, index)
    prompt = tokenizer(QA_PROMPT.format(question=question), add_special_tokens=True).input_ids
    response = tokenizer(" " + answer.strip(), add_special_tokens=False).input_ids
    response = [*response, tokenizer.eos_token_id]
    return prompt + response, [False] * len(prompt) + [True] * len(response)


def _render(tokenizer: Any, turns: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        turns, tokenize=False, add_generation_prompt=generation_prompt
    )


def _encode_chat(record: dict, index: int, tokenizer: Any) -> tuple[list[int], list[bool]]:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("--format chat needs a tokenizer with a chat template; use --format qa")
    turns = _messages(record, index)
    full = _render(tokenizer, turns, False)
    # Character spans of the assistant turns, found by rendering growing prefixes of the
    # conversation; this holds for any template whose renders of prefixes are text prefixes.
    spans = []
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        before = _render(tokenizer, turns[:i], True)
        upto = _render(tokenizer, turns[: i + 1], False)
        if not (full.startswith(before) and full.startswith(upto)):
            raise UserError("the tokenizer's chat template does not render turns as prefixes")
        spans.append((len(before), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(a <= start < b for a, b in spans) for start, _ in enc.offset_mapping]
    return list(enc.input_ids), mask


def tokenize_records(
    records: list[dict],
    tokenizer: Any,
    fmt: str = "qa",
    max_length: int = 512,
    loss_on: str = "response",
) -> list[Example]:
    """Tokenize records into :class:`Example` s, truncated to ``max_length`` tokens.

    ``loss_on="response"`` puts loss on the answer (qa) or assistant turns (chat);
    ``"all"`` on every token after the first, as the paper does. Examples left with no loss
    token after truncation are dropped; UserError if none remain.
    """
    if fmt not in ("qa", "chat"):
        raise UserError(f"unknown data format {fmt!r}; expected qa or chat")
    if loss_on not in ("response", "all"):
        raise UserError(f"unknown loss_on {loss_on!r}; expected response or all")
    if max_length < 2:
        raise UserError(f"max_length must be at least 2, got {max_length}")
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token")
    encode = _encode_qa if fmt == "qa" else _encode_chat
    examples = []
    for index, record in enumerate(records):
        if _record_kind(record) is None:
            raise _shape_error(record, f"record {index}")
        ids, mask = encode(record, index, tokenizer)
        ids, mask = ids[:max_length], mask[:max_length]
        if loss_on == "all":
            mask = [True] * len(ids)
        example = Example(input_ids=ids, targets=_shift(ids, mask))
        if example.num_loss_tokens > 0:
            examples.append(example)
    if not examples:
        raise UserError(
            f"no examples left with loss tokens after tokenizing {len(records)} records "
            f"(max_length={max_length}, loss_on={loss_on})"
        )
    return examples


def pack_batches(
    examples: list[Example], max_tokens: int, seed: int, shuffle: bool = True
) -> list[list[int]]:
    """Group whole examples into batches of at most ``max_tokens`` tokens (first-fit decreasing).

    Returns lists of indices into ``examples``. Deterministic for a given ``seed``: the bins
    come from a stable sort, and only the order of the batches is shuffled.
    """
    if not examples:
        raise UserError("cannot pack an empty dataset")
    longest = max(len(e) for e in examples)
    if longest > max_tokens:
        raise UserError(
            f"an example has {longest} tokens, more than the batch budget of {max_tokens}; "
            "raise the token budget or lower max_length"
        )
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        size = len(examples[i])
        for b, free in enumerate(room):
            if size <= free:
                bins[b].append(i)
                room[b] -= size
                break
        else:
            bins.append([i])
            room.append(max_tokens - size)
    for b in bins:
        b.sort()
    if shuffle:
        random.Random(seed).shuffle(bins)
    return bins


def collate_packed(examples: list[Example]) -> dict[str, torch.Tensor]:
    """Concatenate examples into one row; ``position_ids`` restart at 0 for each example.

    Run the model with ``attention_mask=None`` and ``use_cache=False``: transformers then
    derives a block-diagonal causal mask from the restarting positions, so no token attends
    across an example boundary.
    """
    ids = [t for e in examples for t in e.input_ids]
    targets = [t for e in examples for t in e.targets]
    positions = [p for e in examples for p in range(len(e))]
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "targets": torch.tensor([targets], dtype=torch.long),
    }


def collate_padded(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples into a ``(B, T)`` batch with an attention mask (for baselines)."""
    width = max(len(e) for e in examples)
    batch = len(examples)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    targets = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        targets[row, :n] = torch.tensor(e.targets)
        attention_mask[row, :n] = 1
        position_ids[row, :n] = torch.arange(n)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "targets": targets,
        "position_ids": position_ids,
    }
