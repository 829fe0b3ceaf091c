"""``fit_heads``: train probe heads on already extracted tokens (no images, no encoder)."""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pandas as pd
import torch

from ..errors import AttnflowError
from .bank import HeadBank
from ..dist import broadcast_module, current_world
from .loop import Batch, Schedule, train_bank
from .sampler import BatchPlan, shard_range
from .specs import HeadSpec, parse_head_list

RESULT_COLUMNS: tuple[str, ...] = ("head", "lr", "seed", "epoch", "top1", "top5", "train_loss")
"""Columns of the per-run probe table (the CLI adds ``model`` and ``task``)."""


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


def resolve_lrs(lr: float | Sequence[float] | None, base_lr: float, batch_size: int) -> list[float]:
    """Absolute peak lrs: ``lr`` as given, else MAE's ``base_lr * batch_size / 256``."""
    if lr is None:
        return [base_lr * batch_size / 256]
    if isinstance(lr, (int, float)) or isinstance(lr, numbers.Real):  # numpy scalars are numbers.Real
        return [float(lr)]
    return [float(x) for x in lr]


def tensor_batches(tokens: torch.Tensor, labels: torch.Tensor, plan: BatchPlan
                   ) -> Callable[[int], Iterator[Batch]]:
    """Training micro-batches of in-memory (or memory-mapped) tokens, following ``plan``."""

    def epoch_batches(epoch: int) -> Iterator[Batch]:
        for step in plan.epoch(epoch):
            for idx in step:
                yield tokens[idx], labels[idx]

    return epoch_batches


def eval_batches(tokens: torch.Tensor, labels: torch.Tensor, batch_size: int) -> Callable[[], Iterator[Batch]]:
    """This process's contiguous evaluation shard, in batches."""
    world = current_world()
    shard = shard_range(len(labels), world.size, world.rank)

    def batches() -> Iterator[Batch]:
        for lo in range(shard.start, shard.stop, batch_size):
            hi = min(lo + batch_size, shard.stop)
            yield tokens[lo:hi], labels[lo:hi]

    return batches


def fit_heads(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
              heads: Sequence[str | HeadSpec] | str, *, epochs: int, batch_size: int = 256,
              lr: float | Sequence[float] | None = None, base_lr: float = 0.1, optimizer: str = "lars",
              momentum: float = 0.9, weight_decay: float = 0.0, warmup_epochs: float = 0.0, min_lr: float = 0.0,
              accum_steps: int = 1, seed: int = 0, has_cls: bool = True, num_classes: int | None = None,
              head_init: str = "default", device: str | torch.device | None = None, history: bool = False,
              checkpoint: str | Path | None = None, resume: bool = False, progress: bool = False,
              on_epoch_end: Callable[[int], None] | None = None, return_bank: bool = False) -> pd.DataFrame | tuple[pd.DataFrame, HeadBank]:
    """Train probe heads on frozen tokens and report their validation accuracy.

    One pass over each micro-batch feeds every head (and every learning rate of a grid); each (head, lr)
    keeps its own optimizer state, so it trains exactly as if alone. Under ``torch.distributed`` every
    process passes the same tensors and trains on its shard of each global batch (same result as one
    process).

    Args:
        train: ``(tokens, labels)``: float ``[n, 1 + N, D]`` with [cls] first (or ``[n, N, D]`` with
            ``has_cls=False``) and int labels ``[n]``.
        val: the same for validation.
        heads: head specs, e.g. ``["cls", "avg", "abmilp"]`` or ``"cls,avg,abmilp"``.
        epochs: training epochs.
        batch_size: global batch per optimizer step (the partial last batch of an epoch is dropped).
        lr: absolute peak learning rate, or a list for a grid; ``None``: ``base_lr * batch_size / 256``.
        base_lr: MAE's blr (used when ``lr`` is ``None``).
        optimizer: ``"lars"`` (ImageNet protocol) or ``"sgd"`` (CUB / ImageNet-1%).
        momentum, weight_decay: optimizer settings.
        warmup_epochs, min_lr: the warm-up + cosine schedule.
        accum_steps: micro-batches per optimizer step (gradient accumulation).
        seed: data order and head initialisation.
        has_cls: whether ``tokens[:, 0]`` is a [cls] token.
        num_classes: K (default: ``max(label) + 1`` over train and val).
        head_init: classifier initialisation (``"default"`` or ``"mae"``).
        device: where heads train (default: CUDA when available); tokens move there per micro-batch.
        history: return every epoch's row instead of only the last epoch's.
        checkpoint: per-epoch checkpoint file; with ``resume`` an interrupted run continues from it.
        progress: show a progress bar.
        on_epoch_end: called with the number of completed epochs after each epoch's checkpoint.
        return_bank: also return the trained :class:`HeadBank`.

    Returns:
        A DataFrame with columns :data:`RESULT_COLUMNS`, one row per (head, lr) (per epoch with
        ``history``); top-1/top-5 in percent.
    """
    (xt, yt), (xv, yv) = train, val
    check_tokens(xt, yt, "train")
    check_tokens(xv, yv, "val")
    if xt.shape[2] != xv.shape[2]:
        raise AttnflowError(f"train and val token widths differ: {xt.shape[2]} vs {xv.shape[2]}")
    specs = parse_head_list(heads if isinstance(heads, str) else [h.name if isinstance(h, HeadSpec) else h
                                                                     for h in heads])
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    yt, yv = yt.long(), yv.long()
    num_classes = num_classes or int(max(yt.max(), yv.max())) + 1
    check_classes(num_classes, "fit_heads")
    world = current_world()
    plan = BatchPlan(len(yt), batch_size, accum_steps, world.size, world.rank, seed)
    bank = HeadBank(specs, resolve_lrs(lr, base_lr, batch_size), dim=xt.shape[2], num_classes=num_classes,
                    has_cls=has_cls, optimizer=optimizer, momentum=momentum, weight_decay=weight_decay, seed=seed,
                    head_init=head_init).to(device)
    broadcast_module(bank)
    fingerprint = {"heads": bank.names, "seed": seed, "epochs": epochs, "batch_size": batch_size,
                   "accum_steps": accum_steps, "optimizer": optimizer, "n_train": len(yt), "dim": xt.shape[2],
                   "num_classes": num_classes, "has_cls": has_cls, "lrs": [entry.lr for entry in bank.entries],
                   "warmup_epochs": warmup_epochs, "min_lr": min_lr, "momentum": momentum,
                   "weight_decay": weight_decay, "head_init": head_init}
    rows = train_bank(bank, plan=plan, train_batches=tensor_batches(xt, yt, plan),
                      val_batches=eval_batches(xv, yv, 512),
                      schedule=Schedule(epochs, warmup_epochs, min_lr), device=device,
                      checkpoint=Path(checkpoint) if checkpoint else None, resume=resume, fingerprint=fingerprint,
                      on_epoch_end=on_epoch_end, progress=progress)
    frame = pd.DataFrame(rows).assign(seed=seed).loc[:, list(RESULT_COLUMNS)]
    if not history:
        frame = frame[frame["epoch"] == frame["epoch"].max()].reset_index(drop=True)
    return (frame, bank) if return_bank else frame
