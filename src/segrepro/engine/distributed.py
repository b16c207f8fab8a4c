"""Several GPUs of one node for one run: DistributedDataParallel under torchrun.

`torchrun --standalone --nproc_per_node N -m segrepro.cli train ...` starts N copies of the
command; each finds its place in torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and takes
the GPU of its LOCAL_RANK (NCCL), or stays on the CPU (gloo). The sampler still yields the
single-process run's global batch at every iteration and each process keeps its own slice of it
(train.batch_size / N images); DDP averages the gradients and SyncBN normalises with the statistics
of the whole global batch. Rank 0 alone writes checkpoints, the log, the final model and MLflow;
every rank resumes from the same checkpoint.

Without torchrun (WORLD_SIZE unset or 1) every function here is a no-op.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from segrepro.core.errors import SegreproError

# How long a rank other than 0 waits before leaving on an error every rank hits alike: long
# enough for rank 0 to print it (torchrun stops the others as soon as one process fails).
QUIET_EXIT_DELAY = 5.0


@dataclass(frozen=True)
class Context:
    """This process's place in the run: rank among world_size processes, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Whether this process writes the run's files (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise SegreproError(f"{name}={value!r} in the environment: WORLD_SIZE > 1 needs torchrun's "
                            "RANK and LOCAL_RANK (start the run with torchrun)") from None


def setup(device: torch.device) -> Context:
    """This process's Context, joining torchrun's process group when WORLD_SIZE > 1.

    `device` is the run's device as picked for one process: `cuda` (no index) becomes this
    process's GPU, cuda:LOCAL_RANK; an explicit `cuda:K` would put every process on one GPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Context(device=device)
    rank, local = _env_int("RANK"), _env_int("LOCAL_RANK")
    if device.type == "cuda":
        if device.index is not None:
            raise SegreproError(f"--device {device}: under torchrun each process takes the GPU of its "
                                "LOCAL_RANK; pass --device cuda or no --device")
        visible = torch.cuda.device_count()
        if local >= visible:
            raise SegreproError(f"LOCAL_RANK {local}: only {visible} GPU(s) visible; start at most "
                                f"{visible} processes per node (torchrun --nproc_per_node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise SegreproError(f"--device {device}: training with several processes runs on cuda or cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend)  # env:// rendezvous: torchrun's MASTER_ADDR/MASTER_PORT
        atexit.register(_shutdown)
    if rank:
        # Rank 0 reports the run; the others would print the same lines again. Their stderr stays
        # (errors, warnings).
        sys.stdout = open(os.devnull, "w")
    return Context(rank=rank, world_size=world, local_rank=local, device=device)


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def fail_together(message: str, ctx: Context):
    """Raise an error every rank hits alike (a setting, a diverged loss) once, not N times: rank 0
    raises it as a SegreproError; the others leave quietly with exit status 1."""
    if ctx.main:
        raise SegreproError(message)
    time.sleep(QUIET_EXIT_DELAY)
    raise SystemExit(1)


def local_batch_size(batch_size: int, ctx: Context, culprit: str = "") -> int:
    """Each process's share of the global batch; an error unless the processes split it evenly."""
    if batch_size % ctx.world_size:
        prefix = f"{culprit}: " if culprit else ""
        fail_together(f"{prefix}train.batch_size {batch_size} is not divisible by the {ctx.world_size} "
                      "processes (torchrun --nproc_per_node): each takes an equal share of the batch", ctx)
    return batch_size // ctx.world_size


class RankSlice:
    """Rank `rank`'s slice of every global batch of `batches` (a batch sampler)."""

    def __init__(self, batches, rank: int, world_size: int):
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            share = len(batch) // self.world_size
            yield batch[self.rank * share:(self.rank + 1) * share]


def shard_loader(loader: DataLoader, ctx: Context) -> DataLoader:
    """The loader over this rank's slices of `loader`'s batches (itself with one process): each
    process loads and augments only its own images."""
    if not ctx.distributed:
        return loader
    return DataLoader(
        loader.dataset, batch_sampler=RankSlice(loader.batch_sampler, ctx.rank, ctx.world_size),
        num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
        timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
        prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers,
    )


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) with its gradient: every rank's output is the sum, so each input's gradient
    is the sum of the outputs' gradients over the ranks."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        total = tensor.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        total = grad.clone()
        dist.all_reduce(total, group=ctx.group)
        return total, None


class _GlobalBatchStatistics:
    """Mixed into a batch norm on the CPU (gloo) to normalise with the global batch's statistics:
    torch's SyncBatchNorm runs on GPUs only (DDP refuses it on the CPU). Two passes: the mean,
    then the centred variance. State and checkpoint keys are those of the plain batch norm."""

    def forward(self, input):
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        group = dist.group.WORLD
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        local = torch.tensor([input.numel() // input.size(1)], dtype=input.dtype)
        stats = _SumOverRanks.apply(torch.cat([input.sum(dims), local]), group)
        count = stats[-1].detach()
        mean = stats[:-1] / count
        centred = input - mean.view(shape)
        var = _SumOverRanks.apply((centred * centred).sum(dims), group) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (self.momentum if self.momentum is not None
                          else 1.0 / float(self.num_batches_tracked))
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * count / max(float(count) - 1, 1.0), factor)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


_GLOBAL_CLASSES: dict[type, type] = {}


def _sync_on_cpu(model: nn.Module) -> None:
    """Give every batch norm of `model` the global batch's statistics, in place (each keeps its
    parameters, buffers and keys; its class becomes a subclass adding `_GlobalBatchStatistics`)."""
    for module in model.modules():
        cls = type(module)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, _GlobalBatchStatistics):
            if cls not in _GLOBAL_CLASSES:
                _GLOBAL_CLASSES[cls] = type(f"Global{cls.__name__}", (_GlobalBatchStatistics, cls), {})
            module.__class__ = _GLOBAL_CLASSES[cls]


def wrap(model: nn.Module, ctx: Context) -> nn.Module:
    """The module to run the forward pass through: `model` itself with one process; else `model`
    with its batch norms made synchronous (in place: checkpoints keep the plain model's keys)
    inside DistributedDataParallel."""
    if not ctx.distributed:
        return model
    if ctx.device.type == "cuda":
        if nn.SyncBatchNorm.convert_sync_batchnorm(model) is not model:
            raise SegreproError("the model's root module is a batch norm; cannot make it synchronous in place")
    else:
        _sync_on_cpu(model)
    # static_graph: some models never use a parameter in training (an HFGD classifier replaced by
    # its guided head); the set is the same at every iteration, which DDP then handles.
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None, static_graph=True)


def mean_over_ranks(loss: float, parts: dict[str, float], ctx: Context) -> tuple[float, dict[str, float]]:
    """The loss and its parts averaged over the processes (the global batch's, as logged)."""
    if not ctx.distributed:
        return loss, parts
    values = torch.tensor([loss, *parts.values()], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(values)
    values = (values / ctx.world_size).tolist()
    return values[0], dict(zip(parts, values[1:]))


def agree_on_stop(received: list[int], ctx: Context) -> list[int]:
    """A snapshot of the stop signals received, the same on every rank: a signal any rank got
    stops all of them at the same iteration (else one would wait for the others forever)."""
    if not ctx.distributed:
        return list(received)
    flag = torch.tensor([received[0] if received else 0], device=ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return [int(flag)] if int(flag) else []


def every_rank_agrees(ok: bool, ctx: Context) -> bool:
    """Whether `ok` holds on every rank (the same answer on all of them)."""
    if not ctx.distributed:
        return ok
    flag = torch.tensor([int(ok)], device=ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(int(flag))


def same_on_every_rank(value: int, what: str, ctx: Context) -> None:
    """An error unless every rank holds the same integer `value`."""
    if not ctx.distributed:
        return
    bounds = torch.tensor([value, -value], device=ctx.device)
    dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
    high, low = int(bounds[0]), -int(bounds[1])
    if high != low:
        raise SegreproError(f"the processes disagree on {what} ({low} .. {high})")


def main_only(context, ctx: Context):
    """`context` on rank 0; on the other ranks the same object, never entered (MLflow's Run is
    then a no-op)."""
    return context if ctx.main else contextlib.nullcontext(context)
