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

Tokenized data is held flat (:class:`TokenizedExamples`): every example's ids in one int32
array, a bool "has a label" array beside it and int64 offsets, about 5 bytes per token instead
of ~70 for Python lists. Tokenization calls the tokenizer on batches of records and, given a
cache directory, stores its arrays as ``.npy`` files named by a hash of the data's content, the
tokenizer and the settings; a second run memory-maps them instead of tokenizing.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import itertools
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from fastmid.engine.loss import IGNORE_INDEX
from fastmid.errors import UserError
from fastmid.fileio import write_text_atomic

# Record formats: qa = the paper's prompt and answer; chat = the tokenizer's chat template.
FORMATS = ("qa", "chat")
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

    @property
    def fingerprint(self) -> str | None:
        """The dataset's own content fingerprint with this view's shape and column mapping."""
        base = getattr(self.dataset, "_fingerprint", None)
        if base is None:
            return None
        return _digest(str(base).encode(), json.dumps([self.shape, self.fields]).encode())

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

    @property
    def fingerprint(self) -> str | None:
        """The base records' fingerprint with the chosen indices (None if the base has none)."""
        base = records_fingerprint(self.base)
        if base is None:
            return None
        return _digest(base.encode(), np.asarray(self.indices, dtype=np.int64).tobytes())

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


# Bytes read at a time when hashing a data file, so its key never needs the whole file in memory.
HASH_CHUNK = 1 << 20


def file_fingerprint(stream: BinaryIO, fields: dict[str, str] | None) -> str:
    """The content key of a data file's records: a SHA-256 of the bytes read from ``stream``
    (in chunks) with the column mapping. The tokenization cache is keyed by it."""
    h = hashlib.sha256()
    for chunk in iter(lambda: stream.read(HASH_CHUNK), b""):
        h.update(chunk)
    return _digest(h.digest(), json.dumps(fields, sort_keys=True).encode())


def _parse_jsonl(path: Path, fields: dict[str, str] | None) -> tuple[list[dict], str]:
    """The normalised records of a JSONL file and its :func:`file_fingerprint`; UserError
    naming ``file:line`` for a bad line."""
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
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
    return records, file_fingerprint(io.BytesIO(raw), fields)


class Records(list):
    """Records read from a file, with ``fingerprint``: its :func:`file_fingerprint` (the
    tokenization cache's key for them)."""

    fingerprint: str | None = None


class JsonlRecords(Sequence):
    """The records of a JSONL file known from the cache's note of a file with the same bytes
    read without error: ``fingerprint`` (:func:`file_fingerprint`) and the count, the file
    parsed only the first time a record is asked for, so a run whose tokens are cached never
    parses it."""

    def __init__(
        self, path: Path, fields: dict[str, str] | None, fingerprint: str, count: int
    ) -> None:
        self.path, self.fields, self.fingerprint = path, fields, fingerprint
        self._count = count
        self._records: list[dict] | None = None

    def _parsed(self) -> list[dict]:
        if self._records is None:
            records, fingerprint = _parse_jsonl(self.path, self.fields)
            if fingerprint != self.fingerprint or len(records) != self._count:
                raise UserError(f"data file {self.path} changed while the run was reading it")
            self._records = records
        return self._records

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: Any) -> Any:
        return self._parsed()[index]


def _count_note(cache_dir: Path, fingerprint: str) -> Path:
    return Path(cache_dir) / f"{fingerprint}.records.json"


def _jsonl_records(
    path: Path, fields: dict[str, str] | None, cache_dir: Path | None
) -> Sequence[dict]:
    """A JSONL file's records: unparsed when ``cache_dir`` notes that a file with the same
    bytes was read without error (its record count), else parsed now (noting the count)."""
    if cache_dir is not None:
        try:
            with path.open("rb") as f:
                fingerprint = file_fingerprint(f, fields)
        except OSError as err:
            raise UserError(f"cannot read data file {path}: {err}") from None
        try:
            count = json.loads(_count_note(cache_dir, fingerprint).read_text())["records"]
        except (OSError, ValueError, KeyError, TypeError):
            count = None
        if isinstance(count, int) and count > 0:
            return JsonlRecords(path, fields, fingerprint, count)
    records, fingerprint = _parse_jsonl(path, fields)
    if cache_dir is not None:
        try:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            note = json.dumps({"records": len(records)})
            write_text_atomic(_count_note(cache_dir, fingerprint), note)
        except OSError:  # an unwritable cache location: the next run parses again
            pass
    out = Records(records)
    out.fingerprint = fingerprint
    return out


def load_records(
    source: str | Path,
    fields: str | dict[str, str] | None = None,
    cache_dir: Path | None = None,
) -> Sequence[dict]:
    """Records from any supported input, normalised by :func:`normalize_record`.

    ``source`` is a JSONL file (read here; errors name ``file:line``); a ``.parquet``, ``.csv``
    or ``.json`` file; a directory written by ``save_to_disk`` (``DIR:split`` picks a split);
    a directory of data files; or a Hugging Face dataset id with optional config and split,
    ``openai/gsm8k:main:train``. All but JSONL are read with ``datasets`` (an optional extra)
    and converted row by row as they are used. ``fields`` maps other column names. With
    ``cache_dir`` (the one :func:`tokenize_records` is given), a JSONL file whose bytes were
    read without error before is only hashed, not parsed, until a record is asked for.
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
        return _jsonl_records(path, mapping, cache_dir)
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


def _digest(*parts: bytes) -> str:
    """A hex SHA-256 over ``parts``, each length-prefixed so no two splits collide."""
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def records_fingerprint(records: Any) -> str | None:
    """A hash of what ``records`` hold, for records read from a file or dataset (None for
    records built in memory, which are not cached)."""
    return getattr(records, "fingerprint", None)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything about ``tokenizer`` that decides the ids: its serialised fast
    tokenizer (vocabulary, merges, normaliser, special-token handling) or, for a slow one, its
    class and vocabulary; plus the chat template and the EOS id."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str().encode()
    else:
        vocab = sorted(tokenizer.get_vocab().items())
        body = json.dumps([type(tokenizer).__name__, vocab]).encode()
    extra = [getattr(tokenizer, "chat_template", None), tokenizer.eos_token_id]
    return _digest(body, json.dumps(extra, default=str).encode())


def tokenized_key(fingerprint: str, tokenizer: Any, fmt: str, max_length: int, loss_on: str) -> str:
    """The cache entry name of records with ``fingerprint`` (:func:`records_fingerprint`)
    tokenized by ``tokenizer`` with these settings."""
    settings = json.dumps({"format": fmt, "max_length": max_length, "loss_on": loss_on})
    return _digest(
        fingerprint.encode(), tokenizer_fingerprint(tokenizer).encode(), settings.encode()
    )


class TokenizedExamples(Sequence):
    """Tokenized examples stored flat: all ids in one int32 array, ``labelled[t]`` (bool) where
    ``targets[t]`` carries a label, and ``offsets`` (int64, one more than examples) where each
    example starts. Indexing gives an :class:`Example` built on access; :meth:`lengths` and
    :meth:`num_loss_tokens` read the arrays directly. The arrays may be memory-mapped."""

    def __init__(self, ids: np.ndarray, labelled: np.ndarray, offsets: np.ndarray) -> None:
        if not (len(ids) == len(labelled) == int(offsets[-1])) or int(offsets[0]) != 0:
            raise ValueError("ids, labelled and offsets disagree on the token count")
        self.ids, self.labelled, self.offsets = ids, labelled, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _one(self, index: int) -> Example:
        a, b = int(self.offsets[index]), int(self.offsets[index + 1])
        ids = self.ids[a:b]
        following = np.append(ids[1:], IGNORE_INDEX)
        targets = np.where(self.labelled[a:b], following, IGNORE_INDEX)
        return Example(input_ids=ids.tolist(), targets=targets.tolist())

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self._one(i) for i in range(len(self))[index]]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} of {len(self)}")
        return self._one(index)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens of each example (int64)."""
        return np.diff(self.offsets)

    @property
    def num_tokens(self) -> int:
        """Tokens of all examples."""
        return len(self.ids)

    def num_loss_tokens(self, indices: Sequence[int] | None = None) -> int:
        """Labelled positions of the examples at ``indices`` (all when None)."""
        if indices is None:
            return int(np.count_nonzero(self.labelled))
        before = np.concatenate(([0], np.cumsum(self.labelled, dtype=np.int64)))
        rows = np.asarray(indices, dtype=np.int64)
        return int((before[self.offsets[rows + 1]] - before[self.offsets[rows]]).sum())

    @classmethod
    def from_examples(cls, examples: Sequence[Example]) -> TokenizedExamples:
        """Flat arrays of in-memory :class:`Example` s."""
        lengths = np.fromiter((len(e) for e in examples), dtype=np.int64, count=len(examples))
        offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
        total = int(offsets[-1])
        ids = np.fromiter(
            itertools.chain.from_iterable(e.input_ids for e in examples), np.int32, total
        )
        targets = itertools.chain.from_iterable(e.targets for e in examples)
        labelled = np.fromiter((t != IGNORE_INDEX for t in targets), np.bool_, total)
        return cls(ids, labelled, offsets)

    # The three arrays, by file name, as the cache stores them.
    _FILES = ("ids", "labelled", "offsets")

    def save(self, directory: Path) -> bool:
        """Write the arrays as ``.npy`` files into the new directory ``directory``, atomically
        (a temporary sibling renamed into place; an existing one is left as it is). False when
        nothing was stored: the arrays in memory are then what the caller keeps using."""
        try:
            directory.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        except OSError:  # an unwritable cache location
            return False
        try:
            for name in self._FILES:
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(getattr(self, name)))
            os.replace(tmp, directory)
        except OSError:  # another process stored the same key first, or the disk is full
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        return True

    @classmethod
    def load(cls, directory: Path) -> TokenizedExamples | None:
        """The arrays saved in ``directory``, memory-mapped read-only; None if absent/damaged."""
        try:
            arrays = [
                np.load(directory / f"{name}.npy", mmap_mode="r", allow_pickle=False)
                for name in cls._FILES
            ]
            return cls(*arrays)
        except (OSError, ValueError, IndexError):
            return None


# Records tokenized per tokenizer call: large enough for the fast tokenizer's batch call to pay,
# small enough that one chunk's Python lists stay a few MB.
TOKENIZE_CHUNK = 1024


def _encode_qa(
    records: Sequence[dict], first: int, tokenizer: Any
) -> list[tuple[list[int], list[bool]]]:
    pairs = [_question_answer(r, first + k) for k, r in enumerate(records)]
    prompts = [QA_PROMPT.format(question=q) for q, _ in pairs]
    answers = [" " + a.strip() for _, a in pairs]
    prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [
        ([*p, *a, eos], [False] * len(p) + [True] * (len(a) + 1))
        for p, a in zip(prompt_ids, answer_ids, strict=True)
    ]


def _render(tokenizer: Any, turns: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        turns, tokenize=False, add_generation_prompt=generation_prompt
    )


def _chat_spans(tokenizer: Any, turns: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns, found by
    rendering growing prefixes; this holds for any template whose renders of prefixes are text
    prefixes."""
    full = _render(tokenizer, turns, False)
    spans = []
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        before = _render(tokenizer, turns[:i], True)
        upto = _render(tokenizer, turns[: i + 1], False)
        if not (full.startswith(before) and full.startswith(upto)):
            raise UserError("the tokenizer's chat template does not render turns as prefixes")
        spans.append((len(before), len(upto)))
    return full, spans


def _encode_chat(
    records: Sequence[dict], first: int, tokenizer: Any
) -> list[tuple[list[int], list[bool]]]:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("--format chat needs a tokenizer with a chat template; use --format qa")
    rendered = [_chat_spans(tokenizer, _messages(r, first + k)) for k, r in enumerate(records)]
    enc = tokenizer(
        [text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True
    )
    out = []
    for (_, spans), ids, offsets in zip(
        rendered, enc["input_ids"], enc["offset_mapping"], strict=True
    ):
        mask = [any(a <= start < b for a, b in spans) for start, _ in offsets]
        out.append((list(ids), mask))
    return out


def _flatten(
    encoded: list[tuple[list[int], list[bool]]], max_length: int, loss_on: str
) -> TokenizedExamples:
    """Truncate, shift the loss masks into label flags and drop examples left without one."""
    encoded = [(ids[:max_length], mask[:max_length]) for ids, mask in encoded]
    lengths = np.fromiter((len(ids) for ids, _ in encoded), np.int64, len(encoded))
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    total = int(offsets[-1])
    ids = np.fromiter(itertools.chain.from_iterable(i for i, _ in encoded), np.int32, total)
    if loss_on == "all":
        mask = np.ones(total, dtype=np.bool_)
    else:
        mask = np.fromiter(itertools.chain.from_iterable(m for _, m in encoded), np.bool_, total)
    # Position t is labelled when token t+1 of the same example carries loss.
    labelled = np.zeros(total, dtype=np.bool_)
    labelled[:-1] = mask[1:]
    ends = offsets[1:][lengths > 0]
    labelled[ends - 1] = False
    before = np.concatenate(([0], np.cumsum(labelled, dtype=np.int64)))
    keep = (before[offsets[1:]] - before[offsets[:-1]]) > 0
    if keep.all():
        return TokenizedExamples(ids, labelled, offsets)
    rows = np.repeat(keep, lengths)
    kept = lengths[keep]
    return TokenizedExamples(
        ids[rows], labelled[rows], np.concatenate(([0], np.cumsum(kept))).astype(np.int64)
    )


def _concat(parts: list[TokenizedExamples]) -> TokenizedExamples:
    ids = np.concatenate([p.ids for p in parts])
    labelled = np.concatenate([p.labelled for p in parts])
    lengths = np.concatenate([p.lengths for p in parts])
    return TokenizedExamples(ids, labelled, np.concatenate(([0], np.cumsum(lengths))))


def tokenize_records(
    records: Sequence[dict],
    tokenizer: Any,
    fmt: str = "qa",
    max_length: int = 512,
    loss_on: str = "response",
    cache_dir: Path | None = None,
) -> TokenizedExamples:
    """Tokenize records into :class:`TokenizedExamples`, truncated to ``max_length`` tokens.

    ``loss_on="response"`` puts loss on the answer (qa) or assistant turns (chat);
    ``"all"`` on every token after the first, as the paper does. Examples left with no loss
    token after truncation are dropped; UserError if none remain. With ``cache_dir`` and
    records read from a file or dataset (see :func:`records_fingerprint`), the result is
    stored there under a hash of the records, the tokenizer and these settings, and a later
    call with the same ones loads it memory-mapped without calling the tokenizer.
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown data format {fmt!r}; expected qa or chat")
    if loss_on not in ("response", "all"):
        raise UserError(f"unknown loss_on {loss_on!r}; expected response or all")
    if max_length < 2:
        raise UserError(f"max_length must be at least 2, got {max_length}")
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token")
    source = records_fingerprint(records) if cache_dir is not None else None
    entry = None
    if source is not None:
        entry = Path(cache_dir) / tokenized_key(source, tokenizer, fmt, max_length, loss_on)
        cached = TokenizedExamples.load(entry)
        if cached is not None:
            return cached
    encode = _encode_qa if fmt == "qa" else _encode_chat
    parts = []
    for first in range(0, len(records), TOKENIZE_CHUNK):
        chunk = records[first : first + TOKENIZE_CHUNK]
        for k, record in enumerate(chunk):
            if _record_kind(record) is None:
                raise _shape_error(record, f"record {first + k}")
        parts.append(_flatten(encode(chunk, first, tokenizer), max_length, loss_on))
    examples = _concat(parts) if parts else None
    if examples is None or len(examples) == 0:
        raise UserError(
            f"no examples left with loss tokens after tokenizing {len(records)} records "
            f"(max_length={max_length}, loss_on={loss_on})"
        )
    if entry is not None:
        examples.save(entry)
    return examples


def _lengths(examples: Sequence[Example] | TokenizedExamples) -> np.ndarray:
    if isinstance(examples, TokenizedExamples):
        return examples.lengths
    return np.fromiter((len(e) for e in examples), dtype=np.int64, count=len(examples))


def _best_fit_plan(sizes: np.ndarray, capacity: int) -> np.ndarray:
    """Best-fit decreasing over item ``sizes`` (small ints): for each slot of the sizes sorted
    in decreasing order, the bin it goes to.

    Every item of one size is interchangeable, so the plan is computed per size: a bin with
    free room ``f`` that best fits a size ``s`` keeps being the best fit until it has taken
    ``f // s`` items, and a new bin takes ``capacity // s``. The loop runs once per (bin, size)
    pair rather than per item, and the free rooms live in a sorted list of distinct values
    (at most ``capacity + 1``) with a stack of bins for each, so finding the best fit is a
    bisection.
    """
    values, counts = np.unique(sizes, return_counts=True)
    values, counts = values[::-1], counts[::-1]
    frees: list[int] = []  # distinct free rooms with at least one bin, ascending
    stacks: dict[int, list[int]] = {}
    slot_bins: list[int] = []
    takes: list[int] = []
    opened = 0

    def put(room: int, bins: Sequence[int]) -> None:
        if room <= 0 or not bins:
            return
        if room not in stacks:
            bisect.insort(frees, room)
            stacks[room] = []
        stacks[room].extend(bins)

    for size, count in zip(values.tolist(), counts.tolist(), strict=True):
        left = count
        while left:
            j = bisect.bisect_left(frees, size)
            if j == len(frees):
                per = capacity // size
                full, rest = divmod(left, per)
                slot_bins.extend(range(opened, opened + full))
                takes.extend([per] * full)
                put(capacity - per * size, range(opened, opened + full))
                opened += full
                if rest:
                    slot_bins.append(opened)
                    takes.append(rest)
                    put(capacity - rest * size, (opened,))
                    opened += 1
                break
            room = frees[j]
            stack = stacks[room]
            b = stack.pop()
            if not stack:
                del stacks[room]
                frees.pop(j)
            take = min(left, room // size)
            slot_bins.append(b)
            takes.append(take)
            left -= take
            put(room - take * size, (b,))
    return np.repeat(np.asarray(slot_bins, np.int64), takes)


# Rounded lengths are interchangeable in a bin; about this many examples should share each.
SHARED_LENGTH = 32


def _length_quantum(lengths: np.ndarray, max_tokens: int) -> int:
    """The unit lengths are rounded up to before packing: 1 (exact) when the data has about
    ``SHARED_LENGTH`` examples of every length, else the smallest power of two that gets there,
    at most ``max_tokens // 512`` (so rounding costs under 1/512 of the budget per example)."""
    spread = int(lengths.max() - lengths.min()) + 1
    quantum = 1
    while quantum * 2 <= max_tokens // 512 and len(lengths) * quantum < SHARED_LENGTH * spread:
        quantum *= 2
    return quantum


def pack_batches(
    examples: Sequence[Example] | TokenizedExamples,
    max_tokens: int,
    seed: int,
    shuffle: bool = True,
    epoch: int = 0,
) -> list[list[int]]:
    """Group whole examples into batches of at most ``max_tokens`` tokens.

    Returns lists of (ascending) indices into ``examples``. The bins come from best-fit
    decreasing on the examples' lengths (rounded up for small data sets, see
    :func:`_length_quantum`), which fixes how many examples of each (rounded) length a bin
    holds; with ``shuffle``, ``(seed, epoch)`` then decides which of the equally long examples
    fill those places and the order of the batches, so seeds and epochs see different
    micro-batch compositions while the number of batches stays the same. Without ``shuffle``
    the result does not depend on the seed. O(n log n).
    """
    if len(examples) == 0:
        raise UserError("cannot pack an empty dataset")
    lengths = _lengths(examples)
    longest = int(lengths.max())
    if longest > max_tokens:
        raise UserError(
            f"an example has {longest} tokens, more than the batch budget of {max_tokens}; "
            "raise the token budget or lower max_length"
        )
    quantum = _length_quantum(lengths, max_tokens)
    capacity = max_tokens // quantum
    # A length that rounds past the capacity fills its bin alone, as it would unrounded.
    sizes = np.minimum(-(-lengths // quantum), capacity)
    slot_bins = _best_fit_plan(sizes, capacity)
    n = len(lengths)
    if shuffle:
        rng = np.random.default_rng([seed & (2**64 - 1), epoch])
        tiebreak = rng.permutation(n)
    else:
        tiebreak = np.arange(n)
    # Slots are laid out by decreasing size; within a size the tie-break decides who fills them.
    order = np.lexsort((tiebreak, -sizes))
    bin_of = np.empty(n, dtype=np.int64)
    bin_of[order] = slot_bins
    members = np.argsort(bin_of, kind="stable")
    bounds = np.cumsum(np.bincount(bin_of)).tolist()
    flat = members.tolist()
    bins = [flat[a:b] for a, b in zip([0, *bounds[:-1]], bounds, strict=True)]
    if shuffle:
        bins = [bins[i] for i in rng.permutation(len(bins)).tolist()]
    return bins


#: Batch entries that stay on the host: read there (never a device→host copy) and moved to the
#: device by whoever needs them there.
HOST_KEYS = ("cu_seqlens",)


def collate_packed(examples: list[Example]) -> dict[str, torch.Tensor]:
    """Concatenate examples into one row; ``position_ids`` restart at 0 for each example.

    Besides ``input_ids``, ``position_ids`` and ``targets`` (1, T), the batch carries what the
    host already knows, so the step never reads it back from the device: ``cu_seqlens``, the
    example boundaries ``[0, L0, L0+L1, ..., T]`` (int32, on the host, see :data:`HOST_KEYS`),
    for varlen attention; and ``label_index``, the positions whose target is not -100, for the
    label-only LM head. Run the model with ``attention_mask=None`` and ``use_cache=False``.
    """
    ids = [t for e in examples for t in e.input_ids]
    targets = [t for e in examples for t in e.targets]
    positions = [p for e in examples for p in range(len(e))]
    bounds = [0]
    for e in examples:
        bounds.append(bounds[-1] + len(e))
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "targets": torch.tensor([targets], dtype=torch.long),
        "cu_seqlens": torch.tensor(bounds, dtype=torch.int32),
        "label_index": torch.tensor(
            [i for i, t in enumerate(targets) if t != IGNORE_INDEX], dtype=torch.long
        ),
    }


def batch_to(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """``batch`` with its tensors on ``device`` (asynchronous copies), the :data:`HOST_KEYS`
    left on the host."""
    return {k: v if k in HOST_KEYS else v.to(device, non_blocking=True) for k, v in batch.items()}


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
