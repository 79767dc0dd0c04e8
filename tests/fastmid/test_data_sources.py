"""Inputs besides JSONL (parquet, CSV, JSON, save_to_disk, a dataset folder loaded like a hub
repository) and every record shape, all built locally in the test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastmid.engine.loss import IGNORE_INDEX
from fastmid.errors import UserError
from fastmid.recipe import data

datasets = pytest.importorskip("datasets")

QA = {"question": "What is 2 plus 3?", "answer": "2 + 3 = 5. #### 5"}
# Every recognised shape, and what it becomes.
SHAPES = [
    (QA, QA),
    ({"prompt": "P", "response": "R"}, {"prompt": "P", "response": "R"}),
    ({"prompt": "P", "completion": "C"}, {"prompt": "P", "response": "C"}),
    (
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"prompt": "Add the numbers.\n\n2 and 3", "response": "5"},
    ),
    (
        {"instruction": "Say hi.", "input": "", "output": "Hi"},
        {"prompt": "Say hi.", "response": "Hi"},
    ),
    (
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
    ),
    (
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Yo"},
            ]
        },
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Yo"},
            ]
        },
    ),
]


@pytest.mark.parametrize(("record", "want"), SHAPES)
def test_every_shape_is_recognised_in_jsonl_and_parquet(record, want, tmp_path: Path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps(record) + "\n")
    assert data.load_records(jsonl) == [want]
    parquet = tmp_path / "d.parquet"
    datasets.Dataset.from_list([record, record]).to_parquet(str(parquet))
    assert list(data.load_records(parquet)) == [want, want]


def alpaca_rows(n: int = 5) -> list[dict]:
    return [
        {"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"{2 * i + 1}"}
        for i in range(n)
    ]


def test_csv_json_and_save_to_disk(tmp_path: Path):
    rows = alpaca_rows()
    ds = datasets.Dataset.from_list(rows)
    want = [{"prompt": r["instruction"], "response": r["output"]} for r in rows]
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    ds.to_json(str(tmp_path / "d.json"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict(
        {"train": ds.select(range(2)), "test": ds.select(range(2, 5))}
    ).save_to_disk(str(tmp_path / "saved_dict"))
    for source in ("d.csv", "d.json", "saved"):
        records = data.load_records(tmp_path / source)
        assert len(records) == 5 and list(records) == want, source
        # Indexing and slicing convert rows on access, as tokenization reads them.
        assert records[1] == want[1] and records[-1] == want[-1] and records[:2] == want[:2]
    assert list(data.load_records(tmp_path / "saved_dict")) == want[:2]  # train by default
    assert list(data.load_records(f"{tmp_path / 'saved_dict'}:test")) == want[2:]
    with pytest.raises(UserError, match="has no split 'dev'; it has train, test"):
        data.load_records(f"{tmp_path / 'saved_dict'}:dev")


def test_dataset_folder_loads_like_a_hub_repository(tmp_path: Path):
    """`datasets.load_dataset` on a folder is the code path of a hub id (name[:config[:split]])."""
    repo = tmp_path / "org-gsm"
    (repo / "data").mkdir(parents=True)
    datasets.Dataset.from_list([QA] * 3).to_parquet(str(repo / "data" / "train-00000.parquet"))
    datasets.Dataset.from_list([QA]).to_parquet(str(repo / "data" / "test-00000.parquet"))
    assert list(data.load_records(repo)) == [QA] * 3
    assert list(data.load_records(f"{repo}:test")) == [QA]


def test_hub_id_without_network_is_one_line(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    calls = []
    real = datasets.load_dataset

    def spy(path, *args, **kwargs):
        calls.append((path, kwargs.get("name"), kwargs.get("split")))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    offline = r"^cannot load dataset no-such-org/no-such-set:main:test: .*Hub"
    with pytest.raises(UserError, match=offline):
        data.load_records("no-such-org/no-such-set:main:test")
    assert calls == [("no-such-org/no-such-set", "main", "test")]


def test_fields_map_other_columns(tmp_path: Path):
    rows = [{"q_text": "Q1", "a_text": "A1", "id": 1}, {"q_text": "Q2", "a_text": None, "id": 2}]
    path = tmp_path / "odd.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    with pytest.raises(UserError) as err:
        data.load_records(path)
    message = str(err.value)
    assert "\n" not in message
    assert "columns [q_text, a_text, id]" in message
    assert "--fields prompt=COLUMN,response=COLUMN" in message
    records = data.load_records(path, fields="prompt=q_text,response=a_text")
    assert records[0] == {"prompt": "Q1", "response": "A1"}
    with pytest.raises(UserError, match="row 1: empty answer"):
        records[1]
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"dialog": [{"role": "user", "content": "x"}]}) + "\n")
    assert data.load_records(chats, fields="messages=dialog") == [
        {"messages": [{"role": "user", "content": "x"}]}
    ]
    for bad, pattern in [
        ("prompt=q_text", "needs prompt=COLUMN,response=COLUMN"),
        ("answer=a_text,prompt=q", "unknown role 'answer'"),
        ("prompt", "is not ROLE=COLUMN"),
    ]:
        with pytest.raises(UserError, match=pattern):
            data.load_records(path, fields=bad)


def test_bad_inputs_are_one_line(tmp_path: Path):
    with pytest.raises(UserError, match="data file not found"):
        data.load_records(tmp_path / "missing.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="directory with no dataset"):
        data.load_records(tmp_path / "empty")
    sharegpt = tmp_path / "s.jsonl"
    sharegpt.write_text(json.dumps({"conversations": [{"from": "robot", "value": "x"}]}) + "\n")
    with pytest.raises(UserError, match=r"s\.jsonl:1: unknown speaker 'robot'"):
        data.load_records(sharegpt)
    datasets.Dataset.from_list([{"question": "q", "answer": [3]}]).to_parquet(
        str(tmp_path / "n.parquet")
    )
    with pytest.raises(UserError, match="row 0: column 'answer' holds list, expected text"):
        list(data.load_records(tmp_path / "n.parquet"))


def test_split_records_is_seeded_and_disjoint():
    records = [{"prompt": str(i), "response": "r"} for i in range(20)]
    train, held = data.split_records(records, 0.25, seed=3)
    assert len(train) == 15 and len(held) == 5
    names = {r["prompt"] for r in train} | {r["prompt"] for r in held}
    assert len(names) == 20
    again = data.split_records(records, 0.25, seed=3)[1]
    assert list(again) == list(held)
    assert list(data.split_records(records, 0.25, seed=4)[1]) != list(held)
    with pytest.raises(UserError, match="leaves no training records"):
        data.split_records(records[:1], 0.5, seed=0)


def test_tokenizing_a_parquet_alpaca_set(tmp_path: Path):
    from tests.fastmid.test_data import tiny_tokenizer

    path = tmp_path / "alpaca.parquet"
    datasets.Dataset.from_list(alpaca_rows(3)).to_parquet(str(path))
    tok = tiny_tokenizer()
    examples = data.tokenize_records(data.load_records(path), tok, max_length=64)
    assert len(examples) == 3
    answer = [t for t in examples[1].targets if t != IGNORE_INDEX]
    assert tok.decode(answer[:-1]).strip() == "3"  # the output, then EOS
