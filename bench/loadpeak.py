"""Host memory of loading the embedded SmolLM2-135M quantized: block by block against whole.

    python -m bench.loadpeak [--method nf4] [--dtype bf16] [--out bench/results]

Each way of loading runs in a fresh process (``--worker WAY``), which imports everything and
loads the tokenizer first (its own row says what that costs), then measures its resident
memory (``fastmid.memory``: the kernel's ``VmRSS`` and the ``VmHWM`` high-water mark, reset
before the load) around the load:

- ``train``: ``load_model_blockwise`` + ``apply_midblock(load_block=...)`` with the paper's
  defaults and ``quantize``, what ``fastmid train --quantize`` runs (fp32 adapters included);
- ``eval``: ``load_model_blockwise`` + ``quantize_frozen(load_block=...)``, the quantized base
  that ``fastmid eval --quantize`` loads before its adapter;
- ``whole``: ``load_model`` + ``apply_midblock``, the load before block-by-block loading;
- ``tokenizer``: a first tokenizer load alone, in a process that has not loaded one.

The peak is compared with the model's bytes in bf16 and with what the issue of loading block
by block promises: the loaded model's own bytes plus one decoder block in bf16. Writes
``loadpeak.json`` and ``loadpeak.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

MIB = 2**20
WAYS = ("train", "eval", "whole", "tokenizer")


def model_bytes(model: Any) -> dict[str, int]:
    """Bytes the patched model holds: its decoder linears as stored and in bf16, every other
    tensor (each storage once)."""
    from fastmid.engine.quantize import frozen_weight_bytes, stored_tensors

    frozen = frozen_weight_bytes(model)
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        for s in stored_tensors(t):
            if s.untyped_storage().data_ptr() not in seen:
                seen.add(s.untyped_storage().data_ptr())
                total += s.untyped_storage().nbytes()
    return {"decoder_linears_bf16": frozen["bf16"], "stored": total}


def worker(way: str, method: str, dtype_name: str, model: str | None) -> dict[str, Any]:
    """One process: imports (and the tokenizer), then the measured load of ``model`` (default:
    the embedded one); bytes as integers."""
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (imports are not the load)
    from transformers import AutoTokenizer

    from fastmid.engine import blockload  # noqa: F401
    from fastmid.engine.blocks import find_decoder_layers
    from fastmid.engine.midblock import MidBlockConfig, apply_midblock
    from fastmid.engine.models import DTYPES, default_model_dir, load_model, load_model_blockwise
    from fastmid.engine.quantize import import_torchao_quietly, quantize_frozen
    from fastmid.memory import peak_rss_bytes, reset_peak_rss, rss_bytes

    import_torchao_quietly()
    dtype = DTYPES[dtype_name]
    source = Path(model) if model else default_model_dir()
    if way != "tokenizer":
        # Its first load costs ~45 MiB that stay (the tokenizer row): not the weights' load.
        AutoTokenizer.from_pretrained(str(source))
    torch.manual_seed(0)
    before = rss_bytes()
    if not reset_peak_rss():
        raise SystemExit("this kernel cannot reset the peak-RSS mark")
    cfg = MidBlockConfig(quantize=method)
    if way == "tokenizer":
        AutoTokenizer.from_pretrained(str(source))
    elif way in ("train", "eval"):
        lm, _, _, load_block = load_model_blockwise(model, dtype, "cpu")
        assert load_block.note is None, load_block.note
        if way == "train":
            apply_midblock(lm, cfg, load_block=load_block)
        else:
            quantize_frozen(lm, method, load_block=load_block)
    else:
        lm = load_model(model, dtype)[0]
        apply_midblock(lm, cfg)
    model = lm if way != "tokenizer" else None
    out = {
        "way": way,
        "peak_above_start": peak_rss_bytes() - before,
        "after_above_start": rss_bytes() - before,
        "rss_at_start": before,
    }
    if model is not None:
        out.update(model_bytes(model))
        out["blocks"] = len(find_decoder_layers(model))
    return out


# Random-initialised Llama shapes of the sizes users fine-tune (Llama-3.2-1B, Llama-3.1-8B).
CONFIGS: dict[str, dict[str, Any]] = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                     tie_word_embeddings=True),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                     tie_word_embeddings=False),
}  # fmt: skip
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def random_checkpoint(name: str, out: Path) -> Path:
    """A bf16 safetensors directory of ``CONFIGS[name]`` with random weights (and the embedded
    model's tokenizer, which loading needs and whose vocabulary size does not matter here)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from fastmid.engine.models import default_model_dir

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**CONFIGS[name]), dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="1GB")
    for f in TOKENIZER_FILES:
        if (default_model_dir() / f).is_file():
            shutil.copy(default_model_dir() / f, out / f)
    return out


def estimate(name: str, method: str) -> dict[str, int]:
    """The load peaks block-by-block loading promises for ``CONFIGS[name]``, from shapes and one
    real block: the weights outside the blocks in bf16, every block as quantized, the fp32
    adapters of the default band and rank (train only), plus one block in bf16."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from fastmid.engine.blocks import find_decoder_layers
    from fastmid.engine.midblock import MidBlockConfig, resolve_band, resolve_rank
    from fastmid.engine.quantize import quantize_block, stored_tensors

    config = LlamaConfig(**CONFIGS[name])
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    skeleton.tie_weights()  # a tied LM head is the embedding: stored once
    blocks = find_decoder_layers(skeleton)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    outside = sum(2 * p.numel() for p in skeleton.parameters() if id(p) not in in_blocks)
    torch.manual_seed(0)
    block = LlamaDecoderLayer(config, 0).to(torch.bfloat16)
    block_bf16 = sum(2 * p.numel() for p in block.parameters())
    block.requires_grad_(False)
    quantize_block(0, block, method)
    quantized = sum(
        s.untyped_storage().nbytes() for t in block.parameters() for s in stored_tensors(t)
    )
    cfg = MidBlockConfig()
    band = resolve_band(cfg.band, len(blocks))
    rank = resolve_rank(cfg.rank, cfg.rank_budget, len(blocks), len(band))
    per_layer = sum(
        rank * (m.in_features + m.out_features)
        for t in cfg.targets
        for m in [blocks[0].get_submodule(p) for p in _target_paths(blocks[0], t)]
    )
    adapters = 4 * per_layer * len(band)
    base = outside + len(blocks) * quantized
    return {
        "model_bf16_bytes": outside + len(blocks) * block_bf16,
        "eval_peak": base + block_bf16,
        "train_peak": base + adapters + block_bf16,
        "adapter_bytes": adapters,
    }


def _target_paths(block: Any, target: str) -> list[str]:
    return [n for n, _ in block.named_modules() if n.rsplit(".", 1)[-1] == target]


def run(way: str, method: str, dtype: str, model: Path | None = None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.loadpeak", "--worker", way, "--method", method]
    cmd += ["--dtype", dtype] + (["--model", str(model)] if model else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(result: dict[str, Any]) -> str:
    rows = {r["way"]: r for r in result["workers"]}
    whole_bf16 = result["model_bf16_bytes"]
    block_bf16 = rows["train"]["decoder_linears_bf16"] / rows["train"]["blocks"]
    lines = [
        f"Load peak of the embedded SmolLM2-135M, --quantize {result['method']}, "
        f"{result['dtype']} (commit {result['commit']}, {result['machine']})",
        "",
        f"CPU, fresh process per row, RSS above the process's RSS once imports and a first "
        f"tokenizer load are done; {result['load']} on 2 shared cores (the bytes do not depend "
        "on the load).",
        "",
        f"Reference bytes: whole model in bf16 {whole_bf16 / MIB:.1f} MiB (its embedding "
        f"{result['embedding_bytes'] / MIB:.1f} MiB); one decoder block's linears in bf16 "
        f"{block_bf16 / MIB:.2f} MiB. 'Loaded' is what the model holds after the load (for "
        "train: the fp32 adapters too).",
        "",
        "| load | peak MiB | after MiB | loaded model MiB | peak / model bf16 | "
        "peak / (loaded + one bf16 block) |",
        "|---|---|---|---|---|---|",
    ]
    for way in ("train", "eval", "whole"):
        r = rows[way]
        p = r["peak_above_start"]
        lines.append(
            f"| {way} | {p / MIB:.1f} | {r['after_above_start'] / MIB:.1f} | "
            f"{r['stored'] / MIB:.1f} | {p / whole_bf16:.2f} | "
            f"{p / (r['stored'] + block_bf16):.2f} |"
        )
    tok = rows["tokenizer"]
    lines.append(
        f"| tokenizer (first load) | {tok['peak_above_start'] / MIB:.1f} | "
        f"{tok['after_above_start'] / MIB:.1f} | | | |"
    )
    if result.get("random"):
        lines += [
            "",
            "Random-initialised Llama configs, bf16 safetensors: 'measured' loads a checkpoint "
            "written to disk in a fresh process as above; 'promised' is computed from the "
            "shapes and one real quantized block: the weights outside the blocks in bf16, every "
            "block quantized, the fp32 adapters (train) and one block in bf16.",
            "",
            "| config | load | model bf16 GiB | measured peak GiB | × model bf16 | "
            "promised GiB | × model bf16 |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in result["random"]:
            bf16 = r["model_bf16_bytes"]
            measured = {w["way"]: w["peak_above_start"] for w in r.get("workers", [])}
            for way in ("train", "eval"):
                m = measured.get(way)
                got = f"{m / 2**30:.2f} | {m / bf16:.2f}" if m is not None else "— | —"
                lines.append(
                    f"| {r['config']} | {way} | {bf16 / 2**30:.2f} | {got} | "
                    f"{r[way + '_peak'] / 2**30:.2f} | {r[way + '_peak'] / bf16:.2f} |"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadpeak")
    parser.add_argument("--worker", choices=WAYS, help=argparse.SUPPRESS)
    parser.add_argument("--method", default="nf4", choices=("nf4", "int8"))
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--model", help=argparse.SUPPRESS)  # a worker's model directory
    parser.add_argument(
        "--random",
        nargs="*",
        default=["llama-1b"],
        choices=sorted(CONFIGS),
        help="random-initialised configs written to disk and loaded (train and eval)",
    )
    parser.add_argument(
        "--estimate",
        nargs="*",
        default=sorted(CONFIGS),
        choices=sorted(CONFIGS),
        help="configs whose peaks are also computed from shapes and one real block",
    )
    args = parser.parse_args(argv)
    if args.worker:
        json.dump(worker(args.worker, args.method, args.dtype, args.model), sys.stdout)
        sys.stdout.write("\n")
        return 0

    from bench.machine import machine_info
    from fastmid.fileio import write_text_atomic

    info = machine_info()
    workers = [run(way, args.method, args.dtype) for way in WAYS]
    from safetensors import safe_open

    from fastmid.engine.models import default_model_dir

    with safe_open(str(default_model_dir() / "model.safetensors"), "pt") as f:
        keys = f.keys()
        shapes = {k: f.get_slice(k).get_shape() for k in keys}
    numel = {k: 1 for k in shapes}
    for k, shape in shapes.items():
        for n in shape:
            numel[k] *= n
    result: dict[str, Any] = {
        "commit": info.get("commit"),
        "machine": info.get("cpu"),
        "load": "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "method": args.method,
        "dtype": args.dtype,
        "model_bf16_bytes": 2 * sum(numel.values()),
        "embedding_bytes": 2 * numel["model.embed_tokens.weight"],
        "workers": workers,
        "random": [],
    }
    import tempfile

    for name in sorted(set(args.random) | set(args.estimate)):
        row: dict[str, Any] = {"config": name, **estimate(name, args.method)}
        if name in args.random:
            with tempfile.TemporaryDirectory() as tmp:
                path = random_checkpoint(name, Path(tmp) / name)
                row["workers"] = [run(way, args.method, "bf16", path) for way in ("train", "eval")]
        result["random"].append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "loadpeak.json", json.dumps(result, indent=1) + "\n")
    write_text_atomic(out / "loadpeak.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
