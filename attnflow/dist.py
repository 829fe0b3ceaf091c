"""``torch.distributed`` in one place: this process's place in the run, joining and leaving torchrun's process
group, and the few collectives the analyses and the probe use.

Every loop shards its data by rank and sums its accumulators with ``all_reduce`` at the end
(:mod:`attnflow.loop`); without a process group every helper here is a no-op, so one process needs no setup.

Gradients of the probe: it does not wrap heads in ``DistributedDataParallel``: every process computes the gradient of its
shard's *summed* loss, :func:`all_reduce_grads` sums gradients and sample counts over processes once per
optimizer step (after all accumulation micro-batches, so accumulation costs no extra communication), and
divides by the global count. That is exactly the gradient of the mean loss over the global batch, the
same as one process would get, and it tolerates shards of unequal size (e.g. after skipped bad images).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import timedelta

from typing import Any, Iterator

import torch
import torch.distributed as dist

from .options import resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's place in the run: ``rank`` of ``size`` processes (``size == 1``: not distributed)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def current_world() -> World:
    """The world of the initialised default process group, or a single process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def gather_objects(items: list) -> list:
    """Every process's ``items`` concatenated in rank order (``items`` itself without a process group).

    For small picklable lists (skipped files, token layouts), through :func:`torch.distributed.all_gather_object`.
    """
    world = current_world()
    if not world.distributed:
        return items
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def init_from_env(device: str | torch.device | None = None) -> tuple[World, torch.device]:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE`` > 1), once.

    Picks NCCL and ``cuda:LOCAL_RANK`` on CUDA devices, gloo on the CPU.

    Args:
        device: the run's device (see :func:`attnflow.options.resolve_device`; default CUDA when available).

    Returns:
        The world and the device this process should use.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        log.info("joined process group: rank %d of %d on %s", dist.get_rank(), world_size, device)
    elif dist.is_initialized() and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return current_world(), device


@contextlib.contextmanager
def process_group(device: str | torch.device | None = None) -> Iterator[tuple[World, torch.device]]:
    """:func:`init_from_env` for one run, leaving the process group it joined on exit, also when the run
    fails."""
    world, resolved = init_from_env(device)
    try:
        yield world, resolved
    finally:
        if world.distributed and dist.is_initialized():
            dist.destroy_process_group()


def all_reduce_grads(params: list[torch.Tensor], local_count: int, device: torch.device) -> None:
    """Turn per-process gradients of *summed* losses into the gradient of the global mean loss.

    Sums the gradients (one flat buffer, one collective) and the sample counts over processes, then divides
    by the global count. Without a process group it only divides by ``local_count``.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    world = current_world()
    if world.distributed:
        flat = torch.cat([g.reshape(-1) for g in grads] + [torch.tensor([float(local_count)], device=device,
                                                                         dtype=grads[0].dtype)])
        dist.all_reduce(flat)
        count = flat[-1]
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    else:
        count = torch.tensor(float(local_count), device=device)
    for g in grads:
        g.div_(count.clamp_min(1))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over processes (no-op without a process group); returns ``t``."""
    if current_world().distributed:
        dist.all_reduce(t)
    return t


def wait_for_main(timeout: timedelta = timedelta(hours=24)) -> None:
    """A barrier for work that rank 0 does alone and that may take long (extracting a token cache).

    It runs on a gloo group of its own with a long ``timeout``, so an NCCL run's default collective timeout
    does not kill the waiting processes. No-op without a process group.
    """
    if current_world().distributed:
        group = dist.new_group(backend="gloo", timeout=timeout)
        assert isinstance(group, dist.ProcessGroup)  # every process is a member of the new group
        dist.barrier(group=group)
        dist.destroy_process_group(group)


def broadcast_module(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every process (no-op without a process group)."""
    if current_world().distributed:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)
