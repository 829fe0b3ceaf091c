"""``fit_heads``: train probe heads on already extracted tokens (no images, no encoder).

The training settings travel as one :class:`~attnflow.probes.protocols.TrainOptions` (the names of
:class:`~attnflow.probes.protocols.ProbeConfig` and of the ``probe`` command); keywords override it, checked by
name: ``fit_heads(train, val, ["cls", "abmilp"], epochs=30)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pandas as pd
import torch

from ..dist import broadcast_module, current_world
from ..errors import AttnflowError
from ..options import resolve_device
from .bank import HeadBank
from .holdout import HoldoutSplit, holdout_split, mark_selected
from .loop import Batch, Schedule, train_bank
from .protocols import TrainOptions
from .sampler import BatchPlan, shard_range
from .specs import HeadSpec, parse_head_list

RESULT_COLUMNS: tuple[str, ...] = ("head", "lr", "seed", "epoch", "top1", "top5", "train_loss", "holdout_top1",
                                   "holdout_loss", "selected")
"""Columns of the per-run probe table (the CLI adds ``model`` and ``task``). ``top1``/``top5``: validation
accuracy (percent); ``holdout_top1``/``holdout_loss``: on the held-out training samples that chose the lr (NaN
without a held-out split); ``selected``: the lr each head keeps (its only lr, or the one chosen on held-out
data; every lr of a grid trained without a held-out split is False)."""

EVAL_BATCH = 512
"""Samples per evaluation batch of in-memory tokens."""


def check_tokens(tokens: torch.Tensor, labels: torch.Tensor, what: str) -> None:
    """Raise a one-line error for tokens that are not ``[n, T, D]`` floats matching ``labels [n]``."""
    if tokens.ndim != 3 or not tokens.is_floating_point():
        raise AttnflowError(f"{what} tokens must be a float tensor [n, tokens, D]; got {tuple(tokens.shape)} "
                            f"{tokens.dtype}")
    if labels.ndim != 1 or labels.shape[0] != tokens.shape[0]:
        raise AttnflowError(f"{what} labels must be [n] with n = {tokens.shape[0]}; got {tuple(labels.shape)}")


def check_classes(num_classes: int, where: str) -> None:
    """A probe needs at least two classes: with one, every prediction is right and top-1 is a meaningless 100.

    Raises:
        AttnflowError: fewer than two training classes.
    """
    if num_classes < 2:
        raise AttnflowError(f"{where}: the training set has {num_classes} class(es); a probe needs at least 2")


def tensor_batches(tokens: torch.Tensor, labels: torch.Tensor, plan: BatchPlan, rows: torch.Tensor | None = None
                   ) -> Callable[[int], Iterator[Batch]]:
    """Training micro-batches of in-memory (or memory-mapped) tokens, following ``plan``; the plan indexes
    ``rows`` (default: every sample) so that a held-out split is never copied."""

    def epoch_batches(epoch: int) -> Iterator[Batch]:
        for step in plan.epoch(epoch):
            for idx in step:
                sel = idx if rows is None else rows[idx]
                yield tokens[sel], labels[sel]

    return epoch_batches


def eval_batches(tokens: torch.Tensor, labels: torch.Tensor, batch_size: int, rows: torch.Tensor | None = None
                 ) -> Callable[[], Iterator[Batch]]:
    """This process's contiguous evaluation shard of ``rows`` (default: every sample), in batches."""
    world = current_world()
    n = len(labels) if rows is None else len(rows)
    shard = shard_range(n, world.size, world.rank)

    def batches() -> Iterator[Batch]:
        for lo in range(shard.start, shard.stop, batch_size):
            hi = min(lo + batch_size, shard.stop)
            if rows is None:
                yield tokens[lo:hi], labels[lo:hi]
            else:
                yield tokens[rows[lo:hi]], labels[rows[lo:hi]]

    return batches


def result_tables(rows: list[dict], seed: int, selects: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The run's history (every evaluated epoch) and its last-epoch table, both with :data:`RESULT_COLUMNS`;
    ``selected`` marks each head's kept lr (see :func:`attnflow.probes.holdout.mark_selected`). Rows of a block
    bank (with a ``block``) keep it as a first column, and each (block, head) keeps its own lr."""
    history = pd.DataFrame(rows).assign(seed=seed)
    columns = (["block"] if "block" in history.columns else []) + list(RESULT_COLUMNS)
    table = history[history["epoch"] == history["epoch"].max()].reset_index(drop=True)
    table["selected"] = mark_selected(table, selects)
    keys = [c for c in ("block", "head", "lr") if c in history.columns]
    kept = set(table.loc[table["selected"], keys].itertuples(index=False, name=None))
    history["selected"] = [key in kept for key in history[keys].itertuples(index=False, name=None)]
    return history.loc[:, columns], table.loc[:, columns]


@dataclass
class FitResult:
    """Everything :func:`fit_bank` trained.

    Attributes:
        table: the last evaluated epoch, one row per (head, lr), columns :data:`RESULT_COLUMNS`.
        history: every evaluated epoch, the same columns.
        bank: the trained heads (one entry per (head, lr)).
        options: the settings it ran with (``batch_size`` resolved).
        holdout: indices of the training samples held out to choose the lrs (empty: none).
    """

    table: pd.DataFrame
    history: pd.DataFrame
    bank: HeadBank
    options: TrainOptions
    holdout: torch.Tensor

    @property
    def chosen(self) -> pd.DataFrame:
        """Each head's kept lr (one row per head), or every row of a grid trained without a held-out split."""
        return self.table[self.table["selected"]].reset_index(drop=True) if self.options.selects_lr else self.table


@dataclass(frozen=True)
class _Tokens:
    """Checked inputs of a fit: tokens ``[n, T, D]``, long labels ``[n]``, head specs and K."""

    xt: torch.Tensor
    yt: torch.Tensor
    xv: torch.Tensor
    yv: torch.Tensor
    specs: list[HeadSpec]
    num_classes: int


def _check_inputs(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                  heads: Sequence[str | HeadSpec] | str, num_classes: int | None) -> _Tokens:
    (xt, yt), (xv, yv) = train, val
    check_tokens(xt, yt, "train")
    check_tokens(xv, yv, "val")
    if xt.shape[2] != xv.shape[2]:
        raise AttnflowError(f"train and val token widths differ: {xt.shape[2]} vs {xv.shape[2]}")
    names = heads if isinstance(heads, str) else [h.name if isinstance(h, HeadSpec) else h for h in heads]
    yt, yv = yt.long(), yv.long()
    k = num_classes or int(max(yt.max(), yv.max())) + 1
    check_classes(k, "fit_heads")
    return _Tokens(xt, yt, xv, yv, parse_head_list(names), k)


def _fingerprint(options: TrainOptions, bank: HeadBank, data: _Tokens, split: HoldoutSplit, has_cls: bool
                 ) -> dict[str, Any]:
    """What must not change between an interrupted run and its resumption (``eval_amp`` only when not the default
    ``fp32``, so that checkpoints from before it existed resume)."""
    settings = {k: v for k, v in options.to_dict().items() if k != "eval_amp" or v != "fp32"}
    return {**settings, "heads": bank.names, "lrs": [e.lr for e in bank.entries],
            "n_train": len(data.yt), "n_holdout": len(split.held), "dim": data.xt.shape[2],
            "num_classes": data.num_classes, "has_cls": has_cls}


def fit_bank(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
             heads: Sequence[str | HeadSpec] | str, options: TrainOptions | None = None, *, has_cls: bool = True,
             num_classes: int | None = None, device: str | torch.device | None = None,
             checkpoint: str | Path | None = None, resume: bool = False, progress: bool = False,
             on_epoch_end: Callable[[int], None] | None = None, **overrides: Any) -> FitResult:
    """Train probe heads on frozen tokens; everything trained (see :func:`fit_heads` for the arguments).

    Returns:
        The last-epoch table (every (head, lr)), the history of every evaluated epoch, the bank, the
        resolved options and the held-out indices.
    """
    options = TrainOptions.of(options, **overrides)
    data = _check_inputs(train, val, heads, num_classes)
    device = resolve_device(device)
    split = holdout_split(data.yt, options.holdout if options.selects_lr else 0.0, options.seed)
    batch = options.resolved_batch(len(split.fit))
    options = TrainOptions.of(options, batch_size=batch)
    world = current_world()
    plan = BatchPlan(len(split.fit), batch, options.accum_steps, world.size, world.rank, options.seed)
    bank = HeadBank.from_options(data.specs, options.peak_lrs(batch), options, dim=data.xt.shape[2],
                                 num_classes=data.num_classes, has_cls=has_cls).to(device)
    broadcast_module(bank)
    rows_fit = split.fit if split.active else None
    rows = train_bank(bank, plan=plan, train_batches=tensor_batches(data.xt, data.yt, plan, rows_fit),
                      val_batches=eval_batches(data.xv, data.yv, EVAL_BATCH),
                      holdout_batches=eval_batches(data.xt, data.yt, EVAL_BATCH, split.held) if split.active else None,
                      schedule=Schedule(options.epochs, options.warmup_epochs, options.min_lr, options.eval_every),
                      device=device, checkpoint=Path(checkpoint) if checkpoint else None, resume=resume,
                      fingerprint=_fingerprint(options, bank, data, split, has_cls), on_epoch_end=on_epoch_end,
                      progress=progress)
    history, table = result_tables(rows, options.seed, options.selects_lr)
    return FitResult(table, history, bank, options, split.held)


def fit_heads(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
              heads: Sequence[str | HeadSpec] | str, options: TrainOptions | None = None, *, has_cls: bool = True,
              num_classes: int | None = None, device: str | torch.device | None = None,
              checkpoint: str | Path | None = None, resume: bool = False, progress: bool = False,
              on_epoch_end: Callable[[int], None] | None = None, **overrides: Any) -> pd.DataFrame:
    """Train probe heads on frozen tokens and report their validation accuracy.

    One pass over each micro-batch feeds every head and every learning rate; each (head, lr) keeps its own
    optimizer state, so it trains exactly as if alone. By default each head trains with the base-lr grid
    :data:`~attnflow.probes.protocols.DEFAULT_BASE_LRS` on 90% of ``train`` and keeps the lr that scores best
    on the other 10% (held out by class, by ``seed``; see :mod:`attnflow.probes.holdout`): the validation set
    never chooses. The kept head is not retrained on the held-out samples (one pass; the lr was chosen for this
    training). With one lr (``lr=0.4`` or ``base_lr=0.1``, the paper's rule) or ``holdout=0`` every training
    sample is trained on. Under ``torch.distributed`` every process passes the same tensors and trains on its
    shard of each global batch (same result as one process).

    Args:
        train: ``(tokens, labels)``: float ``[n, 1 + N, D]`` with [cls] first (or ``[n, N, D]`` with
            ``has_cls=False``) and int labels ``[n]``.
        val: the same for validation.
        heads: head specs, e.g. ``["cls", "avg", "abmilp"]`` or ``"cls,avg,abmilp"``.
        options: the training settings (default: :class:`~attnflow.probes.protocols.TrainOptions`'s).
        has_cls: whether ``tokens[:, 0]`` is a [cls] token.
        num_classes: K (default: ``max(label) + 1`` over train and val).
        device: where heads train (default: CUDA when available); tokens move there per micro-batch.
        checkpoint: per-epoch checkpoint file; with ``resume`` an interrupted run continues from it.
        resume: continue from ``checkpoint`` (its run settings must match).
        progress: show a progress bar.
        on_epoch_end: called with the number of completed epochs after each epoch's checkpoint.
        **overrides: :class:`~attnflow.probes.protocols.TrainOptions` fields (``epochs``, ``batch_size``,
            ``lr``, ``base_lr``, ``holdout``, ``optimizer``, ``momentum``, ``weight_decay``, ``warmup_epochs``,
            ``min_lr``, ``accum_steps``, ``head_init``, ``eval_every``, ``seed``); a misspelt name is an error.

    Returns:
        The last evaluated epoch, columns :data:`RESULT_COLUMNS`: one row per head with its chosen lr (``lr``)
        and that lr's validation top-1/top-5 in percent, or, for a grid trained without a held-out split,
        one row per (head, lr). Use :func:`fit_bank` for every lr, the history and the trained heads.

    Raises:
        AttnflowError: malformed tokens or labels, fewer than 2 classes, an unknown head or setting, a batch
            larger than the training samples, or a resume from another run's checkpoint.
    """
    return fit_bank(train, val, heads, options, has_cls=has_cls, num_classes=num_classes, device=device,
                    checkpoint=checkpoint, resume=resume, progress=progress, on_epoch_end=on_epoch_end,
                    **overrides).chosen
