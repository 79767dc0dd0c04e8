"""Loading a quantized model block by block from safetensors: the same model as loading it whole
then quantizing, without ever holding more than one decoder block in full precision."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from fastmid.engine import blockload
from fastmid.engine.adapters import load_adapter, save_adapter
from fastmid.engine.blocks import find_decoder_layers
from fastmid.engine.midblock import MidBlockConfig, apply_midblock
from fastmid.engine.models import load_model, load_model_blockwise
from fastmid.engine.quantize import QuantizedWeight, quantize_frozen, stored_tensors

from ._runs import RECORDS, make_tokenizer
from ._tiny import randomize_adapters, tiny_model

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")
NUM_LAYERS = 6
IDS = torch.tensor(
    [[5, 17, 99, 3, 42, 7, 8, 200, 31, 64, 12], [9, 9, 120, 33, 4, 250, 6, 1, 2, 5, 3]]
)


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama saved in fp32 safetensors (as the embedded model's cache is), with tied
    embeddings and every width a multiple of NF4's 64-value blocks."""
    model = tiny_model(
        "llama", NUM_LAYERS, intermediate_size=128, tie_word_embeddings=True, vocab_size=320
    )
    path = tmp_path_factory.mktemp("blockload") / "tiny"
    model.save_pretrained(path, safe_serialization=True)
    make_tokenizer([f"{r['question']} {r['answer']}" for r in RECORDS]).save_pretrained(path)
    return path


def config(method: str) -> MidBlockConfig:
    return MidBlockConfig(targets=TARGETS, rank=8, dropout=0.0, quantize=method, use_liger=False)


def whole_then_quantized(path: Path, method: str) -> nn.Module:
    torch.manual_seed(3)
    model = load_model(str(path), dtype=torch.bfloat16)[0]
    return apply_midblock(model, config(method))


def blockwise(path: Path, method: str) -> nn.Module:
    torch.manual_seed(3)
    model, _, _, load_block = load_model_blockwise(str(path), torch.bfloat16, "cpu")
    assert load_block.note is None
    return apply_midblock(model, config(method), load_block=load_block)


@pytest.fixture(scope="module")
def adapter(fp32_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained-looking adapter on layers 1-4 of the tiny model (random A and B)."""
    model = load_model(str(fp32_dir), dtype=torch.float32)[0]
    cfg = MidBlockConfig(band=[1, 2, 3, 4], targets=TARGETS, rank=8, use_liger=False)
    apply_midblock(model, cfg)
    randomize_adapters(model)
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    save_adapter(model, out)
    return out


def for_eval(path: Path, method: str, adapter: Path | None, by_block: bool) -> nn.Module:
    """What ``fastmid eval --quantize`` loads: by block, or loaded whole and then quantized."""
    if by_block:
        model, _, _, load_block = load_model_blockwise(str(path), torch.bfloat16, "cpu")
        assert load_block.note is None
        if adapter is not None:
            return load_adapter(model, adapter, method, load_block)
        return quantize_frozen(model, method, load_block=load_block)
    model = load_model(str(path), dtype=torch.bfloat16)[0]
    if adapter is not None:
        load_adapter(model, adapter)
    return quantize_frozen(model, method)


def stored(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    return {
        name: stored_tensors(t) for name, t in [*model.named_parameters(), *model.named_buffers()]
    }


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_blockwise_load_is_bit_identical_to_load_then_quantize(fp32_dir, method):
    want, got = whole_then_quantized(fp32_dir, method), blockwise(fp32_dir, method)
    want_tensors, got_tensors = stored(want), stored(got)
    assert list(got_tensors) == list(want_tensors)
    for name, tensors in want_tensors.items():
        for w, g in zip(tensors, got_tensors[name], strict=True):
            assert g.dtype == w.dtype and g.device == w.device, name
            assert torch.equal(g, w), name  # the quantized payloads, lora_A's init, embeddings
    quantized = [t for t in got.parameters() if isinstance(t, QuantizedWeight)]
    assert len(quantized) == 7 * NUM_LAYERS  # fused members count once each
    assert got.lm_head.weight is got.model.embed_tokens.weight
    assert not any(t.is_meta for t in got.parameters())
    randomize_adapters(want)
    randomize_adapters(got)
    with torch.no_grad():
        torch.testing.assert_close(got(IDS).logits, want(IDS).logits, rtol=0, atol=0)


@pytest.mark.parametrize("with_adapter", [True, False])
def test_eval_load_by_block_is_bit_identical_to_load_then_quantize(fp32_dir, adapter, with_adapter):
    chosen = adapter if with_adapter else None
    want = for_eval(fp32_dir, "nf4", chosen, by_block=False).eval()  # no adapter dropout
    got = for_eval(fp32_dir, "nf4", chosen, by_block=True).eval()
    want_tensors, got_tensors = stored(want), stored(got)
    assert list(got_tensors) == list(want_tensors)
    for name, tensors in want_tensors.items():
        for w, g in zip(tensors, got_tensors[name], strict=True):
            assert g.dtype == w.dtype and torch.equal(g, w), name
    assert not any(t.is_meta for t in got.parameters())
    with torch.no_grad():
        torch.testing.assert_close(got(IDS).logits, want(IDS).logits, rtol=0, atol=0)


def test_load_adapter_quantizes_only_while_patching(fp32_dir, adapter):
    model = load_model(str(fp32_dir), dtype=torch.bfloat16)[0]
    load_adapter(model, adapter)
    with pytest.raises(ValueError, match="when load_adapter patches"):
        load_adapter(model, adapter, "nf4")


@pytest.mark.parametrize("load", ["train", "eval with adapter", "eval"])
def test_blockwise_load_never_holds_two_blocks_in_full_precision(
    fp32_dir, adapter, monkeypatch, load
):
    """Every decoder-linear weight read from disk is tracked by its storage; at each read the
    bytes still alive must stay within one block's linears (they are all alive at the end of a
    block's load, so the maximum is exactly one block)."""
    read = blockload.ShardIndex.read
    live: list[tuple[StorageWeakRef, int]] = []
    peak = [0]

    def tracked(self, key, like, device):
        out = read(self, key, like, device)
        if ".layers." in key and key.endswith("_proj.weight"):
            live.append((StorageWeakRef(out.untyped_storage()), out.untyped_storage().nbytes()))
            peak[0] = max(peak[0], sum(n for ref, n in live if not ref.expired()))
        return out

    monkeypatch.setattr(blockload.ShardIndex, "read", tracked)
    if load == "train":
        model = blockwise(fp32_dir, "nf4")
    else:
        model = for_eval(fp32_dir, "nf4", adapter if "adapter" in load else None, by_block=True)
    block = find_decoder_layers(tiny_model("llama", 1, intermediate_size=128))[0]
    block_bytes = sum(2 * m.weight.numel() for m in block.modules() if isinstance(m, nn.Linear))
    assert len(live) == 7 * NUM_LAYERS
    assert peak[0] == block_bytes
    # Nothing read stays in full precision: every block's weights were replaced.
    assert all(ref.expired() for ref, _ in live)
    assert all(
        isinstance(m.weight, QuantizedWeight)
        for b in find_decoder_layers(model)
        for m in b.modules()
        if hasattr(m, "weight") and m.weight.dim() == 2
    )


def test_tensor_reads_are_chunked_and_exact(fp32_dir, monkeypatch):
    # Chunks far smaller than the embedding matrix: rows land where they belong, cast as a
    # whole-tensor cast would.
    monkeypatch.setattr(blockload, "CHUNK_BYTES", 1000)
    index = blockload.ShardIndex(fp32_dir)
    from safetensors.torch import load_file

    full = load_file(str(fp32_dir / "model.safetensors"))["model.embed_tokens.weight"]
    like = torch.empty(full.shape, dtype=torch.bfloat16, device="meta")
    got = index.read("model.embed_tokens.weight", like, torch.device("cpu"))
    assert torch.equal(got, full.to(torch.bfloat16))


def test_a_checkpoint_with_other_tensor_names_loads_whole(fp32_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for f in fp32_dir.iterdir():
        if f.suffix != ".safetensors":
            (renamed / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(fp32_dir / "model.safetensors"))
    tensors["model.norm.scale"] = tensors.pop("model.norm.weight")
    save_file(tensors, str(renamed / "model.safetensors"), metadata={"format": "pt"})
    model, _, _, load_block = load_model_blockwise(str(renamed), torch.bfloat16, "cpu")
    assert "model.norm.weight" in load_block.note and "loads whole" in load_block.note
    assert not any(t.is_meta for t in model.parameters())
    load_block(0)  # a no-op: nothing is left to load


@pytest.mark.usefixtures("one_thread_torch_path")
def test_quantized_train_loads_block_by_block_with_the_same_losses(
    model_dir, tmp_path, monkeypatch, capsys
):
    from fastmid.recipe.train import train
    from tests.fastmid._runs import losses, tiny_cfg, write_jsonl

    data = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    loaded: list[int] = []
    call = blockload.BlockLoader.__call__

    def counted(self, i):
        if self.index is not None:
            loaded.append(i)
        call(self, i)

    monkeypatch.setattr(blockload.BlockLoader, "__call__", counted)
    settings = dict(max_steps=3, quantize="int8", dropout=0.05)
    train(tiny_cfg(model_dir, data, tmp_path / "blockwise", **settings))
    assert loaded == list(range(10))
    assert "loads whole" not in capsys.readouterr().out
    # The same run with the model loaded whole (as a checkpoint whose names differ would be).
    monkeypatch.setattr(blockload, "checkpoint_mismatch", lambda model, index: "x.weight")
    train(tiny_cfg(model_dir, data, tmp_path / "whole", **settings))
    assert "loads whole" in capsys.readouterr().out
    assert loaded == list(range(10))
    got, want = losses(tmp_path / "blockwise"), losses(tmp_path / "whole")
    assert len(got) == 3 and got == want
