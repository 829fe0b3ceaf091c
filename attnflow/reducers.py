"""Streaming reduction of per-image metrics into per-(block, head, metric) mean, std and count.

Only sum-decomposable state is kept (float64 sums, sums of squares and integer counts, on the device), so
memory does not grow with the number of images, two reducers merge exactly, and ``torch.distributed``
processes combine with one ``all_reduce`` per state tensor. Nothing is copied to the host until
:meth:`StatsReducer.compute`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd
import torch

from .metrics import METRICS
from .result import COLUMNS

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

_STATE = ("sum", "sumsq", "count")


def mean_std(total: np.ndarray, squares: np.ndarray, count: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over samples (ddof=1) from float64 sums, sums of squares and counts (broadcast together).

    NaN where the count is 0 (mean and std) or 1 (std); a variance that rounding makes slightly negative is 0.
    """
    n = np.asarray(count)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, total / n, np.nan)
        var = np.where(n > 1, (squares - n * mean * mean) / (n - 1), np.nan)
    return mean, np.sqrt(np.clip(var, 0.0, None))


class StatsReducer:
    """Running statistics of ``[B, H, M]`` metric batches for each of ``n_blocks`` blocks.

    Args:
        n_blocks: number of blocks.
        n_heads: attention heads per block.
        metrics: metric names, the last axis of each update.
        valid: ``[M]`` bool mask of the metrics the model has; invalid ones stay missing (count 0, NaN).
        device: where the state lives (the device of the attention maps).
    """

    def __init__(self, n_blocks: int, n_heads: int, metrics: Sequence[str] = METRICS,
                 valid: torch.Tensor | None = None, device: torch.device | str | None = None) -> None:
        self.metrics = tuple(metrics)
        shape = (n_blocks, n_heads, len(self.metrics))
        self.sum = torch.zeros(shape, dtype=torch.float64, device=device)
        self.sumsq = torch.zeros(shape, dtype=torch.float64, device=device)
        self.count = torch.zeros(shape, dtype=torch.int64, device=device)
        mask = torch.ones(len(self.metrics), dtype=torch.bool) if valid is None else valid.bool()
        self.valid = mask.to(device)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(n_blocks, n_heads, n_metrics)``."""
        return tuple(self.sum.shape)  # type: ignore[return-value]

    def update(self, block: int, values: torch.Tensor) -> None:
        """Add one batch of per-image metrics of one block.

        Args:
            block: block index.
            values: ``[B, H, M]`` per-image values (NaN allowed only in invalid metric columns).
        """
        self._add(slice(block, block + 1), values[None])

    def update_blocks(self, blocks: Sequence[int], values: torch.Tensor) -> None:
        """Add one batch of per-image metrics of several blocks: the same as :meth:`update` per block, with
        one set of kernels for a run of consecutive blocks (the usual case: every block of a forward).

        Args:
            blocks: block indices, one per row of ``values``.
            values: ``[len(blocks), B, H, M]`` per-image values.
        """
        blocks = list(blocks)
        if values.shape[0] != len(blocks):
            raise ValueError(f"{values.shape[0]} rows of values for {len(blocks)} blocks")
        if blocks and blocks == list(range(blocks[0], blocks[0] + len(blocks))):
            self._add(slice(blocks[0], blocks[0] + len(blocks)), values)
        else:
            for block, block_values in zip(blocks, values):
                self.update(block, block_values)

    def _add(self, rows: slice, values: torch.Tensor) -> None:
        """Add ``[n, B, H, M]`` values to the state of the ``n`` consecutive blocks ``rows``."""
        v = torch.where(self.valid, values.to(torch.float64), 0.0)
        self.sum[rows] += v.sum(1)
        self.sumsq[rows] += (v * v).sum(1)
        self.count[rows] += values.shape[1] * self.valid

    def merge(self, other: "StatsReducer") -> "StatsReducer":
        """Add another reducer's state (e.g. the other half of the data); returns ``self``."""
        if other.shape != self.shape or other.metrics != self.metrics:
            raise ValueError(f"cannot merge reducers of shapes {self.shape} and {other.shape}")
        for name in _STATE:
            getattr(self, name).add_(getattr(other, name).to(getattr(self, name).device))
        return self

    def all_reduce(self, group: ProcessGroup | None = None) -> "StatsReducer":
        """Sum the state over all ``torch.distributed`` processes (no-op when not initialised)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            for name in _STATE:
                dist.all_reduce(getattr(self, name), op=dist.ReduceOp.SUM, group=group)
        return self

    def reset(self) -> None:
        """Zero the state."""
        for name in _STATE:
            getattr(self, name).zero_()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """CPU copies of the state, for checkpoints."""
        return {name: getattr(self, name).detach().cpu().clone() for name in _STATE} | {
            "valid": self.valid.cpu().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a state saved by :meth:`state_dict` (shapes must match)."""
        for name in _STATE:
            src = state[name]
            if tuple(src.shape) != self.shape:
                raise ValueError(f"checkpointed state has shape {tuple(src.shape)}, expected {self.shape}")
            getattr(self, name).copy_(src)

    def compute(self) -> dict[str, np.ndarray]:
        """Mean, std over images (ddof=1) and count, each ``[n_blocks, n_heads, M]`` on the host.

        Missing metrics (count 0) are NaN; std is NaN when only one image contributed.
        """
        n = self.count.cpu().numpy()
        mean, std = mean_std(self.sum.cpu().numpy(), self.sumsq.cpu().numpy(), n)
        return {"mean": mean, "std": std, "count": n}

    def to_frame(self, model: str) -> pd.DataFrame:
        """Tidy table with columns :data:`attnflow.result.COLUMNS` (block and head 0-based)."""
        stats = self.compute()
        L, H, M = self.shape
        block, head, metric = np.meshgrid(np.arange(L), np.arange(H), np.arange(M), indexing="ij")
        frame = pd.DataFrame({
            "model": model,
            "block": block.ravel(),
            "head": head.ravel(),
            "metric": np.asarray(self.metrics)[metric.ravel()],
            "mean": stats["mean"].ravel(),
            "std": stats["std"].ravel(),
            "count": stats["count"].ravel(),
        })
        return frame.loc[:, list(COLUMNS)]
