"""Choosing each head's learning rate on training data held out of training (as DINOv2 and CAPI do).

When a run trains several learning rates (the head bank trains every (head, lr) in one pass), a share of the
*training* set is held out: it is never trained on, every (head, lr) is scored on it after the last epoch,
and each head keeps the lr that scores best there. The validation set is only ever reported, never used to
choose, so the validation accuracy of the chosen lr is an honest estimate.

The split is stratified and a pure function of ``(labels, fraction, seed)``: per class (in label order),
``round(fraction x count)`` samples (at least one of a class with two or more, never all of a class) are drawn
by a generator seeded by the run seed. Each seed thus holds out its own samples, and the spread over seeds
includes the split's. The chosen head is the one trained on the rest: it is not retrained on all the training
data, which would take a second pass over the data and train under another number of steps per epoch than
the lr was chosen for.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from ..errors import AttnflowError


@dataclass(frozen=True)
class HoldoutSplit:
    """Sample indices of the training set, ascending.

    Attributes:
        fit: ``[n_fit]`` samples trained on.
        held: ``[n_held]`` samples held out to choose the lr (empty without a split).
    """

    fit: torch.Tensor
    held: torch.Tensor

    @property
    def active(self) -> bool:
        return len(self.held) > 0


def held_count(count: int, fraction: float) -> int:
    """Samples held out of a class of ``count``: ``round(fraction x count)``, at least 1 and at most
    ``count - 1`` for a class of two or more, none of a class of one."""
    if fraction <= 0 or count < 2:
        return 0
    return min(count - 1, max(1, round(fraction * count)))


def no_split(n: int) -> HoldoutSplit:
    """Every one of ``n`` samples trained on, none held out."""
    return HoldoutSplit(torch.arange(n), torch.zeros(0, dtype=torch.long))


def holdout_split(labels: torch.Tensor, fraction: float, seed: int) -> HoldoutSplit:
    """Hold out ``fraction`` of every class of ``labels [n]`` (see the module docstring); ``fraction = 0``:
    every sample is trained on.

    Raises:
        AttnflowError: a split was asked for but no class has two samples.
    """
    n = len(labels)
    if fraction <= 0:
        return no_split(n)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + 7_717)
    held = []
    for label in torch.unique(labels).tolist():  # sorted
        members = torch.nonzero(labels == label).flatten()
        take = held_count(len(members), fraction)
        held.append(members[torch.randperm(len(members), generator=generator)[:take]])
    held_idx = torch.sort(torch.cat(held)).values
    if len(held_idx) == 0:
        raise AttnflowError(f"cannot hold out training samples to choose the lr: no class of the {n} training "
                            "samples has two; give one lr or set holdout to 0")
    keep = torch.ones(n, dtype=torch.bool)
    keep[held_idx] = False
    return HoldoutSplit(torch.nonzero(keep).flatten(), held_idx)


def held_out_total(labels: torch.Tensor, fraction: float) -> int:
    """How many samples :func:`holdout_split` holds out (the same for every seed)."""
    if fraction <= 0:
        return 0
    return sum(held_count(int(c), fraction) for c in torch.unique(labels, return_counts=True)[1])


def mark_selected(table: pd.DataFrame, selects: bool) -> pd.Series:
    """Which rows of a last-epoch table (one per head and lr, per seed) hold each head's kept lr.

    With ``selects``: per (seed, head), or per (seed, block, head) in a table with a ``block`` column, the lr with
    the highest ``holdout_top1``, ties broken by the lower ``holdout_loss``, then the smaller lr. Without:
    ``True`` where a head has a single lr (nothing to choose) and ``False`` for every lr of a grid (none was
    chosen; the validation set must not choose one).

    Returns:
        A boolean Series aligned with ``table``.
    """
    keys = [c for c in ("seed", "block", "head") if c in table.columns]
    if not selects:
        return table.groupby(keys, sort=False)["lr"].transform("count").eq(1)
    ranked = table.sort_values(["holdout_top1", "holdout_loss", "lr"], ascending=[False, True, True], kind="stable")
    best = ranked.groupby(keys, sort=False).head(1).index
    return pd.Series(table.index.isin(best), index=table.index)
