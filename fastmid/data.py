"""Training data: records from files or datasets, tokenization with loss masks, packing and
collation.

:func:`load_records` reads JSONL itself and parquet, CSV, JSON, ``save_to_disk`` directories and
Hugging Face dataset ids through ``datasets`` (an optional extra). Records in the common shapes
(question/answer, prompt/response, prompt/completion, Alpaca's instruction/input/output,
OpenAI messages, ShareGPT conversations, or columns named with ``fields``) are normalised to
``{"question", "answer"}``, ``{"prompt", "response"}`` or ``{"messages": [...]}``.
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from fastmid.errors import UserError

IGNORE_INDEX = -100
QA_PROMPT = "Question: {question}\nAnswer:"
_BUNDLED = {"train": "gsm_train.jsonl", "test": "gsm_test.jsonl", "heldout": "heldout.txt"}


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


# Record shapes recognised in every input form: (name, columns that must all be present). The
# first match wins; each is normalised to question/answer, prompt/response or messages.
RECORD_SHAPES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("question/answer", ("question", "answer")),
    ("prompt/response", ("prompt", "response")),
    ("prompt/completion", ("prompt", "completion")),
    ("instruction/input/output", ("instruction", "output")),
    ("messages", ("messages",)),
    ("conversations", ("conversations",)),
)
_SHAPES = ", ".join("{" + name + "}" for name, _ in RECORD_SHAPES)
_FIELDS_HINT = "map the columns with --fields prompt=COLUMN,response=COLUMN"
# What --fields may map: a prompt and a response column, or one column of chat messages.
FIELD_ROLES = ("prompt", "response", "messages")
# ShareGPT speaker names -> chat roles.
_SPEAKERS = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "system": "system",
}
# Local files read through `datasets` (an optional extra), by suffix -> its builder.
_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json"}


def parse_fields(spec: str | dict[str, str] | None) -> dict[str, str] | None:
    """``"prompt=q,response=a"`` → ``{"prompt": "q", "response": "a"}`` (or ``messages=col``)."""
    if spec is None or isinstance(spec, dict):
        mapping = spec
    else:
        mapping = {}
        for part in (p for p in str(spec).replace(" ", "").split(",") if p):
            role, sep, column = part.partition("=")
            if not sep or not column:
                raise UserError(f"--fields: {part!r} is not ROLE=COLUMN (e.g. prompt=question)")
            mapping[role] = column
    if mapping is None:
        return None
    unknown = [r for r in mapping if r not in FIELD_ROLES]
    if unknown:
        roles = ", ".join(FIELD_ROLES)
        raise UserError(f"--fields: unknown role {unknown[0]!r}; roles are {roles}")
    if set(mapping) not in ({"prompt", "response"}, {"messages"}):
        raise UserError("--fields needs prompt=COLUMN,response=COLUMN or messages=COLUMN")
    return mapping


def record_shape(columns: Any, fields: dict[str, str] | None = None) -> str | None:
    """The shape name for a record's columns (``"fields"`` when ``fields`` maps them all)."""
    present = set(columns)
    if fields is not None and set(fields.values()) <= present:
        return "fields"
    for name, needed in RECORD_SHAPES:
        if set(needed) <= present:
            return name
    return None


def _text(record: dict, column: str, where: str) -> str:
    value = record.get(column)
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    # CSV readers type a column of numbers as numbers; the text is what was written.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise UserError(f"{where}: column {column!r} holds {type(value).__name__}, expected text")


def _chat(turns: Any, where: str, sharegpt: bool) -> list[dict]:
    if not isinstance(turns, list):
        raise UserError(f"{where}: expected a list of chat turns, got {type(turns).__name__}")
    out = []
    for turn in turns:
        if sharegpt:
            if not (isinstance(turn, dict) and "from" in turn and "value" in turn):
                raise UserError(f"{where}: each conversation turn needs 'from' and 'value'")
            role = _SPEAKERS.get(str(turn["from"]).lower())
            if role is None:
                raise UserError(f"{where}: unknown speaker {turn['from']!r} in a conversation")
            out.append({"role": role, "content": turn["value"]})
        else:
            if not (isinstance(turn, dict) and "role" in turn and "content" in turn):
                raise UserError(f"{where}: each message needs 'role' and 'content' strings")
            out.append({"role": turn["role"], "content": turn["content"]})
    return out


def normalize_record(
    record: Any, where: str, fields: dict[str, str] | None = None, shape: str | None = None
) -> dict:
    """One record in any recognised shape → ``{question, answer}``, ``{prompt, response}`` or
    ``{messages}``; a UserError at ``where`` names the keys found and the flag to use, or what
    makes the record unusable."""
    out = _normalize(record, where, fields, shape)
    problem = _record_problem(out)
    if problem is not None:
        raise UserError(f"{where}: {problem}")
    return out


def _normalize(record: Any, where: str, fields: dict[str, str] | None, shape: str | None) -> dict:
    if not isinstance(record, dict):
        raise UserError(f"{where}: unknown record shape with a JSON {type(record).__name__}")
    shape = shape or record_shape(record, fields)
    if shape is None:
        got = "keys [" + ", ".join(sorted(map(str, record))) + "]"
        raise UserError(
            f"{where}: unknown record shape with {got}; expected {_SHAPES}, or {_FIELDS_HINT}"
        )
    text = lambda column: _text(record, column, where)
    if shape == "fields":
        if "messages" in fields:
            return {"messages": _chat(record[fields["messages"]], where, sharegpt=False)}
        return {"prompt": text(fields["prompt"]), "response": text(fields["response"])}
    if shape == "question/answer":
        return {"question": text("question"), "answer": text("answer")}
    if shape == "prompt/response":
        return {"prompt": text("prompt"), "response": text("response")}
    if shape == "prompt/completion":
        return {"prompt": text("prompt"), "response": text("completion")}
    if shape == "instruction/input/output":
        extra = text("input").strip()
        prompt = text("instruction")
        return {
            "prompt": f"{prompt}\n\n{extra}" if extra else prompt,
            "response": text("output"),
        }
    if shape == "messages":
        return {"messages": _chat(record["messages"], where, sharegpt=False)}
    return {"messages": _chat(record["conversations"], where, sharegpt=True)}


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


class RecordView(Sequence):
    """Normalised records over a ``datasets.Dataset``, converted one row at a time.

    The text stays in the dataset's memory-mapped Arrow table; tokenizing iterates this view,
    so the raw text is never held a second time as Python objects.
    """

    def __init__(self, dataset: Any, where: str, fields: dict[str, str] | None) -> None:
        self.dataset = dataset
        self.where = where
        self.fields = fields
        self.shape = record_shape(dataset.column_names, fields)
        if self.shape is None:
            found = ", ".join(dataset.column_names)
            raise UserError(
                f"{where}: unknown record shape with columns [{found}]; expected {_SHAPES}, "
                f"or {_FIELDS_HINT}"
            )

    def __len__(self) -> int:
        return len(self.dataset)

    def _one(self, row: dict, index: int) -> dict:
        return normalize_record(row, f"{self.where} row {index}", self.fields, self.shape)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self._one(self.dataset[i], i) for i in range(len(self))[index]]
        if index < 0:
            index += len(self)
        return self._one(self.dataset[index], index)

    def __iter__(self) -> Iterator[dict]:
        for index, row in enumerate(self.dataset):
            yield self._one(row, index)


class Subset(Sequence):
    """The records of ``base`` at ``indices``, read through on access (nothing is copied)."""

    def __init__(self, base: Sequence[dict], indices: list[int]) -> None:
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self.base[i] for i in self.indices[index]]
        return self.base[self.indices[index]]


def split_records(
    records: Sequence[dict], ratio: float, seed: int
) -> tuple[Sequence[dict], Sequence[dict]]:
    """Hold out ``ratio`` of ``records`` (at least one), chosen by ``seed``: (train, held out)."""
    if not 0.0 < ratio < 1.0:
        raise UserError(f"eval_split_ratio must be in (0, 1), got {ratio}")
    count = len(records)
    held = max(1, round(count * ratio))
    if held >= count:
        raise UserError(f"eval_split_ratio {ratio} leaves no training records of {count}")
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return Subset(records, sorted(order[held:])), Subset(records, sorted(order[:held]))


def _datasets(what: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise UserError(f"{what} needs the datasets package: pip install 'fastmid[data]'") from None
    datasets.disable_progress_bars()
    return datasets


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _load_dataset(source: str, where: str, **kwargs: Any) -> Any:
    datasets = _datasets(f"reading {where}")
    try:
        return datasets.load_dataset(source, **kwargs)
    except Exception as err:  # datasets raises many types for a bad id or file: one line
        raise UserError(f"cannot load dataset {where}: {_first_line(err)}") from None


def _saved_dataset(path: Path, split: str | None) -> Any:
    """A ``save_to_disk`` directory: its Dataset, or a DatasetDict's ``split`` (train)."""
    datasets = _datasets(f"reading the saved dataset {path}")
    try:
        data = datasets.load_from_disk(str(path))
    except Exception as err:
        raise UserError(f"cannot load the saved dataset {path}: {_first_line(err)}") from None
    if isinstance(data, datasets.DatasetDict):
        name = split or ("train" if "train" in data else next(iter(data)))
        if name not in data:
            raise UserError(f"{path} has no split {name!r}; it has {', '.join(data)}")
        data = data[name]
    return data


def _nonempty(records: Sequence[dict], where: str) -> Sequence[dict]:
    if len(records) == 0:
        raise UserError(f"data has no records: {where}")
    return records


def _directory_records(path: Path, split: str | None, fields: dict | None) -> Sequence[dict]:
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _nonempty(RecordView(_saved_dataset(path, split), str(path), fields), str(path))
    readable = {".parquet", ".csv", ".json", ".jsonl", ".arrow"}
    if not any(p.suffix in readable for p in path.rglob("*") if p.is_file()):
        raise UserError(
            f"data path is a directory with no dataset in it (neither save_to_disk output nor "
            f"parquet/csv/json files): {path}"
        )
    # A folder of data files loads the way a hub dataset repository does.
    data = _load_dataset(str(path), str(path), split=split or "train")
    return _nonempty(RecordView(data, str(path), fields), str(path))


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


def _jsonl_records(path: Path, fields: dict[str, str] | None) -> list[dict]:
    """Read a JSONL file of records; UserError naming ``file:line`` for a bad line."""
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
            # json's msg leaves the position to its own suffix ("Unterminated string starting
            # at"); the column is given here, counted from 1 as editors count.
            what = err.msg.removesuffix(" starting at")
            raise UserError(
                f"{path}:{lineno}: malformed JSON at column {err.colno} ({what})"
            ) from None
        records.append(normalize_record(record, f"{path}:{lineno}", fields))
    if not records:
        raise UserError(f"data file has no records: {path}")
    return records


def load_records(source: str | Path, fields: str | dict[str, str] | None = None) -> Sequence[dict]:
    """Records from any supported input, normalised by :func:`normalize_record`.

    ``source`` is a JSONL file (read here; errors name ``file:line``); a ``.parquet``, ``.csv``
    or ``.json`` file; a directory written by ``save_to_disk`` (``DIR:split`` picks a split);
    a directory of data files; or a Hugging Face dataset id with optional config and split,
    ``openai/gsm8k:main:train``. All but JSONL are read with ``datasets`` (an optional extra)
    and converted row by row as they are used. ``fields`` maps other column names.
    """
    mapping = parse_fields(fields)
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return _directory_records(path, None, mapping)
    if path.exists() or path.suffix in (".jsonl", *_FILE_BUILDERS):
        if not path.exists():
            raise UserError(f"data file not found: {path}")
        if path.suffix in _FILE_BUILDERS:
            builder = _FILE_BUILDERS[path.suffix]
            data = _load_dataset(builder, str(path), data_files=str(path), split="train")
            return _nonempty(RecordView(data, str(path), mapping), str(path))
        return _jsonl_records(path, mapping)
    # NAME[:config[:split]]: a hub id, or a local directory followed by a split.
    name, _, rest = text.partition(":")
    if Path(name).expanduser().is_dir():
        return _directory_records(Path(name).expanduser(), rest or None, mapping)
    if text.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"data file not found: {text}")
    config, _, split = rest.partition(":")
    data = _load_dataset(name, text, name=config or None, split=split or "train")
    return _nonempty(RecordView(data, text, mapping), text)


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
