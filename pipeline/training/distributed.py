"""One model across processes: DistributedDataParallel when train runs under torchrun.

``torchrun --nproc-per-node N -m pipeline.train ...`` starts N processes with RANK, WORLD_SIZE and LOCAL_RANK set;
``start`` joins them into one process group (NCCL on CUDA, gloo on the CPU), each on its own GPU. Each fold then
trains with the model wrapped in DistributedDataParallel: every rank draws the same class-balanced batches (same
seed) and takes its share of each (``RankBatchSampler``), so the averaged gradient is the one a single process
computes on the whole batch (batch norm statistics are per rank). Validation is split across the ranks and gathered,
so every rank takes the same decisions (best epoch, early stop, plateau schedule); only rank 0 writes files, logs
and prints. Without torchrun (WORLD_SIZE unset or 1) every function here is a no-op.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def active() -> bool:
    return world_size() > 1


def is_main() -> bool:
    """Whether this process writes the outputs: rank 0, or the only process."""
    return rank() == 0


def start() -> None:
    """Join torchrun's process group once; ranks other than 0 stop printing (rank 0 speaks for all)."""
    if not active() or dist.is_initialized():
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    if not is_main():
        sys.stdout = sys.stderr = open(os.devnull, "w")


def local_device() -> str | None:
    """This rank's GPU under torchrun on CUDA (None otherwise: the configured device)."""
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if active() and torch.cuda.is_available() else None


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model in DistributedDataParallel under torchrun, else as it is."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def shard(indices: np.ndarray) -> np.ndarray:
    """This rank's rows of ``indices``: every world_size-th, from its rank."""
    return indices[rank()::world_size()] if active() else indices


def gather_rows(values: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` rows whose shards (``shard``) the ranks hold, put back in order, on every rank."""
    if not active():
        return values
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, values)
    whole = np.empty((count, *values.shape[1:]), dtype=values.dtype)
    for part_rank, part in enumerate(parts):
        whole[part_rank::world_size()] = part
    return whole


def barrier() -> None:
    if active():
        dist.barrier()


class RankBatchSampler(Sampler):
    """The batches of ``sampler`` split across ranks: every rank draws the same global batches and takes rows
    rank, rank + world, ... of each, so together the ranks see exactly the single-process batches."""

    def __init__(self, sampler, batch_size: int, drop_last: bool, rank: int, world: int):
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.rank, self.world = rank, world

    def __iter__(self):
        batch = []
        for index in self.sampler:
            batch.append(index)
            if len(batch) == self.batch_size:
                yield batch[self.rank::self.world]
                batch = []
        if batch and not self.drop_last:
            yield batch[self.rank::self.world]

    def __len__(self) -> int:
        full, rest = divmod(len(self.sampler), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)
