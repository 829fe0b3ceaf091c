"""The one training loop of the probe: epochs of accumulated steps over a batch plan, evaluation, checkpoints.

It is shared by the in-memory token path (:func:`attnflow.probes.fit_heads`), the feature cache and the
image path (:mod:`attnflow.probes.train`); they differ only in how a micro-batch of tokens is produced.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import AttnflowError
from .bank import HeadBank
from .blockbank import BlockBank, BlockEntry
from ..atomic import write_atomically
from ..dist import all_reduce_sum, current_world
from .sampler import BatchPlan

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]
"""``(tokens [n, P + N, D], labels [n])`` of this process; for a :class:`~attnflow.probes.blockbank.BlockBank`
the tokens of several blocks, ``[n, L, P + N, D]``."""

Bank = HeadBank | BlockBank
"""What the loop trains: one block's heads, or several blocks' heads fed from one pass."""


@dataclass(frozen=True)
class Schedule:
    """Epochs and learning-rate schedule of a run (see :func:`attnflow.probes.lars.cosine_lr`)."""

    epochs: int
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    eval_every: int = 1

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise AttnflowError(f"epochs must be at least 1, got {self.epochs}")


class Scores(NamedTuple):
    """Accuracy (percent) and mean cross-entropy of one bank entry on an evaluation set."""

    top1: float
    top5: float
    loss: float


EVAL_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
"""Autocast dtypes of :attr:`HeadBank.eval_amp` (``TrainOptions.eval_amp``)."""


@torch.no_grad()
def evaluate_bank(bank: Bank, batches: Iterable[Batch], device: torch.device) -> list[Scores]:
    """Top-1 and top-5 accuracy (percent) and mean cross-entropy of every entry over all processes' shards;
    top-5 is NaN with 5 classes or fewer, where it would be 100 whatever the head.

    With ``bank.eval_amp`` ``"fp16"`` (or ``"bf16"``) the heads run under autocast, as the official code's
    ``evaluate`` runs its model and head under ``torch.cuda.amp.autocast()`` (fp16): the linear layers compute in
    fp16 (logits in fp16), BatchNorm, softmax and the weighted sums stay in float32, and the cross-entropy is
    taken in float32 of the fp16 logits.

    Raises:
        AttnflowError: the set is empty (on every process).
    """
    bank.eval()
    k = min(5, bank.num_classes)
    sums = torch.zeros(len(bank.entries), 3, dtype=torch.float64, device=device)  # [entries, (top1, top5, loss)]
    count = torch.zeros(1, dtype=torch.float64, device=device)
    dtype = EVAL_DTYPES[getattr(bank, "eval_amp", "fp32")]
    for tokens, labels in batches:
        tokens, labels = tokens.to(device, non_blocking=True).float(), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
            outputs = bank(tokens)
        for i, logits in enumerate(outputs):
            logits = logits.float()
            hits = logits.topk(k, dim=1).indices == labels[:, None]  # [n, k]
            sums[i, 0] += hits[:, 0].sum()
            sums[i, 1] += hits.any(dim=1).sum()
            sums[i, 2] += F.cross_entropy(logits, labels, reduction="sum").double()
        count += labels.numel()
    all_reduce_sum(sums)
    all_reduce_sum(count)
    if count.item() == 0:
        raise AttnflowError("the validation set is empty")
    pct, loss = (100.0 * sums[:, :2] / count).cpu(), (sums[:, 2] / count).cpu()
    return [Scores(float(a), float(b) if bank.num_classes > 5 else float("nan"), float(c))
            for (a, b), c in zip(pct, loss)]


def _save_atomic(obj: Any, path: Path) -> None:
    write_atomically({path: lambda tmp: torch.save(obj, tmp)})


def _load_checkpoint(bank: Bank, path: Path, fingerprint: dict) -> tuple[int, list[dict]]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("fingerprint") != fingerprint:
        diff = sorted(k for k in set(fingerprint) | set(state.get("fingerprint", {}))
                      if fingerprint.get(k) != state.get("fingerprint", {}).get(k))
        raise AttnflowError(f"cannot resume from {path}: its run differs in {', '.join(diff)}; "
                            "use a new output directory or do not resume")
    bank.load_training_state(state["bank"])
    return int(state["epoch"]), list(state["history"])


def train_epoch(bank: Bank, batches: Iterator[Batch], plan: BatchPlan, schedule: Schedule, epoch: int,
                device: torch.device, bar: tqdm) -> list[float]:
    """One epoch of accumulated optimizer steps; returns every entry's mean training loss (all processes).

    A micro-batch with fewer than 2 samples is left out on one process: BatchNorm needs two, and a step left
    without samples does not update the heads. (Under torchrun the statistics span every process's shard, so
    a short shard still takes part.)
    """
    world = current_world()
    steps, accum = plan.steps_per_epoch, plan.accum_steps
    bank.train()
    loss_sum = torch.zeros(len(bank.entries), dtype=torch.float64, device=device)
    seen = torch.zeros(1, dtype=torch.float64, device=device)
    micro, local_count, skipped = 0, 0, 0
    for tokens, labels in batches:
        if micro % accum == 0:
            bank.schedule(epoch + (micro // accum) / steps, epochs=schedule.epochs,
                          warmup_epochs=schedule.warmup_epochs, min_lr=schedule.min_lr)
            bank.zero_grad()
            local_count = 0
        if not world.distributed and labels.numel() < 2:
            skipped += labels.numel()
        else:
            tokens, labels = tokens.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            losses = bank.losses(tokens, labels)  # [entries]
            losses.sum().backward()
            loss_sum += losses.detach().double()
            local_count += labels.numel()
            seen += labels.numel()
        micro += 1
        if micro % accum == 0:
            if local_count or world.distributed:
                bank.finish_step(local_count, device)
            bar.update(1)
    if micro != steps * accum:
        raise RuntimeError(f"epoch {epoch} produced {micro} micro-batches; the plan has {steps * accum}")
    if skipped:
        log.warning("epoch %d: %d readable image(s) left out of training, in micro-batches with fewer than 2 "
                    "readable images (BatchNorm needs 2)", epoch + 1, skipped)
    all_reduce_sum(loss_sum)
    all_reduce_sum(seen)
    return (loss_sum / seen.clamp_min(1)).cpu().tolist()


def evaluation_rows(bank: Bank, epoch: int, train_loss: list[float], val_batches: Iterable[Batch],
                    holdout_batches: Iterable[Batch] | None, device: torch.device) -> list[dict]:
    """One history row per entry after ``epoch`` epochs: validation top-1/top-5 and, with a held-out split,
    the held-out top-1 and loss (NaN without); the entries of a block bank also give their ``block``."""
    val = evaluate_bank(bank, val_batches, device)
    nan = Scores(float("nan"), float("nan"), float("nan"))
    held = evaluate_bank(bank, holdout_batches, device) if holdout_batches is not None else [nan] * len(val)
    if current_world().is_main:
        scores, where = (held, "held-out") if holdout_batches is not None else (val, "val")
        best = max(range(len(scores)), key=lambda i: scores[i].top1)
        log.info("epoch %d: best %s (%s top-1 %.2f)", epoch, bank.names[best], where, scores[best].top1)
    return [{**({"block": e.block} if isinstance(e, BlockEntry) else {}), "head": e.spec.name, "lr": e.lr,
             "epoch": epoch, "top1": v.top1, "top5": v.top5, "train_loss": loss, "holdout_top1": h.top1,
             "holdout_loss": h.loss}
            for e, v, h, loss in zip(bank.entries, val, held, train_loss)]


def train_bank(bank: Bank, *, plan: BatchPlan, train_batches: Callable[[int], Iterator[Batch]],
               val_batches: Callable[[], Iterable[Batch]], schedule: Schedule, device: torch.device,
               holdout_batches: Callable[[], Iterable[Batch]] | None = None, checkpoint: Path | None = None,
               resume: bool = False, fingerprint: dict | None = None,
               on_epoch_end: Callable[[int], None] | None = None, progress: bool = True) -> list[dict]:
    """Train every entry of ``bank`` and return its per-epoch history.

    Args:
        bank: the heads (already on ``device``): a :class:`HeadBank`, or a
            :class:`~attnflow.probes.blockbank.BlockBank` fed with tokens ``[n, L, P + N, D]``.
        plan: the batch plan (steps per epoch, accumulation); ``train_batches(epoch)`` must yield exactly
            ``plan.steps_per_epoch * plan.accum_steps`` micro-batches of this process, in plan order.
        train_batches: epoch -> iterator of ``(tokens, labels)`` micro-batches.
        val_batches: -> iterable of ``(tokens, labels)`` (this process's evaluation shard).
        schedule: epochs, warm-up, cosine floor, evaluation interval (the last epoch is always evaluated).
        device: where the heads live.
        holdout_batches: like ``val_batches``, for training samples held out to choose the lr; ``None``: none.
        checkpoint: file rewritten after every epoch (heads, optimizer states, history); ``None``: none.
        resume: continue from ``checkpoint`` when it exists (its ``fingerprint`` must match).
        fingerprint: what must not change between an interrupted and a resumed run.
        on_epoch_end: called with the number of completed epochs after each checkpoint.
        progress: show a tqdm bar (main process only).

    Returns:
        Rows ``{head, lr, epoch, top1, top5, train_loss, holdout_top1, holdout_loss}`` (and ``block`` for a
        :class:`~attnflow.probes.blockbank.BlockBank`), one per entry and evaluated epoch (``epoch`` = epochs
        completed, 1-based); accuracies in percent.
    """
    world = current_world()
    start, history = 0, list[dict]()
    if resume and checkpoint is not None and checkpoint.exists():
        start, history = _load_checkpoint(bank, checkpoint, fingerprint or {})
        log.info("resumed from %s after epoch %d", checkpoint, start)
    bar = tqdm(total=(schedule.epochs - start) * plan.steps_per_epoch, desc="probe", unit="step",
               disable=not (progress and world.is_main))
    for epoch in range(start, schedule.epochs):
        train_loss = train_epoch(bank, train_batches(epoch), plan, schedule, epoch, device, bar)
        done = epoch + 1
        if done % schedule.eval_every == 0 or done == schedule.epochs:
            history += evaluation_rows(bank, done, train_loss, val_batches(),
                                       holdout_batches() if holdout_batches is not None else None, device)
        if checkpoint is not None and world.is_main:
            _save_atomic({"epoch": done, "bank": bank.training_state(), "history": history,
                          "fingerprint": fingerprint or {}}, checkpoint)
        if on_epoch_end is not None:
            on_epoch_end(done)
    bar.close()
    return history
