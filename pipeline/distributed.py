"""One training in several processes under ``torchrun``: where this process sits, its device, the
process group (NCCL on CUDA, gloo on the CPU), each rank's share of the frames, the
DistributedDataParallel wrapper and keeping the ranks in step. Outside ``torchrun`` (world 1) every
function here does nothing and every process is the main one. ``pipeline.launch`` starts the ranks.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, DistributedSampler

from pipeline.devices import pick_device


@dataclass(frozen=True)
class Distributed:
    """Where this process sits in a ``torchrun`` launch (world 1 when not launched by it)."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and reports."""
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world)


def backend(device: str | torch.device) -> str:
    """The collective backend the ranks use on ``device``."""
    return "nccl" if str(device).startswith("cuda") else "gloo"


def rank_device(choice: str, dist: Distributed) -> torch.device:
    """``train.device`` for this rank: under ``torchrun`` each process takes its own GPU."""
    device = pick_device(choice)
    if dist.world > 1 and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    return device


def join_process_group(dist: Distributed, device: torch.device) -> bool:
    """Join ``torchrun``'s process group unless this process is in it already; True when this
    call joined it, and so the caller leaves it (:func:`leave_process_group`).

    Joining once per process matters: with a group destroyed and created again for each fold of
    ``train.ensemble_folds``, both gloo ranks waited forever at the second fold's first barrier in
    about half the runs (torchrun's store still holds the first group's keys)."""
    if dist.world <= 1 or torch.distributed.is_initialized():
        return False
    torch.distributed.init_process_group(backend(device))
    return True


def leave_process_group(dist: Distributed, joined: bool, failed: bool = False) -> None:
    """Finish in step with the other ranks; destroy the group only where this caller joined it.

    After a failure (``failed``) there is no barrier: the other ranks are already in a collective this
    rank will never join (the next all-reduce), so waiting for them would hang both until gloo's
    30-minute timeout. Leaving at once lets the exception end this process, and torchrun's agent
    then stops the others and reports the failure."""
    if dist.world > 1 and torch.distributed.is_initialized():
        if not failed:
            torch.distributed.barrier()
        if joined:
            torch.distributed.destroy_process_group()


@contextmanager
def process_group(dist: Distributed, device: torch.device) -> Iterator[None]:
    """Run the block inside ``torchrun``'s process group (nothing to do outside torchrun): join it
    unless already in it, leave in step with the other ranks on a normal exit, and at once, without
    the barrier, when the block raises (:func:`leave_process_group`)."""
    joined = join_process_group(dist, device)
    try:
        yield
    except BaseException:
        leave_process_group(dist, joined, failed=True)
        raise
    leave_process_group(dist, joined)


def barrier(dist: Distributed) -> None:
    """Wait for every rank (for instance until rank 0 has removed a file the others must not see)."""
    if dist.world > 1:
        torch.distributed.barrier()


def shard_sampler(dataset: Dataset, dist: Distributed, seed: int) -> DistributedSampler | None:
    """This rank's share of every epoch's shuffled frames; None outside ``torchrun``."""
    if dist.world <= 1:
        return None
    return DistributedSampler(dataset, dist.world, dist.rank, shuffle=True, seed=seed, drop_last=True)


def data_parallel(model: torch.nn.Module, dist: Distributed, device: torch.device) -> torch.nn.Module:
    """The network wrapped in DistributedDataParallel (gradients all-reduced every step) under ``torchrun``."""
    if dist.world <= 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def broadcast_buffers(modules: Iterable[torch.nn.Module], dist: Distributed) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) everywhere: each rank updated its own."""
    if dist.world <= 1:
        return
    for module in modules:
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer, 0)
