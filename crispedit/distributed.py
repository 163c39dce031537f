"""Data-parallel runs under ``torchrun``: the process group, the device of a rank, and
a token-balanced split of the documents.

K-FAC statistics are sums over labelled positions, so they parallelise over documents: every rank
reads the whole corpus, accumulates ``Σ a aᵀ`` and ``Σ g gᵀ`` over the documents of its shard, one
``all_reduce`` (SUM) gives every rank the sums of the whole corpus, and every rank divides by the
global count (``curvature.collect(..., parallel=ctx)``). Up to the order of float additions the
factors are those of one process. gloo on CPU, NCCL on GPUs (rank ``r`` on ``cuda:LOCAL_RANK``).

Use in a command::

    ctx = init_from_env(device)          # None outside torchrun (or with one process)
    try:
        ... load the model on ctx.device, collect(..., parallel=ctx) ...
        if is_main(ctx): save
        barrier(ctx)
    finally:
        shutdown(ctx)
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


class DistributedError(ValueError):
    """A data-parallel run that cannot start as asked (device, environment)."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in a data-parallel run; ``device`` is where it loads the model."""

    rank: int
    world_size: int
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_main(ctx: DistContext | None) -> bool:
    """True in a single-process run and on rank 0 of a data-parallel one."""
    return ctx is None or ctx.is_main


def backend_and_device(device: str, local_rank: int, cuda_available: bool, cuda_count: int = 0) -> tuple[str, str]:
    """``(backend, device)`` of a rank: ``nccl`` and ``cuda:LOCAL_RANK`` when the user asked for
    ``cuda`` or ``auto`` and CUDA is there, ``gloo`` and ``cpu`` for ``cpu`` (or ``auto`` without CUDA)."""
    if device == "cpu" or (device == "auto" and not cuda_available):
        return "gloo", "cpu"
    if device not in ("auto", "cuda"):
        raise DistributedError(
            f"--device {device}: under torchrun give cpu, cuda or auto (rank r uses cuda:LOCAL_RANK)"
        )
    if not cuda_available:
        raise DistributedError("--device cuda: CUDA is not available")
    if local_rank >= cuda_count:
        raise DistributedError(
            f"LOCAL_RANK {local_rank}: this node has {cuda_count} CUDA device(s); start at most that many processes per node"
        )
    return "nccl", f"cuda:{local_rank}"


def init_from_env(device: str = "auto") -> DistContext | None:
    """Join the process group that ``torchrun`` describes in the environment (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); ``None`` outside torchrun or
    with a single process, where nothing is initialised."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    backend, dev = backend_and_device(device, local, cuda, torch.cuda.device_count() if cuda else 0)
    if backend == "nccl":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world)
    return DistContext(rank, world, local, dev)


def barrier(ctx: DistContext | None) -> None:
    """Wait for every rank (nothing to wait for in a single-process run)."""
    if ctx is None or not dist.is_initialized():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def shutdown(ctx: DistContext | None) -> None:
    """Leave the process group, if this process joined one."""
    if ctx is not None and dist.is_initialized():
        dist.destroy_process_group()


def shard(lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Indices of the documents of each rank, balanced in tokens.

    Longest document first, each to the rank with the fewest tokens so far (then the fewest
    documents, then the lowest rank): no rank exceeds the mean by more than the longest document. Each
    shard comes out longest first, which batches with little padding; with one rank it is the
    corpus sorted by length (stable). Deterministic, so every rank computes every shard.
    """
    if world_size < 1:
        raise DistributedError(f"world size must be at least 1, got {world_size}")
    shards: list[list[int]] = [[] for _ in range(world_size)]
    load = [(0, 0, r) for r in range(world_size)]  # (tokens, documents, rank), a heap
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        tokens, docs, r = heapq.heappop(load)
        shards[r].append(i)
        heapq.heappush(load, (tokens + lengths[i], docs + 1, r))
    return shards
