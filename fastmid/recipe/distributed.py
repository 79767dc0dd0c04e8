"""Data-parallel training on many devices: torchrun process groups, DDP or FSDP2, rank sharding.

One process per device, started by ``torchrun`` (or by ``fastmid train --nproc N``, which runs
torchrun for you). Every rank holds the same adapters and the same optimizer state; what
differs is which micro-batches of each optimizer step a rank computes:

- a step's micro-batches (the same list a single process would accumulate) are dealt out
  round-robin, ``micro_batches[rank::world]``;
- every rank divides its summed loss by the label count of the *whole* step, so summing the
  ranks' gradients gives exactly the gradient one process gets from the whole step. Gradients
  are therefore all-reduced with SUM (not DDP's default mean);
- clipping, the optimizer step and the schedule then run identically on every rank, so the
  adapters stay bit-identical without being broadcast again, and a checkpoint written by rank
  0 resumes under any world size.

Two ways to hold the frozen base model:

- ``ddp``: every rank has the whole model. ``DistributedDataParallel`` wraps a small module
  whose forward is the training loss, and reduces only the adapter gradients (the frozen
  weights are excluded from its broadcast and buckets), overlapping the all-reduce with the
  backward of the last micro-batch.
- ``fsdp``: the frozen weights of every decoder block are sharded across ranks with FSDP2
  (``fully_shard``) and all-gathered one block at a time; the adapters stay whole on every
  rank (FSDP's ``ignored_params``) and are all-reduced like above, and so do the embeddings,
  final norm and LM head (small next to the blocks). Blocks below the band still run under
  ``no_grad``: gathered for the forward, never for a backward. The patch must not fuse q/k/v
  or gate/up (``fuse_groups=False``): fused groups read a concatenated copy FSDP cannot shard.

Evaluation runs the same prompts on every rank (identical results; rank 0 writes them).

``auto`` picks ``fsdp`` when the model's weights would take more than half of one GPU's memory,
else ``ddp``. On CPU the backend is gloo, which is how this module is tested.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from fastmid.engine.lora import is_fused
from fastmid.engine.loss import IGNORE_INDEX
from fastmid.errors import INTERRUPTED_EXIT, STATUS_FILE_ENV, USER_ERROR_EXIT, UserError
from fastmid.memory import release_free_memory

T = TypeVar("T")
PARALLEL_MODES = ("auto", "ddp", "fsdp")
# fsdp is chosen by "auto" when the frozen weights exceed this share of one device's memory:
# activations, the adapters, their optimizer state and the allocator need the rest.
FSDP_MEMORY_SHARE = 0.5

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, int]]


# --------------------------------------------------------------------------------------------
# Process group and rank helpers


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: its rank and the world size."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """World size announced by torchrun's environment (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def default_device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` when CUDA exists, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed(device: torch.device | None = None) -> DistEnv:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU).

    Outside torchrun (or with one process) nothing is initialised and rank 0 of 1 is returned,
    so single-process callers can use the same code path.
    """
    device = device or default_device()
    world = env_world_size()
    if world > 1 and not is_distributed():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return DistEnv(get_rank(), get_world_size())


def shutdown() -> None:
    """Leave the process group (after a final barrier, so no rank exits while others write)."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes in the group (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Only rank 0 writes files and prints progress."""
    return get_rank() == 0


def log(message: str) -> None:
    """Print on rank 0 only (every rank runs the same recipe)."""
    if is_main():
        print(message, flush=True)


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def _comm_device() -> torch.device:
    # nccl only moves CUDA tensors; gloo only CPU ones.
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(*values: float | int | torch.Tensor) -> list[float]:
    """Sum scalars over all ranks in one collective; returns Python floats (a host sync)."""
    flat = torch.tensor(
        [float(v.detach().float().sum()) if torch.is_tensor(v) else float(v) for v in values],
        dtype=torch.float64,
        device=_comm_device(),
    )
    if is_distributed():
        dist.all_reduce(flat)
    return flat.tolist()


def min_over_ranks(value: int) -> int:
    """The smallest of ``value`` over all ranks (``value`` itself in one process)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (e.g. a stop signal seen by one)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([int(bool(flag))], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def shard(items: Sequence[T], rank: int | None = None, world_size: int | None = None) -> list[T]:
    """This rank's share of ``items``, dealt round-robin: ``items[rank::world_size]``.

    The shares of all ranks partition ``items``; when ``len(items)`` is not a multiple of the
    world size the first ranks get one more, and a rank may get none.
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    return list(items[rank::world_size])


# --------------------------------------------------------------------------------------------
# Choosing DDP or FSDP


def param_bytes(model: nn.Module) -> int:
    """Bytes of all parameters (before patching: the frozen base FSDP would shard)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def resolve_parallel(mode: str, model: nn.Module, device: torch.device, world_size: int) -> str:
    """ "none" for one process, else ``mode``; "auto" → "fsdp" when the frozen weights would
    take more than half of one GPU's memory, "ddp" otherwise (always "ddp" on CPU)."""
    if mode not in PARALLEL_MODES:
        raise UserError(f"parallel must be one of {'|'.join(PARALLEL_MODES)}, got {mode!r}")
    if world_size <= 1:
        return "none"
    if mode != "auto":
        return mode
    if device.type != "cuda":
        return "ddp"
    total = torch.cuda.get_device_properties(device).total_memory
    return "fsdp" if param_bytes(model) > FSDP_MEMORY_SHARE * total else "ddp"


# --------------------------------------------------------------------------------------------
# Loading a sharded model from safetensors


def _local(param: torch.Tensor) -> torch.Tensor:
    """The part of ``param`` this rank stores (its shard of an FSDP DTensor, else itself)."""
    from torch.distributed.tensor import DTensor

    return param.to_local() if isinstance(param, DTensor) else param


def allocate_shards(model: nn.Module, device: torch.device) -> None:
    """Give a model built on the meta device (then FSDP-sharded) uninitialised storage on
    ``device`` for this rank's part of every parameter; parameters and buffers that are
    already real (the adapters, rotary frequencies) keep their values. Fill it with
    :func:`load_sharded_weights`."""
    # to_empty gives every tensor fresh storage (FSDP re-registers its shards); the real ones
    # are put back afterwards.
    keep = {
        name: t.detach().clone()
        for name, t in [*model.named_parameters(), *model.named_buffers()]
        if not _local(t).is_meta
    }
    # Swapping keeps every Parameter object (a meta tensor cannot take new storage in place):
    # tied weights stay one parameter, and references held elsewhere stay valid.
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    params_and_buffers = dict([*model.named_parameters(), *model.named_buffers()])
    with torch.no_grad():
        for name, value in keep.items():
            _local(params_and_buffers[name]).copy_(_local(value))


def load_sharded_weights(model: nn.Module, files: Sequence[Path], names: Sequence[str]) -> int:
    """Read the parameters ``names`` of a model whose storage :func:`allocate_shards` made
    from safetensors ``files``, only this rank's rows of every sharded tensor; returns the
    bytes read.

    FSDP2 shards dim 0 in ``torch.chunk`` pieces: rank r holds rows ``[r·c, r·c + len)`` with
    ``c = ceil(rows / world)``. Parameters FSDP does not shard (embeddings, final norm, LM
    head) are read whole. Rows go from the file straight into the parameter's storage, a few
    MiB at a time (:meth:`~fastmid.engine.blockload.ShardIndex.read_rows`).
    """
    from torch.distributed.tensor import DTensor, Shard

    from fastmid.engine.blockload import ShardIndex

    index = ShardIndex.of_files(files)
    missing = [n for n in names if n not in index]
    if missing:
        raise ValueError(f"{len(missing)} weights are in no file, e.g. {missing[0]!r}")
    params = dict(model.named_parameters())
    read = 0
    with torch.no_grad():
        for name in names:
            param = params[name]
            local = _local(param)
            if index.shape(name) != tuple(param.shape):
                raise ValueError(
                    f"{name}: the file holds {list(index.shape(name))}, the model "
                    f"{list(param.shape)}"
                )
            start = 0
            if isinstance(param, DTensor):
                if tuple(param.placements) != (Shard(0),):
                    raise ValueError(f"{name}: cannot load placement {param.placements}")
                chunk = -(-param.shape[0] // param.device_mesh.size())
                start = min(param.device_mesh.get_local_rank() * chunk, param.shape[0])
            if local.dim() == 0:
                local.copy_(index.read(name, local, local.device))
            else:
                index.read_rows(name, local, start)
            read += local.numel() * index.itemsize(name)
    return read


class _InPlaceAllGather:
    """FSDP2 all-gather for gloo as one broadcast per rank, straight into that rank's chunk of
    the output. Gloo's own all-gather receives into a second buffer the size of the output and
    copies it over: one more whole block in host memory at every gather."""

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        async_op: bool = False,
    ) -> dist.Work | None:
        chunks = output_tensor.chunk(group.size())
        mine = chunks[group.rank()]
        if mine.data_ptr() != input_tensor.data_ptr():  # FSDP copies its input in place
            mine.copy_(input_tensor)
        works = [
            dist.broadcast(chunk, group_src=src, group=group, async_op=True)
            for src, chunk in enumerate(chunks)
        ]
        for work in works:
            work.wait()
        return works[-1] if async_op else None


def _lean_host_all_gather(block: nn.Module) -> None:
    """Make an FSDP block's gathers on the host hold one block twice at most (its all-gather
    buffer and its gathered weights, during the copy-out from one to the other).

    Besides the in-place all-gather, the unshard is marked asynchronous: a synchronous one in
    forward keeps the previous block's all-gather buffer alive until the next block's copy-out,
    which only buys overlap between CUDA streams. Both are memory-only settings, skipped on a
    torch without them.
    """
    if hasattr(block, "set_custom_all_gather"):
        block.set_custom_all_gather(_InPlaceAllGather())
    if hasattr(block, "_set_unshard_async_op"):
        block._set_unshard_async_op(True)


# --------------------------------------------------------------------------------------------
# The data-parallel step


class _LossModule(nn.Module):
    """The model with the training loss as its forward, so DDP sees the whole computation."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return self._loss_fn(self.model, batch)


# No annotations: DDP checks a hook's annotations against real classes, and postponed
# evaluation (``from __future__ import annotations``) turns them into strings.
def _sum_allreduce_hook(group, bucket):
    """DDP comm hook: SUM the bucket (each rank's loss is already divided by the global count)."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class ParallelStep:
    """One rank's part of a data-parallel optimizer step; a no-op shell with one process.

    Use::

        dp = ParallelStep(model, "ddp", forward_loss, device)
        for batch_ids, sync in dp.micro_batches(step_batches):
            with sync:
                loss_sum, _ = dp.forward_loss(batch)
                (loss_sum / labels_of_the_whole_step).backward()
        dp.reduce_gradients()
        optimizer.step()
    """

    def __init__(
        self,
        model: nn.Module,
        mode: str,
        loss_fn: LossFn,
        device: torch.device,
        weight_files: Sequence[Path] = (),
    ) -> None:
        if mode not in ("none", "ddp", "fsdp"):
            raise ValueError(f"mode must be none|ddp|fsdp, got {mode!r}")
        if mode == "fsdp" and is_fused(model):
            # Fused q/k/v and gate/up read a concatenated copy of the frozen weights that FSDP
            # cannot see or shard.
            raise ValueError("FSDP needs a model patched with fuse_groups=False")
        self.model = model
        self.mode = mode
        # Bytes of weights this rank read from ``weight_files`` (a model built on meta).
        self.loaded_bytes = 0
        self.rank = get_rank()
        self.world_size = get_world_size()
        self._loss_fn = loss_fn
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._ddp: nn.parallel.DistributedDataParallel | None = None
        self._root: nn.Module | None = None  # the FSDP root (fsdp mode)
        # True while a step's gradients still need the explicit all-reduce.
        self._manual_reduce = False
        # True during an FSDP padding pass (a rank with fewer micro-batches than others).
        self._padding = False
        if mode != "none" and self.world_size == 1:
            self.mode = "none"
        if any(p.is_meta for p in model.parameters()) and not (
            self.mode == "fsdp" and weight_files
        ):
            raise ValueError("a model on the meta device needs mode fsdp and its weight_files")
        if self.mode == "ddp":
            self._wrap_ddp(device)
        elif self.mode == "fsdp":
            self._wrap_fsdp(device, weight_files)

    # --- wrapping ---

    def _wrap_ddp(self, device: torch.device) -> None:
        module = _LossModule(self.model, self._loss_fn)
        frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
        frozen += [n for n, _ in module.named_buffers()]
        # Every rank loaded the same frozen weights; broadcasting or bucketing them is waste.
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            module, frozen
        )
        self._ddp = nn.parallel.DistributedDataParallel(
            module,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,
        )
        self._ddp.register_comm_hook(None, _sum_allreduce_hook)

    def _wrap_fsdp(self, device: torch.device, weight_files: Sequence[Path]) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from fastmid.engine.blocks import find_decoder_layers

        mesh = init_device_mesh(device.type, (self.world_size,))
        blocks = find_decoder_layers(self.model)
        adapters = set(self._params)
        # Each decoder block is one FSDP unit: gathered for its forward, freed after it (and
        # gathered again for its backward when it is in or above the band).
        for block in blocks:
            fully_shard(block, mesh=mesh, ignored_params=adapters)
            if device.type == "cpu":
                _lean_host_all_gather(block)
        # The root unit is the loss module, so one training forward is one FSDP iteration. It
        # shards nothing itself: the embeddings, final norm and LM head stay whole on every
        # rank (small next to the blocks, and a tied LM head is the embedding), so evaluation
        # can also call the model directly, each block gathering itself.
        in_blocks = {p for block in blocks for p in block.parameters()}
        whole = {p for p in self.model.parameters() if p not in in_blocks} | adapters
        self._root = fully_shard(
            _LossModule(self.model, self._loss_fn), mesh=mesh, ignored_params=whole
        )
        # Built on the meta device: storage for this rank's shards only, read after the warm-up.
        to_read = [n for n, p in self.model.named_parameters() if _local(p).is_meta]
        if to_read:
            allocate_shards(self.model, device)
        self.model.to(device)
        # One forward through the root now: it makes the root the root before anything calls
        # a block on its own (an evaluation), and it allocates the blocks' gathered weights
        # outside torch.inference_mode (FSDP reuses them; inference tensors cannot be saved
        # for backward). Its output is thrown away, so it runs before the weights are read:
        # the gathers' working memory (a block's all-gather buffer and its gathered weights)
        # comes and goes while the rank holds nothing else.
        with torch.no_grad():
            tokens = torch.zeros((1, 1), dtype=torch.long, device=device)
            no_label = torch.full_like(tokens, IGNORE_INDEX)
            self._root({"input_ids": tokens, "position_ids": tokens, "targets": no_label})
        if device.type == "cpu":
            # glibc keeps memory freed in the middle of a heap (or in another thread's arena)
            # resident: up to a block or two of the gathers' buffers, under the weights next.
            release_free_memory()
        if to_read:
            # Each rank reads only its own rows of every block weight.
            self.loaded_bytes = load_sharded_weights(self.model, weight_files, to_read)
        self._broadcast_adapters()

    def _broadcast_adapters(self) -> None:
        # Ranks seed identically, but make the starting adapters identical by construction.
        for p in self._params:
            dist.broadcast(p.data, src=0)

    # --- the step ---

    def forward_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(summed loss, label count) of this rank's micro-batch, through the DDP wrapper.

        On a padding pass (see :meth:`micro_batches`) the loss is multiplied by 0: the
        collectives run, the gradients and the metrics do not change.
        """
        if self._ddp is not None:
            loss_sum, count = self._ddp(batch)
        elif self._root is not None:
            loss_sum, count = self._root(batch)
        else:
            loss_sum, count = self._loss_fn(self.model, batch)
        if self._padding:
            return loss_sum * 0.0, 0
        return loss_sum, count

    def micro_batches(
        self, step_batches: Sequence[T]
    ) -> Iterator[tuple[T, contextlib.AbstractContextManager]]:
        """This rank's micro-batches of one step, each with the context to run it in.

        Under DDP the gradient all-reduce rides on the backward of the last micro-batch when
        every rank has the same number of them; otherwise (a short final step) all backward
        passes run without sync and :meth:`reduce_gradients` reduces once at the end.

        FSDP gathers weights inside every forward and backward, so all ranks must run the
        same number of passes: a rank short of micro-batches repeats its first one (or the
        step's first) as a padding pass whose loss counts zero.
        """
        mine = shard(step_batches, self.rank, self.world_size)
        even = len(step_batches) % self.world_size == 0
        self._manual_reduce = self.mode == "fsdp" or (self.mode == "ddp" and not even)
        passes = len(mine)
        if self.mode == "fsdp":
            passes = -(-len(step_batches) // self.world_size)
        for j in range(passes):
            self._padding = j >= len(mine)
            item = mine[j] if not self._padding else (mine or list(step_batches))[0]
            last = j == passes - 1
            if self._ddp is not None and (self._manual_reduce or not last):
                yield item, self._ddp.no_sync()
            else:
                yield item, contextlib.nullcontext()
        self._padding = False

    def reduce_gradients(self) -> None:
        """Sum the adapter gradients over ranks where DDP has not already done it."""
        if not self._manual_reduce or not is_distributed():
            return
        self._manual_reduce = False
        for p in self._params:
            if p.grad is None:
                # A rank with no micro-batch this step still contributes (zeros).
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self._params]
        # One collective for all adapters: they are small, latency dominates.
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n


# --------------------------------------------------------------------------------------------
# Launcher


def torchrun_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """The command that runs ``fastmid <argv>`` on ``nproc`` local processes with torchrun."""
    if nproc < 1:
        raise UserError(f"nproc must be a positive integer, got {nproc}")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free local port per run, so parallel jobs never collide
        f"--nproc-per-node={nproc}",
        "-m",
        "fastmid",
        *argv,
    ]


def under_torchrun() -> bool:
    """True inside a process started by torchrun."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch(nproc: int, argv: Sequence[str], config: dict[str, Any] | None = None) -> int:
    """Run ``fastmid <argv>`` under torchrun on ``nproc`` processes; returns its exit code.

    ``config``, when given, is written to a temporary YAML file appended as ``--config`` so the
    workers see exactly the configuration this process resolved.
    """
    import yaml

    argv = list(argv)
    tmp_path: Path | None = None
    if config is not None:
        fd, name = tempfile.mkstemp(prefix="fastmid-launch-", suffix=".yaml")
        tmp_path = Path(name)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        argv += ["--config", str(tmp_path)]
    # Ctrl-C reaches torchrun and the workers too (same process group): they save a checkpoint
    # and stop. This process must outlive them rather than kill torchrun on KeyboardInterrupt.
    status = _WorkerStatus()
    proc = subprocess.Popen(torchrun_command(nproc, argv), env=status.env(), stderr=subprocess.PIPE)
    relay = threading.Thread(target=status.relay, args=(proc.stderr,), daemon=True)
    relay.start()

    def on_signal(signum: int, frame: Any) -> None:
        status.stopping = True
        if signum != signal.SIGINT:
            proc.send_signal(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        code = proc.wait()
        relay.join()
        return status.exit_code(code)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        status.close()
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)


class _WorkerStatus:
    """Report a torchrun run as one process would: one line for a user error (exit 2), a
    stop on a signal with its checkpoint saved as exit 130, instead of torchrun's report of
    failed workers.

    Workers append how they ended to a status file (:mod:`fastmid.errors`). The launcher
    relays torchrun's stderr as it comes, but holds it back from the moment a worker reports
    a user error or a stop signal arrives; the held text (torchrun's report) is shown only
    when the workers did not end in one of those two ways.
    """

    def __init__(self) -> None:
        fd, name = tempfile.mkstemp(prefix="fastmid-status-", suffix=".txt")
        os.close(fd)
        self.path = Path(name)
        self.stopping = False  # a SIGINT/SIGTERM reached the launcher
        self._held: list[bytes] = []

    def env(self) -> dict[str, str]:
        return {**os.environ, STATUS_FILE_ENV: str(self.path)}

    def _lines(self, kind: str) -> list[str]:
        text = self.path.read_text(encoding="utf-8", errors="replace")
        return [line[len(kind) + 1 :] for line in text.splitlines() if line.startswith(kind)]

    def relay(self, stream: Any) -> None:
        # Raw reads, not lines: progress bars that redraw with "\r" pass through at once.
        fd = stream.fileno()
        while chunk := os.read(fd, 65536):
            if self._held or self.stopping or self._lines("error"):
                self._held.append(chunk)
            else:
                sys.stderr.write(chunk.decode("utf-8", errors="replace"))
                sys.stderr.flush()
        stream.close()

    def exit_code(self, code: int) -> int:
        errors = self._lines("error")
        if code != 0 and errors:
            print(errors[0], file=sys.stderr, flush=True)
            return USER_ERROR_EXIT
        if code != 0 and set(self._lines("exit")) == {str(INTERRUPTED_EXIT)}:
            return INTERRUPTED_EXIT  # every worker saved its checkpoint and said so
        sys.stderr.write(b"".join(self._held).decode("utf-8", errors="replace"))
        sys.stderr.flush()
        return code

    def close(self) -> None:
        self.path.unlink(missing_ok=True)
