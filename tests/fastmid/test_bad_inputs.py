"""A catalogue of bad inputs: each gives one line on stderr, exit code 2 and an output dir
exactly as it was before the command ran (absent, or byte for byte the same).

Every case runs the CLI in-process through :func:`fastmid.cli.main` on a tiny model saved to
a temp dir. A case builds its inputs and returns the argv plus the words the error must
contain; the table of messages in the docs is this file.
"""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fastmid.cli import main
from fastmid.recipe import checkpoint
from tests.fastmid._runs import RECORDS, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread_torch_path")


# The tiny model of the command-line tests: 5 blocks load quickly (see conftest.model_dir).
MODEL_LAYERS = 5


@dataclass
class Env:
    """What a case may use: a temp dir, the tiny model, a good data file, the output dir."""

    tmp: Path
    model: Path
    data: Path
    out: Path
    monkeypatch: pytest.MonkeyPatch

    def train(self, *extra: str, model: Path | None = None, data: Path | None = None) -> list[str]:
        """argv of a one-step ``fastmid train`` with ``extra`` flags."""
        return [
            "train", "--model", str(model or self.model), "--data", str(data or self.data),
            "--output-dir", str(self.out), "--precision", "fp32", "--max-steps", "1",
            "--no-eval", "--batch-tokens", "256", "--max-length", "64", "--rank", "4", *extra,
        ]  # fmt: skip

    def model_copy(self, name: str, drop: tuple[str, ...] = ()) -> Path:
        """A copy of the tiny model dir without the files named in ``drop``."""
        path = self.tmp / name
        shutil.copytree(self.model, path)
        for file in drop:
            (path / file).unlink()
        return path


Case = Callable[[Env], tuple[list[str], list[str]]]
CASES: dict[str, Case] = {}


def case(fn: Case) -> Case:
    CASES[fn.__name__] = fn
    return fn


# --- training data ---------------------------------------------------------------------------


@case
def data_missing(env: Env):
    path = env.tmp / "nope.jsonl"
    return env.train(data=path), ["data file not found", str(path)]


@case
def data_empty_file(env: Env):
    path = env.tmp / "empty.jsonl"
    path.write_bytes(b"")
    return env.train(data=path), ["no records", str(path)]


@case
def data_only_blank_lines(env: Env):
    path = env.tmp / "blank.jsonl"
    path.write_text("\n  \n\n")
    return env.train(data=path), ["no records", str(path)]


@case
def data_binary(env: Env):
    path = env.tmp / "weights.jsonl"
    path.write_bytes(bytes(range(256)) * 4)
    return env.train(data=path), [str(path), "'utf-8' codec can't decode byte 0x80"]


@case
def data_not_utf8(env: Env):
    path = env.tmp / "latin1.jsonl"
    record = json.dumps({"question": "Combien coûte ça?", "answer": "#### 3"}, ensure_ascii=False)
    path.write_bytes(record.encode("latin-1") + b"\n")
    return env.train(data=path), [str(path), "'utf-8' codec can't decode byte 0xfb"]


@case
def data_truncated_last_line(env: Env):
    path = env.tmp / "cut.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in RECORDS[:3])
    path.write_text(text + json.dumps(RECORDS[3])[:25])
    return env.train(data=path), [f"{path}:4", "malformed JSON"]


@case
def data_unknown_record_shape(env: Env):
    path = write_jsonl(env.tmp / "shape.jsonl", [RECORDS[0], {"text": "free text"}])
    return env.train(data=path), [f"{path}:2", "unknown record shape", "text"]


@case
def data_record_not_an_object(env: Env):
    path = env.tmp / "list.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n[1, 2, 3]\n")
    return env.train(data=path), [f"{path}:2", "unknown record shape", "JSON list"]


@case
def data_empty_answer(env: Env):
    path = write_jsonl(
        env.tmp / "noanswer.jsonl", [RECORDS[0], {"question": "2+2?", "answer": " "}]
    )
    return env.train(data=path), [f"{path}:2", "empty answer"]


@case
def data_messages_without_content(env: Env):
    records = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}]
    path = write_jsonl(env.tmp / "messages.jsonl", records)
    return env.train(data=path), [f"{path}:1", "'role' and 'content'"]


@case
def data_path_is_a_directory(env: Env):
    path = env.tmp / "datadir"
    path.mkdir()
    return env.train(data=path), ["is a directory", str(path)]


@case
def eval_data_missing(env: Env):
    path = env.tmp / "no-eval.jsonl"
    argv = env.train("--eval", "--eval-data", str(path))
    return argv, ["data file not found", str(path)]


# --- model and tokenizer -----------------------------------------------------------------------


@case
def model_path_missing(env: Env):
    path = env.tmp / "no-model"
    return env.train(model=path), ["model path not found", str(path)]


@case
def model_dir_without_config(env: Env):
    path = env.model_copy("noconfig", drop=("config.json",))
    return env.train(model=path), ["no config.json", str(path)]


@case
def model_dir_without_weights(env: Env):
    path = env.model_copy("noweights", drop=("model.safetensors",))
    return env.train(model=path), ["no model weights", str(path)]


@case
def model_not_a_causal_lm(env: Env):
    path = env.tmp / "encoder"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    return env.train(model=path), ["'vit' model, not a causal language model"]


@case
def tokenizer_without_eos(env: Env):
    path = env.model_copy("noeos")
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("eos_token", None)
    config_path.write_text(json.dumps(config))
    return env.train(model=path), ["tokenizer has no EOS token"]


def _write_gguf(path: Path, arch: str, keys: dict[str, int | float]) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in keys.items():
        if isinstance(value, float):
            writer.add_float32(f"{arch}.{key}", value)
        else:
            writer.add_uint32(f"{arch}.{key}", value)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@case
def gguf_of_an_encoder_decoder(env: Env):
    t5_keys = {
        "block_count": 2, "context_length": 8, "embedding_length": 4, "feed_forward_length": 8,
        "attention.head_count": 1, "attention.key_length": 4, "attention.value_length": 4,
        "attention.layer_norm_rms_epsilon": 1e-6, "attention.relative_buckets_count": 4,
    }  # fmt: skip
    path = _write_gguf(env.tmp / "t5.gguf", "t5", t5_keys)
    return env.train(model=path), [str(path), "'t5' model, not a causal language model"]


@case
def gguf_of_an_unsupported_architecture(env: Env):
    path = _write_gguf(env.tmp / "bert.gguf", "bert", {"block_count": 2})
    return env.train(model=path), [str(path), "architecture bert"]


@case
def gguf_that_is_not_gguf(env: Env):
    path = env.tmp / "fake.gguf"
    path.write_bytes(b"PK\x03\x04 a zip file renamed")
    return env.train(model=path), [str(path), "not a GGUF file"]


# --- Mid-Block LoRA and optimiser settings -----------------------------------------------------


def _flags(name: str, flags: list[str], needles: list[str]) -> None:
    def build(env: Env):
        return env.train(*flags), needles

    build.__name__ = name
    case(build)


_flags("band_reversed", ["--band", "0.9,0.1"], ["band '0.9,0.1'", "0 <= start < end <= 1"])
_flags("band_beyond_the_model", ["--band", "12-14"], ["band layer 12 is outside the layers 0..4"])
_flags("band_not_a_band", ["--band", "middle"], ["band 'middle' is not one of"])
_flags("rank_zero", ["--rank", "0"], ["rank must be a positive integer, got 0"])
_flags("rank_wider_than_the_layer", ["--rank", "4096"], ["rank 4096", "64"])
_flags("alpha_negative", ["--alpha", "-8"], ["alpha must be positive, got -8.0"])
_flags("dropout_one", ["--dropout", "1"], ["dropout must be in [0, 1), got 1.0"])
_flags("lr_zero", ["--lr", "0"], ["lr must be positive, got 0.0"])
_flags("lr_not_finite", ["--lr", "nan"], ["lr must be a finite number, got nan"])
_flags("target_unknown", ["--targets", "q_proj,qq_proj"], ["unknown target 'qq_proj'"])
_flags("target_not_a_name", ["--targets", "q-proj"], ["unknown target 'q-proj'; known: q_proj"])
_flags("targets_empty", ["--targets", ","], ["targets must name at least one linear layer"])


# --- output dir, resume, checkpoints -----------------------------------------------------------


@case
def output_dir_not_empty(env: Env):
    env.out.mkdir()
    (env.out / "notes.txt").write_text("keep me")
    return env.train(), ["not empty", "--overwrite", "--resume"]


@case
def output_dir_is_a_file(env: Env):
    env.out.write_text("a file where the output dir should be")
    return env.train(), ["exists and is not a directory"]


@case
def resume_and_overwrite(env: Env):
    return env.train("--resume", "--overwrite"), ["--resume and --overwrite exclude each other"]


@case
def resume_without_checkpoint(env: Env):
    env.out.mkdir()
    (env.out / "notes.txt").write_text("keep me")
    return env.train("--resume"), ["no checkpoint", str(env.out)]


def _leave_checkpoint(env: Env) -> Path:
    """A run interrupted after its first step: ``out/checkpoint`` holds step 1 of 3."""
    from fastmid.recipe import train as train_module

    real = train_module.StopFlag.installed

    def stop_after_one_step(self):  # the flag is raised before step 1's checkpoint decision
        self.requested = True
        return real(self)

    env.monkeypatch.setattr(train_module.StopFlag, "installed", stop_after_one_step)
    assert main(env.train("--max-steps", "3")) == 130
    env.monkeypatch.setattr(train_module.StopFlag, "installed", real)
    assert (env.out / checkpoint.CHECKPOINT_DIR / "manifest.json").is_file()
    return env.out / checkpoint.CHECKPOINT_DIR


@case
def resume_with_a_changed_rank(env: Env):
    _leave_checkpoint(env)
    return env.train("--max-steps", "3", "--resume", "--rank", "2"), [
        "--resume: rank is 2 but the checkpoint was trained with 4"
    ]


@case
def resume_with_a_corrupted_checkpoint(env: Env):
    ckpt = _leave_checkpoint(env)
    blob = bytearray((ckpt / "adapter.safetensors").read_bytes())
    blob[-3] ^= 0xFF  # one flipped byte in the last tensor's data
    (ckpt / "adapter.safetensors").write_bytes(bytes(blob))
    return env.train("--max-steps", "3", "--resume"), [
        str(ckpt),
        "adapter.safetensors",
        "checksum",
        "no valid checkpoint",
    ]


@case
def full_disk_while_saving_a_checkpoint(env: Env):
    """The disk fills up during the step-2 checkpoint: the step-1 one must survive as it was."""
    real_write = checkpoint._write_file
    calls = {"n": 0}

    def write_file(path: Path, data: bytes) -> dict:
        calls["n"] += 1
        if calls["n"] == 7:  # step 2's checkpoint, its second file (5 files per checkpoint)
            path.write_bytes(data[: len(data) // 2])  # half of it made it to the disk
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, data)

    env.monkeypatch.setattr(checkpoint, "_write_file", write_file)
    return env.train("--max-steps", "3", "--save-every", "1"), [
        "cannot save the checkpoint",
        "No space left on device",
        "the previous checkpoint is kept",
    ]


# --- the other commands ------------------------------------------------------------------------


@case
def eval_adapter_missing(env: Env):
    env.out.mkdir()
    path = env.tmp / "no-adapter"
    argv = ["eval", "--model", str(env.model), "--adapter", str(path), "--data", str(env.data)]
    return [*argv, "--output", str(env.out / "pred.jsonl")], ["adapter directory not found"]


@case
def eval_data_truncated(env: Env):
    env.out.mkdir()
    path = env.tmp / "cut.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(RECORDS[1])[:10])
    argv = ["eval", "--model", str(env.model), "--data", str(path)]
    return [*argv, "--output", str(env.out / "pred.jsonl")], [f"{path}:2", "malformed JSON"]


@case
def analyze_tuned_missing(env: Env):
    argv = ["analyze", "--base", str(env.model), "--tuned", str(env.tmp / "nothing")]
    return [*argv, "--output-dir", str(env.out)], ["--tuned not found"]


@case
def probe_model_without_weights(env: Env):
    env.out.mkdir()
    path = env.model_copy("probe-noweights", drop=("model.safetensors",))
    argv = ["probe", "--model", str(path), "--data", str(env.data)]
    return [*argv, "--output", str(env.out / "probe.json")], ["no model weights"]


def _snapshot(path: Path) -> dict[str, bytes] | str | None:
    """Everything under ``path`` (relative name → bytes), its text if a file, None if absent."""
    if not path.exists():
        return None
    if path.is_file():
        return path.read_text()
    return {
        str(p.relative_to(path)): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(path.rglob("*"))
    }


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(
    name: str,
    model_dir: Path,
    good_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    env = Env(tmp_path, model_dir, good_data, tmp_path / "out", monkeypatch)
    argv, needles = CASES[name](env)
    # The full-disk run writes step 1's checkpoint itself; it is checked on its own below.
    check_after = AFTER.get(name)
    before = _snapshot(env.out)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"fastmid {argv[0]}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    if check_after is not None:
        check_after(env)
    else:
        assert _snapshot(env.out) == before


def _assert_step_one_checkpoint_intact(env: Env) -> None:
    names = sorted(p.name for p in env.out.iterdir())
    assert names == [checkpoint.CHECKPOINT_DIR, "metrics.jsonl"], names  # no temp dir left
    ckpt = env.out / checkpoint.CHECKPOINT_DIR
    assert checkpoint.verify_checkpoint(ckpt) is None
    assert json.loads((ckpt / "state.json").read_text())["extra"]["step"] == 1


# Cases whose output dir is checked by its own function instead of "unchanged".
AFTER: dict[str, Callable[[Env], None]] = {
    "full_disk_while_saving_a_checkpoint": _assert_step_one_checkpoint_intact
}


def test_catalogue_has_at_least_25_cases() -> None:
    assert len(CASES) >= 25
