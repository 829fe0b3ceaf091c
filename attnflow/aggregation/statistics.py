"""Streaming statistics of aggregation vectors: mean entropy per source (paper Table 5's "Entropy") and mean
KL divergence for every ordered pair of sources (Fig. 7).

Exact in float64 with ``0 log 0 = 0`` (``torch.special.xlogy``); each vector is renormalised to sum to 1 in
float64 first. Only sums, sums of squares and counts are kept (on the device), so memory does not grow with
the number of images, two reducers :meth:`~AggregationStats.merge` exactly, and ``torch.distributed``
processes combine with :meth:`~AggregationStats.all_reduce`.

Zero entries in ``q``. ``KL(p || q)`` is infinite when ``q_i = 0 < p_i``. Softmax weights and a trained
head's weights are positive in exact arithmetic, but a float32 softmax underflows to exactly 0 for a logit
more than ~87 below the row's maximum (it happens with very peaked heads, e.g. the lowest-entropy head). Such
an entry's true value is below the smallest normal float32, so ``q`` is floored at
:data:`Q_FLOOR` (``torch.finfo(float32).tiny`` = 1.18e-38, ``ln`` = -87.3) inside the logarithm only: the
reported KL is then a finite lower bound of the true one, and the images where this happened are counted per
pair (the ``q_zero_images`` column), so a user sees when it matters.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..metrics import row_entropy
from ..reducers import Accumulator, mean_std
from .sources import AggregationError

Q_FLOOR: float = float(torch.finfo(torch.float32).tiny)
"""Smallest value of ``q`` inside ``log q`` (see the module docstring)."""

STATS_COLUMNS: tuple[str, ...] = ("model", "metric", "source", "target", "mean", "std", "count", "q_zero_images")
"""Columns of the aggregation statistics table: ``metric`` is ``entropy`` (``target`` empty) or ``kld``
(``KL(source || target)``)."""

def pairwise_kl(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image ``KL(p_s || p_t)`` for every ordered pair of sources, float64, ``q`` floored at :data:`Q_FLOOR`.

    Args:
        vectors: ``[S, B, N]`` non-negative weights (each row renormalised to sum to 1 here).

    Returns:
        ``(kl [S, S, B], q_zero [S, S, B])``: the divergences (diagonal exactly 0) and whether ``q`` had a zero
        where ``p`` is positive.
    """
    p = vectors.to(torch.float64)
    p = p / p.sum(dim=-1, keepdim=True)
    plogp = torch.special.xlogy(p, p)                                                 # [S, B, N]
    logq = torch.log(p.clamp_min(Q_FLOOR))                                            # [S, B, N]
    kl = (plogp[:, None] - p[:, None] * logq[None]).sum(dim=-1)                       # [S, S, B]
    zero = ((p[:, None] > 0) & (p[None] == 0)).any(dim=-1)                            # [S, S, B]
    return kl, zero


class AggregationStats(Accumulator):
    """Running mean/std of each source's entropy and of every ordered pair's KL divergence.

    Args:
        sources: source names, in table order.
        device: where the state lives.
    """

    def __init__(self, sources: Sequence[str], device: torch.device | str | None = None) -> None:
        super().__init__()
        self.sources = tuple(sources)
        if not self.sources or len(set(self.sources)) != len(self.sources):
            raise AggregationError(f"need distinct sources, got {list(sources)}")
        s = len(self.sources)

        def zeros(*shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)
        self.ent_sum: torch.Tensor
        self.ent_sumsq: torch.Tensor
        self.kld_sum: torch.Tensor
        self.kld_sumsq: torch.Tensor
        self.q_zero: torch.Tensor
        self.count: torch.Tensor
        for name in ("ent_sum", "ent_sumsq"):
            self.add_state(name, zeros(s))
        for name in ("kld_sum", "kld_sumsq"):
            self.add_state(name, zeros(s, s))
        self.add_state("q_zero", zeros(s, s, dtype=torch.int64))
        self.add_state("count", zeros(dtype=torch.int64))

    def update(self, vectors: Mapping[str, torch.Tensor] | torch.Tensor) -> None:
        """Add one batch.

        Args:
            vectors: ``{source: [B, N]}`` (every source of :attr:`sources`) or a stacked ``[S, B, N]`` tensor in
                :attr:`sources` order.
        """
        if isinstance(vectors, Mapping):
            missing = [s for s in self.sources if s not in vectors]
            if missing:
                raise AggregationError(f"no vectors for source(s) {', '.join(missing)}")
            stacked = torch.stack([vectors[s].to(self.count.device, torch.float64) for s in self.sources])
        else:
            stacked = vectors.to(self.count.device, torch.float64)
        if stacked.dim() != 3 or stacked.shape[0] != len(self.sources):
            raise AggregationError(f"expected [{len(self.sources)}, B, N] vectors, got {tuple(stacked.shape)}")
        if stacked.shape[1] == 0:
            return
        ent = row_entropy(stacked)                                                        # [S, B]
        kl, zero = pairwise_kl(stacked)
        self.ent_sum += ent.sum(dim=1)
        self.ent_sumsq += (ent * ent).sum(dim=1)
        self.kld_sum += kl.sum(dim=2)
        self.kld_sumsq += (kl * kl).sum(dim=2)
        self.q_zero += zero.sum(dim=2)
        self.count += stacked.shape[1]

    def _check_compatible(self, other: Any) -> None:
        if getattr(other, "sources", None) != self.sources:
            raise AggregationError(f"cannot merge statistics of sources {getattr(other, 'sources', None)} into "
                                   f"{self.sources}")
        super()._check_compatible(other)

    def state_dict(self) -> dict[str, Any]:
        return {"sources": list(self.sources), **super().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if tuple(state["sources"]) != self.sources:
            raise AggregationError(f"saved statistics are of sources {state['sources']}, not {list(self.sources)}")
        super().load_state_dict(state)

    def compute(self) -> dict[str, Any]:
        """Host arrays: ``entropy`` / ``entropy_std`` ``[S]``, ``kld`` / ``kld_std`` / ``q_zero`` ``[S, S]``
        (row = p, column = q), ``count``. NaN without images (std: with fewer than two)."""
        n = int(self.count)
        ent, ent_std = mean_std(self.ent_sum.cpu().numpy(), self.ent_sumsq.cpu().numpy(), n)
        kld, kld_std = mean_std(self.kld_sum.cpu().numpy(), self.kld_sumsq.cpu().numpy(), n)
        return {"entropy": ent, "entropy_std": ent_std, "kld": kld, "kld_std": kld_std,
                "q_zero": self.q_zero.cpu().numpy(), "count": np.int64(n)}

    def to_frame(self, model: str) -> pd.DataFrame:
        """Tidy table with columns :data:`STATS_COLUMNS`: one ``entropy`` row per source, one ``kld`` row per
        ordered pair (``KL(source || target)``)."""
        stats = self.compute()
        rows = [{"model": model, "metric": "entropy", "source": s, "target": "", "mean": stats["entropy"][i],
                 "std": stats["entropy_std"][i], "count": stats["count"], "q_zero_images": 0}
                for i, s in enumerate(self.sources)]
        rows += [{"model": model, "metric": "kld", "source": s, "target": t, "mean": stats["kld"][i, j],
                  "std": stats["kld_std"][i, j], "count": stats["count"], "q_zero_images": stats["q_zero"][i, j]}
                 for i, s in enumerate(self.sources) for j, t in enumerate(self.sources)]
        frame = pd.DataFrame(rows, columns=list(STATS_COLUMNS))
        return frame.astype({"mean": "float64", "std": "float64", "count": "int64", "q_zero_images": "int64"})


def kld_matrix(frame: pd.DataFrame, sources: Sequence[str] | None = None) -> pd.DataFrame:
    """The ``[S, S]`` mean-KLD matrix of a statistics table (rows: p = source, columns: q = target)."""
    kld = frame[frame["metric"] == "kld"]
    order = list(sources) if sources is not None else list(dict.fromkeys(kld["source"]))
    matrix = kld.pivot(index="source", columns="target", values="mean")
    return matrix.reindex(index=order, columns=order)
