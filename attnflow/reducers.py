"""Streaming accumulators: named sum states that merge, all-reduce and checkpoint the same way, and the
attention statistics reducer built on them.

An :class:`Accumulator` declares each state once with :meth:`~Accumulator.add_state` (in the spirit of
torchmetrics): a tensor that is *summed* (float64 sums and sums of squares, int64 counts) or a list that is
*concatenated* (skipped files, a token layout). Only such decomposable states are kept, so memory does not grow
with the number of images, two accumulators :meth:`~Accumulator.merge` exactly, ``torch.distributed`` processes
combine with one collective per state (:meth:`~Accumulator.all_reduce`), and :meth:`~Accumulator.state_dict` is
what a resumable run saves. Nothing is copied to the host until a result is computed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np
import pandas as pd
import torch

from .metrics import METRICS
from .result import COLUMNS

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

Reduce = Literal["sum", "cat"]
"""How a state combines across accumulators and processes: tensors are summed, lists concatenated."""


class Accumulator:
    """Base of every streaming accumulator: named states, each declared once with its reduction.

    Subclasses call :meth:`add_state` in ``__init__`` and add to the states in their ``update``; they may
    override :meth:`_check_compatible` (settings that must agree before a merge or a load).
    """

    def __init__(self) -> None:
        self._reductions: dict[str, Reduce] = {}

    def add_state(self, name: str, default: torch.Tensor | list, reduce: Reduce = "sum") -> None:
        """Declare the state ``name`` with its initial value (a tensor for ``sum``, a list for ``cat``)."""
        if (reduce == "sum") != isinstance(default, torch.Tensor):
            raise TypeError(f"state {name}: a summed state is a tensor, a concatenated one a list")
        self._reductions[name] = reduce
        setattr(self, name, default)

    @property
    def state_names(self) -> tuple[str, ...]:
        return tuple(self._reductions)

    def _check_compatible(self, other: Any) -> None:
        """Raise when ``other``'s settings differ (another shape, other sources); the shapes are checked here."""
        for name, reduce in self._reductions.items():
            mine, theirs = getattr(self, name), getattr(other, name, None)
            if reduce == "sum" and (not isinstance(theirs, torch.Tensor) or theirs.shape != mine.shape):
                shape = tuple(theirs.shape) if isinstance(theirs, torch.Tensor) else None
                raise ValueError(f"cannot combine {type(self).__name__} states: {name} has shape {shape}, "
                                 f"expected {tuple(mine.shape)}")

    def merge(self, other: "Accumulator") -> "Accumulator":
        """Add another accumulator's state (e.g. of the other half of the data); returns ``self``."""
        self._check_compatible(other)
        for name, reduce in self._reductions.items():
            value = getattr(self, name)
            if reduce == "sum":
                value.add_(getattr(other, name).to(value.device))
            else:
                value.extend(getattr(other, name))
        return self

    def all_reduce(self, group: ProcessGroup | None = None) -> "Accumulator":
        """Combine the state of every ``torch.distributed`` process (no-op without a process group): tensors are
        summed (exactly: float64 and int64), lists concatenated in rank order; every process then holds the
        totals."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        nccl = dist.get_backend(group) == "nccl"
        for name, reduce in self._reductions.items():
            value = getattr(self, name)
            if reduce == "sum":
                # NCCL reduces CUDA tensors only: host states (e.g. box hit counts) make the round trip
                moved = value.cuda() if nccl and value.device.type != "cuda" else value
                dist.all_reduce(moved, op=dist.ReduceOp.SUM, group=group)
                if moved is not value:
                    value.copy_(moved)
            else:
                parts: list[Any] = [None] * dist.get_world_size(group)
                dist.all_gather_object(parts, value, group=group)
                setattr(self, name, [item for part in parts for item in part])
        return self

    def reset(self) -> None:
        """Zero every summed state and empty every list."""
        for name, reduce in self._reductions.items():
            if reduce == "sum":
                getattr(self, name).zero_()
            else:
                getattr(self, name).clear()

    def state_dict(self) -> dict[str, Any]:
        """Host copies of the state (tensors and plain lists: loadable with ``torch.load(weights_only=True)``)."""
        return {name: (getattr(self, name).detach().cpu().clone() if reduce == "sum" else list(getattr(self, name)))
                for name, reduce in self._reductions.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict` (shapes must match).

        Raises:
            ValueError: a missing state or one of another shape.
        """
        missing = [name for name in self._reductions if name not in state]
        if missing:
            raise ValueError(f"the saved {type(self).__name__} state lacks {', '.join(missing)}")
        for name, reduce in self._reductions.items():
            value = getattr(self, name)
            if reduce == "cat":
                setattr(self, name, [tuple(v) if isinstance(v, list) else v for v in state[name]])
            elif tuple(state[name].shape) != tuple(value.shape):
                raise ValueError(f"the saved {type(self).__name__} state {name} has shape "
                                 f"{tuple(state[name].shape)}, expected {tuple(value.shape)}")
            else:
                value.copy_(state[name])


def mean_std(total: np.ndarray, squares: np.ndarray, count: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over samples (ddof=1) from float64 sums, sums of squares and counts (broadcast together).

    NaN where the count is 0 (mean and std) or 1 (std); a variance that rounding makes slightly negative is 0.
    """
    n = np.asarray(count)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, total / n, np.nan)
        var = np.where(n > 1, (squares - n * mean * mean) / (n - 1), np.nan)
    return mean, np.sqrt(np.clip(var, 0.0, None))


class StatsReducer(Accumulator):
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
        super().__init__()
        self.metrics = tuple(metrics)
        shape = (n_blocks, n_heads, len(self.metrics))
        self.sum: torch.Tensor
        self.sumsq: torch.Tensor
        self.count: torch.Tensor
        self.add_state("sum", torch.zeros(shape, dtype=torch.float64, device=device))
        self.add_state("sumsq", torch.zeros(shape, dtype=torch.float64, device=device))
        self.add_state("count", torch.zeros(shape, dtype=torch.int64, device=device))
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

    def _check_compatible(self, other: Any) -> None:
        if getattr(other, "metrics", None) != self.metrics:
            raise ValueError(f"cannot merge reducers of metrics {getattr(other, 'metrics', None)} and {self.metrics}")
        super()._check_compatible(other)

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
