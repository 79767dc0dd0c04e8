"""Data-parallel training on 2 CPU processes (gloo): DDP and FSDP2 against one process.

The 2-process runs start this file under torchrun (see ``_worker`` at the bottom); the
single-process reference runs the same loop in the pytest process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import fastmid.kernels._common as kernel_dispatch
import pytest
import torch
from safetensors.torch import load_file, save_file

from fastmid.engine.lora import is_fused
from fastmid.engine.midblock import MidBlockConfig, adapter_parameters, apply_midblock
from fastmid.errors import UserError
from fastmid.recipe import distributed
from fastmid.recipe.checkpoint import load_checkpoint, save_checkpoint
from fastmid.recipe.data import Example, collate_packed
from fastmid.recipe.train import forward_loss
from tests.fastmid._runs import (
    RECORDS,
    assert_adapters_close_after_adam,
    make_model_dir,
    metrics,
    tiny_settings,
    write_jsonl,
)

REPO = Path(__file__).resolve().parents[2]
# Micro-batches per optimizer step. 3 and 1 do not split evenly over 2 ranks (with 1, one
# rank computes nothing), which takes the explicit all-reduce path instead of DDP's.
STEP_SIZES = [4, 3, 2, 1, 4, 2]
RESUME_AT = 3  # the resume test stops after this many steps
# A short evaluation (greedy accuracy and held-out perplexity) in the end-to-end runs.
EVAL = dict(eval=True, eval_limit=4, max_new_tokens=6)


def make_examples(n: int = 40, seed: int = 5) -> list[Example]:
    """Random token sequences of 6..18 tokens; the first 3 positions carry no loss."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 19, (1,), generator=gen))
        ids = torch.randint(3, 256, (length,), generator=gen).tolist()
        targets = [-100] * 3 + ids[4:] + [-100]
        out.append(Example(input_ids=ids, targets=targets[:length]))
    return out


def schedule() -> list[list[list[int]]]:
    """Per step, its micro-batches; each micro-batch packs 2 examples."""
    steps, nxt = [], 0
    for size in STEP_SIZES:
        step = []
        for _ in range(size):
            step.append([nxt, nxt + 1])
            nxt += 2
        steps.append(step)
    return steps


def build(mode: str):
    """Tiny patched Llama (5 blocks, band 1..3), its data-parallel shell and optimizer."""
    from tests.fastmid._tiny import tiny_model

    model = tiny_model("llama", num_layers=5)
    cfg = MidBlockConfig(
        band=(0.2, 0.8),
        targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"),
        rank=4,
        dropout=0.0,  # dropout masks depend on which rank draws them; keep runs comparable
        # FSDP needs unfused groups; every mode uses them so all runs do the same arithmetic.
        fuse_groups=False,
    )
    torch.manual_seed(0)
    apply_midblock(model, cfg)
    model.train()
    dp = distributed.ParallelStep(model, mode, forward_loss, torch.device("cpu"))
    # Plain SGD: Adam's normalised step would hide a gradient off by a constant factor.
    optimizer = torch.optim.SGD(adapter_parameters(model), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - 0.1 * s)
    return model, dp, optimizer, scheduler


def train_steps(mode: str, first: int = 0, last: int = len(STEP_SIZES), ckpt: Path | None = None):
    """Run steps [first, last) the way fastmid's loop does; returns (losses, adapter tensors).

    With ``first > 0`` the run resumes from checkpoint ``ckpt``; with ``ckpt`` and
    ``first == 0`` it saves there (rank 0) after step ``last``.
    """
    examples = make_examples()
    model, dp, optimizer, scheduler = build(mode)
    if first > 0:
        load_checkpoint(ckpt, model, optimizer, scheduler)
    losses = []
    for step_batches in schedule()[first:last]:
        step_labels = sum(examples[i].num_loss_tokens for b in step_batches for i in b)
        total = torch.zeros(())
        for ids, sync in dp.micro_batches(step_batches):
            with sync:
                loss_sum, _ = dp.forward_loss(collate_packed([examples[i] for i in ids]))
                (loss_sum / step_labels).backward()
            total += loss_sum.detach()
        dp.reduce_gradients()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(distributed.all_reduce_sum(total)[0] / step_labels)
    if ckpt is not None and first == 0:
        if distributed.is_main():
            save_checkpoint(ckpt, model, optimizer, scheduler, {"step": last})
        distributed.barrier()  # no rank reads the checkpoint before rank 0 has written it
    names = {id(p): n for n, p in model.named_parameters()}
    return losses, {names[id(p)]: p.detach().clone() for p in adapter_parameters(model)}


# --------------------------------------------------------------------------------------------
# Helpers for the tests


@pytest.fixture
def torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the kernels' torch path, as the 2-process workers do."""
    monkeypatch.setattr(kernel_dispatch, "INTERPRET", False)


def torchrun(nproc: int, *args: str, timeout: float = 240) -> None:
    """Run this file's ``_worker`` under torchrun on ``nproc`` CPU processes."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        __file__,
        *args,
    ]
    # A session of its own, so a hung run is killed with all its workers rather than leaving
    # them orphaned and waiting on the rendezvous.
    with subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    ) as popen:  # fmt: skip
        try:
            stdout, stderr = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.communicate()
            raise
    proc = subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)
    # torchrun's own report hides the worker's traceback: show the workers' lines first.
    workers = "\n".join(line for line in proc.stderr.splitlines() if line.startswith("[rank"))
    assert proc.returncode == 0, workers[-6000:] or proc.stderr[-6000:]


def read_result(prefix: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
    losses = json.loads(prefix.with_suffix(".json").read_text())
    return losses, load_file(str(prefix.with_suffix(".safetensors")))


def assert_adapters_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        # fp32 sums in another order (2 ranks vs 1) differ by rounding only.
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def reference() -> tuple[list[float], dict[str, torch.Tensor]]:
    """The single-process run every 2-process run is compared with."""
    with single_process_torch_path():
        return train_steps("none")


@contextlib.contextmanager
def single_process_torch_path():
    saved = kernel_dispatch.INTERPRET
    kernel_dispatch.INTERPRET = False
    try:
        yield
    finally:
        kernel_dispatch.INTERPRET = saved


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One torchrun launch (process start-up dominates): DDP and FSDP over all steps, a DDP run
    that checkpoints at RESUME_AT, and a DDP run resuming a 1-process checkpoint."""
    out = tmp_path_factory.mktemp("dist")
    with single_process_torch_path():
        first, _ = train_steps("none", last=RESUME_AT, ckpt=out / "single_ckpt")
    (out / "single_first.json").write_text(json.dumps(first))
    model_dir = make_model_dir(out)
    train_file = write_jsonl(out / "train.jsonl", RECORDS)
    paths = {"model": str(model_dir), "data": str(train_file), "eval_data": str(train_file)}
    (out / "cli.json").write_text(json.dumps(paths))
    torchrun(2, "all", str(out))
    return out


def cli_config(out: Path, run: str, **over):
    """``fastmid train`` settings of the end-to-end runs (tiny model; 3 micro-batches a step,
    so 2 ranks split every step unevenly)."""
    paths = json.loads((out / "cli.json").read_text())
    settings = dict(
        eval_data=paths["eval_data"],
        dropout=0.0,
        fuse_groups=False,  # as FSDP runs them, so every run does the same arithmetic
        batch_tokens=128,
        grad_accum=3,
        max_steps=4,
    )
    return tiny_settings(paths["model"], paths["data"], out / run, **{**settings, **over})


@pytest.fixture(scope="module")
def single_process_dropout(two_process_runs: Path) -> Path:
    """One process, dropout 0.05: the reference of the 2-rank run with dropout."""
    from fastmid.recipe.config import build_config
    from fastmid.recipe.train import train

    with single_process_torch_path():
        train(build_config(None, cli_config(two_process_runs, "dropout_single", dropout=0.05)))
    return two_process_runs / "dropout_single"


@pytest.fixture(scope="module")
def single_process_cli(two_process_runs: Path) -> Path:
    """The same ``fastmid train`` run in one process (the reference of the 2-rank runs)."""
    from fastmid.recipe.config import build_config
    from fastmid.recipe.train import train

    with single_process_torch_path():
        train(build_config(None, cli_config(two_process_runs, "cli_single", **EVAL)))
    return two_process_runs / "cli_single"


# --------------------------------------------------------------------------------------------
# Tests


def test_shard_partitions_round_robin():
    items = list(range(7))
    shares = [distributed.shard(items, r, 3) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert distributed.shard([9], 1, 2) == []
    with pytest.raises(ValueError):
        distributed.shard(items, 2, 2)


def test_single_process_helpers_are_identity():
    assert not distributed.is_distributed()
    assert distributed.get_rank() == 0 and distributed.get_world_size() == 1
    assert distributed.is_main()
    assert distributed.all_reduce_sum(1.5, 2, torch.tensor([1.0, 2.0])) == [1.5, 2.0, 3.0]
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    env = distributed.init_distributed(torch.device("cpu"))
    assert (env.rank, env.world_size, env.is_main) == (0, 1, True)
    assert not distributed.is_distributed()


def test_resolve_parallel_modes():
    model = torch.nn.Linear(4, 4)
    cpu = torch.device("cpu")
    assert distributed.resolve_parallel("auto", model, cpu, 1) == "none"
    assert distributed.resolve_parallel("auto", model, cpu, 2) == "ddp"
    assert distributed.resolve_parallel("fsdp", model, cpu, 2) == "fsdp"
    with pytest.raises(UserError, match="parallel must be one of"):
        distributed.resolve_parallel("zero3", model, cpu, 2)
    assert distributed.param_bytes(model) == (16 + 4) * 4


def test_torchrun_command_runs_fastmid_standalone():
    cmd = distributed.torchrun_command(4, ["train", "--max-steps", "3"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in cmd and "--nproc-per-node=4" in cmd
    assert cmd[-5:] == ["-m", "fastmid", "train", "--max-steps", "3"]
    with pytest.raises(UserError):
        distributed.torchrun_command(0, ["train"])


def test_fsdp_refuses_fused_groups(torch_path: None):
    from tests.fastmid._tiny import tiny_model

    model = apply_midblock(tiny_model("llama", 5), MidBlockConfig(rank=2, fuse_groups=True))
    assert is_fused(model)
    with pytest.raises(ValueError, match="fuse_groups=False"):
        distributed.ParallelStep(model, "fsdp", forward_loss, torch.device("cpu"))
    unfused = apply_midblock(tiny_model("llama", 5), MidBlockConfig(rank=2, fuse_groups=False))
    assert not is_fused(unfused)
    gate_up_only = MidBlockConfig(rank=2, targets=("gate_proj", "up_proj", "down_proj"))
    assert is_fused(apply_midblock(tiny_model("llama", 5), gate_up_only))


def test_meta_built_model_patches_like_a_loaded_one(tmp_path: Path):
    """A model built on the meta device has no weight memory, and gets the buffers, the adapters
    (on the host) and the RNG state after patching that the loaded model gets."""
    from fastmid.engine import models

    model_dir = make_model_dir(tmp_path, num_layers=4)
    empty, _, _, files = models.load_empty_model(str(model_dir))
    loaded, _, _ = models.load_model(str(model_dir))
    assert files == [model_dir / "model.safetensors"]
    assert all(p.is_meta for p in empty.parameters())
    loaded_buffers = dict(loaded.named_buffers())
    assert [n for n, _ in empty.named_buffers()] == list(loaded_buffers)
    for name, buffer in empty.named_buffers():
        torch.testing.assert_close(buffer, loaded_buffers[name], rtol=0, atol=0)
    cfg = MidBlockConfig(band=(0.25, 0.75), targets=("q_proj", "gate_proj", "up_proj"))
    cfg = dataclasses.replace(cfg, fuse_groups=False)
    after = []
    for model in (empty, loaded):
        torch.manual_seed(3)
        apply_midblock(model, cfg)
        after.append(torch.rand(4))
    torch.testing.assert_close(after[0], after[1], rtol=0, atol=0)
    adapters = [dict(adapter_named(m)) for m in (empty, loaded)]
    assert adapters[0].keys() == adapters[1].keys() and adapters[0]
    for name, value in adapters[0].items():
        assert value.device.type == "cpu"
        torch.testing.assert_close(value, adapters[1][name], rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="meta"):
        distributed.ParallelStep(empty, "none", forward_loss, torch.device("cpu"))


def adapter_named(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, p.detach()) for n, p in model.named_parameters() if p.requires_grad]


def test_meta_build_needs_local_safetensors(tmp_path: Path):
    """No meta build (the caller loads whole) for a .bin checkpoint."""
    from fastmid.engine import models

    model_dir = make_model_dir(tmp_path, num_layers=2)
    weights = load_file(str(model_dir / "model.safetensors"))
    (model_dir / "model.safetensors").unlink()
    torch.save(weights, model_dir / "pytorch_model.bin")
    assert models.load_empty_model(str(model_dir)) is None


@pytest.mark.slow  # a torchrun launch
def test_ddp_two_ranks_match_one_process(two_process_runs: Path, reference):
    ref_losses, ref_adapter = reference
    losses, adapter = read_result(two_process_runs / "ddp")
    assert len(losses) == len(STEP_SIZES)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    # The adapters actually moved, so matching them is a real check.
    assert max((t.abs().max() for n, t in ref_adapter.items() if "lora_B" in n)) > 1e-3
    assert_adapters_close(adapter, ref_adapter)


@pytest.mark.slow  # a torchrun launch
def test_fsdp_gives_the_same_adapter_as_ddp(two_process_runs: Path):
    ddp_losses, ddp_adapter = read_result(two_process_runs / "ddp")
    fsdp_losses, fsdp_adapter = read_result(two_process_runs / "fsdp")
    torch.testing.assert_close(
        torch.tensor(fsdp_losses), torch.tensor(ddp_losses), rtol=1e-5, atol=0
    )
    assert_adapters_close(fsdp_adapter, ddp_adapter)
    # The blocks really are sharded (each rank holds half) after training and evaluating.
    shard = {"sharded_blocks": 5, "local_rows": 32, "global_rows": 64}
    sharding = json.loads((two_process_runs / "fsdp_sharding.json").read_text())
    assert sharding == {"after_step": shard, "after_eval": shard}


@pytest.mark.slow  # a torchrun launch
def test_adapters_identical_on_every_rank(two_process_runs: Path):
    for mode in ("ddp", "fsdp"):
        rank0 = load_file(str(two_process_runs / f"{mode}.safetensors"))
        rank1 = load_file(str(two_process_runs / f"{mode}_rank1.safetensors"))
        for name in rank0:
            assert torch.equal(rank0[name], rank1[name]), (mode, name)


@pytest.mark.slow  # a torchrun launch
def test_resume_on_another_world_size(two_process_runs: Path, reference, torch_path: None):
    """2 ranks stop at step 3 and checkpoint; 1 process resumes; equals an unbroken run."""
    ref_losses, ref_adapter = reference
    first_losses = json.loads((two_process_runs / "stopped.json").read_text())
    losses, adapter = train_steps("none", first=RESUME_AT, ckpt=two_process_runs / "stopped_ckpt")
    torch.testing.assert_close(
        torch.tensor(first_losses + losses), torch.tensor(ref_losses), rtol=1e-5, atol=0
    )
    assert_adapters_close(adapter, ref_adapter)


@pytest.mark.slow  # a torchrun launch
def test_resume_from_one_process_on_two_ranks(two_process_runs: Path, reference):
    """The other direction: 1 process checkpoints at step 3, 2 ranks (DDP) finish."""
    ref_losses, ref_adapter = reference
    first = json.loads((two_process_runs / "single_first.json").read_text())
    losses, adapter = read_result(two_process_runs / "resumed")
    torch.testing.assert_close(
        torch.tensor(first + losses), torch.tensor(ref_losses), rtol=1e-5, atol=0
    )
    assert_adapters_close(adapter, ref_adapter)


@pytest.mark.slow  # a torchrun launch
def test_fastmid_train_on_two_ranks_matches_one_process(
    two_process_runs: Path, single_process_cli: Path
):
    two = two_process_runs / "cli_ddp"
    got, want = metrics(two), metrics(single_process_cli)
    assert [m["step"] for m in got] == [m["step"] for m in want] == list(range(1, 5))
    torch.testing.assert_close(
        torch.tensor([m["loss"] for m in got]),
        torch.tensor([m["loss"] for m in want]),
        rtol=1e-5,
        atol=0,
    )
    # Token counts are summed over the ranks: the same tokens as one process saw.
    assert [m["tokens"] for m in got] == [m["tokens"] for m in want]
    assert_adapters_close_after_adam(
        load_file(str(two / "adapter" / "adapter_model.safetensors")),
        load_file(str(single_process_cli / "adapter" / "adapter_model.safetensors")),
    )
    summary, ref = (json.loads((d / "summary.json").read_text()) for d in (two, single_process_cli))
    assert summary["eval_after"]["accuracy"] == ref["eval_after"]["accuracy"]
    assert summary["eval_after"]["heldout_ppl"] == pytest.approx(
        ref["eval_after"]["heldout_ppl"], rel=1e-4
    )
    assert not (two / "checkpoint").exists()


@pytest.mark.slow  # a torchrun launch
def test_two_ranks_with_dropout_take_the_steps_of_one_process(
    two_process_runs: Path, single_process_dropout: Path, single_process_cli: Path
):
    """Dropout masks follow the micro-batch, not the rank that computes it."""
    two = two_process_runs / "cli_ddp_dropout"
    got = [m["loss"] for m in metrics(two)]
    want = [m["loss"] for m in metrics(single_process_dropout)]
    assert len(got) == len(want) == 4
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=0)
    # Another rank's dropout masks would move whole tensors by more than their largest entry
    # (and the losses above by 5e-4).
    assert_adapters_close_after_adam(
        load_file(str(two / "adapter" / "adapter_model.safetensors")),
        load_file(str(single_process_dropout / "adapter" / "adapter_model.safetensors")),
        rtol=0,
    )
    # Dropout really acted: the run without it took other steps.
    no_dropout = [m["loss"] for m in metrics(single_process_cli)]
    assert max(abs(a - b) for a, b in zip(got[1:], no_dropout[1:], strict=True)) > 1e-4


@pytest.mark.slow  # a torchrun launch
def test_stopped_two_rank_run_resumes_in_one_process(
    two_process_runs: Path, single_process_cli: Path
):
    """SIGTERM on one rank mid-step 2: both ranks stop after step 2 and checkpoint; one
    process resumes to the end with the losses of the unbroken run."""
    from fastmid.recipe.config import build_config
    from fastmid.recipe.train import train

    root = two_process_runs
    stopped = root / "cli_stopped"
    assert json.loads((root / "cli_stopped.json").read_text())["interrupted"] is True
    assert [m["step"] for m in metrics(stopped)] == [1, 2]
    assert (stopped / "checkpoint").is_dir()
    with single_process_torch_path():
        summary = train(build_config(None, cli_config(root, "cli_stopped", resume=True)))
    assert summary["steps"] == 4 and not summary["interrupted"]
    torch.testing.assert_close(
        torch.tensor([m["loss"] for m in metrics(stopped)]),
        torch.tensor([m["loss"] for m in metrics(single_process_cli)]),
        rtol=1e-5,
        atol=0,
    )


@pytest.mark.slow  # a torchrun launch
def test_nproc_launcher_runs_fsdp_end_to_end(
    two_process_runs: Path, single_process_cli: Path, monkeypatch: pytest.MonkeyPatch
):
    """``fastmid train --nproc 2 --parallel fsdp`` starts torchrun itself; sharded blocks
    train and evaluate to the numbers of the single-process run."""
    import yaml

    from fastmid.cli import main

    config = two_process_runs / "fsdp.yaml"
    config.write_text(yaml.safe_dump(cli_config(two_process_runs, "cli_fsdp", **EVAL)))
    # The workers inherit this environment: the kernels' torch path, one thread each.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert main(["train", "--config", str(config), "--nproc", "2", "--parallel", "fsdp"]) == 0
    fsdp = two_process_runs / "cli_fsdp"
    torch.testing.assert_close(
        torch.tensor([m["loss"] for m in metrics(fsdp)]),
        torch.tensor([m["loss"] for m in metrics(single_process_cli)]),
        rtol=1e-5,
        atol=0,
    )
    assert_adapters_close_after_adam(
        load_file(str(fsdp / "adapter" / "adapter_model.safetensors")),
        load_file(str(single_process_cli / "adapter" / "adapter_model.safetensors")),
    )
    summary, ref_summary = (
        json.loads((d / "summary.json").read_text()) for d in (fsdp, single_process_cli)
    )
    assert summary["resolved"]["parallel"] == "fsdp"
    assert summary["eval_after"]["accuracy"] == ref_summary["eval_after"]["accuracy"]
    assert summary["eval_after"]["heldout_ppl"] == pytest.approx(
        ref_summary["eval_after"]["heldout_ppl"], rel=1e-4
    )


@pytest.mark.slow  # a torchrun launch
def test_fsdp_ranks_read_only_their_shards_from_meta(two_process_runs: Path):
    """Built on the meta device, each rank reads from the safetensors file only its own rows of
    every block weight (no rank ever holds a whole block tensor), the embeddings and norms whole;
    the sharded model then holds exactly the file's weights."""
    from safetensors.torch import load_file as read_all

    weights = read_all(str(make_model_dir_path(two_process_runs) / "model.safetensors"))
    full_bytes = sum(w.numel() * w.element_size() for w in weights.values())
    for rank in (0, 1):
        run = json.loads((two_process_runs / f"meta_load_rank{rank}.json").read_text())
        assert run["all_meta_before"] and run["matches_file"]
        assert run["adapters_are_the_models"] and run["tied_after"]
        # The warm-up forward (FSDP's gathers) ran before any weight was read.
        assert run["reads_before_first_forward"] == 0
        assert run["in_place_all_gather_matches"]
        rows_read: dict[str, int] = {}
        read_bytes = 0
        for name, rows, numel in run["reads"]:  # a tensor may come in several row chunks
            rows_read[name] = rows_read.get(name, 0) + rows
            read_bytes += numel * weights[name].element_size()
        assert sorted(rows_read) == sorted(weights)  # every weight read
        for name, rows in rows_read.items():
            full_rows = weights[name].shape[0]
            if ".layers." in name:  # a block weight: this rank's chunk of rows only
                chunk = -(-full_rows // 2)
                assert rows == min(chunk, full_rows - rank * chunk), name
            else:  # embeddings, final norm, LM head: whole on every rank
                assert rows == full_rows, name
        assert run["loaded_bytes"] == read_bytes < full_bytes


def make_model_dir_path(out: Path) -> Path:
    return Path(json.loads((out / "cli.json").read_text())["model"])


# --------------------------------------------------------------------------------------------
# The torchrun side


def _write(prefix: Path, losses: list[float], adapter: dict[str, torch.Tensor]) -> None:
    rank = distributed.get_rank()
    if rank == 0:
        prefix.with_suffix(".json").write_text(json.dumps(losses))
        save_file(adapter, str(prefix.with_suffix(".safetensors")))
    else:
        save_file(adapter, str(prefix.parent / f"{prefix.name}_rank{rank}.safetensors"))


def _fsdp_sharding(model: torch.nn.Module) -> dict[str, int]:
    from torch.distributed.tensor import DTensor

    from fastmid.engine.blocks import find_decoder_layers

    blocks = find_decoder_layers(model)
    sharded = [b for b in blocks if all(isinstance(p, DTensor) for p in _frozen(b))]
    w = blocks[0].mlp.down_proj.weight
    local = w.to_local().shape[0] if isinstance(w, DTensor) else w.shape[0]
    return {"sharded_blocks": len(sharded), "local_rows": local, "global_rows": w.shape[0]}


def _frozen(block: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in block.parameters() if not p.requires_grad]


def _cli_runs(out: Path) -> None:
    """``fastmid train`` end to end on 2 ranks: a full run, and one stopped by SIGTERM."""
    import fastmid.recipe.train as train_mod
    from fastmid.recipe.config import build_config

    train_mod.train(build_config(None, cli_config(out, "cli_ddp", **EVAL)))
    train_mod.train(build_config(None, cli_config(out, "cli_ddp_dropout", dropout=0.05)))

    real_forward_loss = train_mod.forward_loss
    calls = {"n": 0}

    def signalling_forward_loss(model, batch):
        # Rank 0 computes 2 micro-batches a step: its 4th is in step 2. Rank 1 (1 a step)
        # never gets there; it learns of the stop from rank 0.
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_forward_loss(model, batch)

    train_mod.forward_loss = signalling_forward_loss
    try:
        summary = train_mod.train(build_config(None, cli_config(out, "cli_stopped")))
    finally:
        train_mod.forward_loss = real_forward_loss
    if distributed.is_main():
        (out / "cli_stopped.json").write_text(json.dumps({"interrupted": summary["interrupted"]}))


class _RecordingOpen:
    """``safetensors.safe_open`` that records the shape of every tensor read through it."""

    def __init__(self, real, reads: list[tuple[str, int, int]]) -> None:
        self._real, self._reads = real, reads

    def __call__(self, *args, **kwargs):
        reads, opened = self._reads, self._real(*args, **kwargs)

        class Handle:
            def __enter__(self):
                self.f = opened.__enter__()
                return self

            def __exit__(self, *exc):
                return opened.__exit__(*exc)

            def keys(self):
                return self.f.keys()

            def get_tensor(self, name):
                t = self.f.get_tensor(name)
                reads.append((name, t.shape[0], t.numel()))
                return t

            def get_slice(self, name):
                sl = self.f.get_slice(name)

                class Slice:
                    def __getitem__(self, index):
                        t = sl[index]
                        reads.append((name, t.shape[0], t.numel()))
                        return t

                    def __getattr__(self, attr):  # get_shape, get_dtype: no data read
                        return getattr(sl, attr)

                return Slice()

        return Handle()


def _meta_load(out: Path) -> None:
    """Build the CLI runs' model on meta, shard it, read the shards; record what was read."""
    import safetensors
    from torch.distributed.tensor import DTensor

    from fastmid.engine import models

    model_dir = make_model_dir_path(out)
    model, _, _, files = models.load_empty_model(str(model_dir))
    cfg = MidBlockConfig(
        band=(0.2, 0.8), targets=("q_proj", "gate_proj", "up_proj"), fuse_groups=False
    )
    apply_midblock(model, cfg)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    all_meta_before = all(p.is_meta for p in frozen)
    reads: list[tuple[str, int, int]] = []
    first_forward: list[int] = []
    model.model.layers[0].register_forward_pre_hook(lambda *_: first_forward.append(len(reads)))
    real_open = safetensors.safe_open
    safetensors.safe_open = _RecordingOpen(real_open, reads)
    try:
        dp = distributed.ParallelStep(model, "fsdp", forward_loss, torch.device("cpu"), files)
    finally:
        safetensors.safe_open = real_open
    weights = load_file(str(files[0]))
    gathered = {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach()
        for n, p in model.named_parameters()
        if not p.requires_grad
    }
    matches = gathered.keys() <= weights.keys() and all(
        torch.equal(t, weights[n]) for n, t in gathered.items()
    )
    run = dict(
        all_meta_before=all_meta_before,
        matches_file=matches,
        reads=reads,
        loaded_bytes=dp.loaded_bytes,
        reads_before_first_forward=first_forward[0],
    )
    # The blocks' host all-gather (a broadcast per rank into the output) against gloo's own.
    rank = distributed.get_rank()
    mine = torch.arange(6.0) + 10 * rank
    gathered, expected = torch.empty(12), torch.empty(12)
    distributed._InPlaceAllGather()(gathered, mine, torch.distributed.group.WORLD)
    torch.distributed.all_gather_into_tensor(expected, mine)
    run["in_place_all_gather_matches"] = torch.equal(gathered, expected)
    # A tied LM head stays the embedding (one key in the file), and the adapters the step
    # reduces are the model's own parameters.
    run["adapters_are_the_models"] = all(
        any(q is p for q in model.parameters()) for p in dp._params
    )
    tied_dir = out / "tied-llama"
    if distributed.is_main():
        from tests.fastmid._tiny import tiny_model

        tiny_model("llama", num_layers=2, tie_word_embeddings=True).save_pretrained(tied_dir)
        tokenizer_files = make_model_dir_path(out).glob("tokenizer*")
        for f in tokenizer_files:
            (tied_dir / f.name).write_bytes(f.read_bytes())
    distributed.barrier()
    tied, _, _, tied_files = models.load_empty_model(str(tied_dir))
    apply_midblock(tied, cfg)
    distributed.ParallelStep(tied, "fsdp", forward_loss, torch.device("cpu"), tied_files)
    embedding = load_file(str(tied_files[0]))["model.embed_tokens.weight"]
    run["tied_after"] = tied.lm_head.weight is tied.model.embed_tokens.weight and torch.equal(
        tied.lm_head.weight.detach(), embedding
    )
    (out / f"meta_load_rank{rank}.json").write_text(json.dumps(run))


def _worker(scenario: str, out: Path) -> None:
    distributed.init_distributed(torch.device("cpu"))
    try:
        if scenario != "all":
            raise SystemExit(f"unknown scenario {scenario}")
        for mode in ("ddp", "fsdp"):
            losses, adapter = train_steps(mode)
            _write(out / mode, losses, adapter)
        # After a training forward/backward and after a direct model call under
        # inference_mode (as evaluation does), every block is back to its shard.
        model, dp, _, _ = build("fsdp")
        loss_sum, _ = dp.forward_loss(collate_packed(make_examples()[:2]))
        loss_sum.backward()
        after_step = _fsdp_sharding(model)
        with torch.inference_mode():
            model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=False)
        if distributed.is_main():
            sharding = {"after_step": after_step, "after_eval": _fsdp_sharding(model)}
            (out / "fsdp_sharding.json").write_text(json.dumps(sharding))
        losses, _ = train_steps("ddp", last=RESUME_AT, ckpt=out / "stopped_ckpt")
        if distributed.is_main():
            (out / "stopped.json").write_text(json.dumps(losses))
        losses, adapter = train_steps("ddp", first=RESUME_AT, ckpt=out / "single_ckpt")
        _write(out / "resumed", losses, adapter)
        _meta_load(out)
        _cli_runs(out)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _worker(sys.argv[1], Path(sys.argv[2]))
