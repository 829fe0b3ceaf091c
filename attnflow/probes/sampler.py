"""The batch plan: which sample indices each process reads in each micro-batch of each optimizer step.

The plan is a pure function of ``(n, batch_size, accum_steps, world_size, rank, seed, epoch)``:

* the epoch's order is ``randperm(n)`` from a generator seeded by ``(seed, epoch)``;
* it is cut into global batches of ``batch_size`` (the last, partial one dropped, as the MAE probe does);
* each global batch is split into ``accum_steps`` consecutive micro-batches (gradient accumulation);
* each micro-batch is split into ``world_size`` consecutive shards, one per process.

So one process with ``accum_steps = A`` and ``W`` processes with the same ``A`` see the same global
micro-batches (and batch statistics, see :mod:`attnflow.probes.norm`), and a resumed run replays exactly the
epochs an uninterrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import AttnflowError


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's sample order: ``randperm(n)`` seeded by ``(seed, epoch)`` only."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7_919 + 17)
    return torch.randperm(n, generator=generator)


@dataclass(frozen=True)
class BatchPlan:
    """Global batch size, accumulation and sharding of one training run.

    Attributes:
        n: number of training samples.
        batch_size: global (effective) batch size per optimizer step.
        accum_steps: micro-batches per optimizer step.
        world_size: processes.
        rank: this process.
        seed: run seed (the order of every epoch derives from it).
    """

    n: int
    batch_size: int
    accum_steps: int = 1
    world_size: int = 1
    rank: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.accum_steps < 1:
            raise AttnflowError("batch size and accumulation steps must be positive")
        if self.n < self.batch_size:
            raise AttnflowError(f"batch size {self.batch_size} is larger than the {self.n} samples trained on; "
                                "lower batch_size")
        if self.batch_size < max(2 * self.accum_steps, self.accum_steps * self.world_size):
            raise AttnflowError(f"batch size {self.batch_size} is too small for {self.accum_steps} accumulation "
                                f"steps on {self.world_size} processes (a micro-batch needs 2 samples and one "
                                "per process)")

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (the partial last batch is dropped)."""
        return self.n // self.batch_size

    @property
    def micro_batch_size(self) -> int:
        """Largest per-process micro-batch (memory planning)."""
        micro = -(-self.batch_size // self.accum_steps)
        return -(-micro // self.world_size)

    def epoch(self, epoch: int) -> list[list[torch.Tensor]]:
        """``steps x accum_steps`` lists of this process's local index tensors for ``epoch``."""
        order = epoch_order(self.n, self.seed, epoch)
        steps = []
        for s in range(self.steps_per_epoch):
            batch = order[s * self.batch_size:(s + 1) * self.batch_size]
            steps.append([micro.tensor_split(self.world_size)[self.rank]
                          for micro in batch.tensor_split(self.accum_steps)])
        return steps


def shard_range(n: int, world_size: int, rank: int) -> range:
    """Contiguous evaluation shard of ``n`` samples for ``rank`` (shards differ in size by at most 1)."""
    bounds = torch.arange(n).tensor_split(world_size)[rank]
    return range(int(bounds[0]), int(bounds[-1]) + 1) if len(bounds) else range(0)
