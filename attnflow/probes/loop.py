"""The one training loop of the probe: epochs of accumulated steps over a batch plan, evaluation, checkpoints.

It is shared by the in-memory token path (:func:`attnflow.probes.fit_heads`), the feature cache and the
image path (:mod:`attnflow.probes.train`); they differ only in how a micro-batch of tokens is produced.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from tqdm.auto import tqdm

from ..errors import AttnflowError
from .bank import HeadBank
from ..dist import all_reduce_sum, current_world
from .sampler import BatchPlan

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]
"""``(tokens [n, P + N, D], labels [n])`` of this process."""


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


@torch.no_grad()
def evaluate_bank(bank: HeadBank, batches: Iterable[Batch], device: torch.device) -> list[tuple[float, float]]:
    """Top-1 and top-5 accuracy (percent) of every entry over all processes' shards; top-5 is NaN with 5 classes
    or fewer, where it would be 100 whatever the head."""
    bank.eval()
    k = min(5, bank.num_classes)
    correct = torch.zeros(len(bank.entries), 2, dtype=torch.float64, device=device)
    count = torch.zeros(1, dtype=torch.float64, device=device)
    for tokens, labels in batches:
        tokens, labels = tokens.to(device, non_blocking=True).float(), labels.to(device, non_blocking=True)
        for i, logits in enumerate(bank(tokens)):
            hits = logits.topk(k, dim=1).indices == labels[:, None]  # [n, k]
            correct[i, 0] += hits[:, 0].sum()
            correct[i, 1] += hits.any(dim=1).sum()
        count += labels.numel()
    all_reduce_sum(correct)
    all_reduce_sum(count)
    if count.item() == 0:
        raise AttnflowError("the validation set is empty")
    pct = (100.0 * correct / count).cpu()
    return [(float(a), float(b) if bank.num_classes > 5 else float("nan")) for a, b in pct]


def _save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load_checkpoint(bank: HeadBank, path: Path, fingerprint: dict) -> tuple[int, list[dict]]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("fingerprint") != fingerprint:
        diff = sorted(k for k in set(fingerprint) | set(state.get("fingerprint", {}))
                      if fingerprint.get(k) != state.get("fingerprint", {}).get(k))
        raise AttnflowError(f"cannot resume from {path}: its run differs in {', '.join(diff)}; "
                            "use a new --out directory or drop --resume")
    bank.load_training_state(state["bank"])
    return int(state["epoch"]), list(state["history"])


def train_bank(bank: HeadBank, *, plan: BatchPlan, train_batches: Callable[[int], Iterator[Batch]],
               val_batches: Callable[[], Iterable[Batch]], schedule: Schedule, device: torch.device,
               checkpoint: Path | None = None, resume: bool = False, fingerprint: dict | None = None,
               on_epoch_end: Callable[[int], None] | None = None, progress: bool = True) -> list[dict]:
    """Train every entry of ``bank`` and return its per-epoch history.

    Args:
        bank: the heads (already on ``device``).
        plan: the batch plan (steps per epoch, accumulation); ``train_batches(epoch)`` must yield exactly
            ``plan.steps_per_epoch * plan.accum_steps`` micro-batches of this process, in plan order.
        train_batches: epoch -> iterator of ``(tokens, labels)`` micro-batches.
        val_batches: -> iterable of ``(tokens, labels)`` (this process's evaluation shard).
        schedule: epochs, warm-up, cosine floor, evaluation interval (the last epoch is always evaluated).
        device: where the heads live.
        checkpoint: file rewritten after every epoch (heads, optimizer states, history); ``None``: none.
        resume: continue from ``checkpoint`` when it exists (its ``fingerprint`` must match).
        fingerprint: what must not change between an interrupted and a resumed run.
        on_epoch_end: called with the number of completed epochs after each checkpoint.
        progress: show a tqdm bar (main process only).

    Returns:
        Rows ``{head, lr, epoch, top1, top5, train_loss}``, one per entry and evaluated epoch (``epoch`` =
        epochs completed, 1-based); top-1/top-5 in percent.
    """
    fingerprint = fingerprint or {}
    world = current_world()
    start, history = 0, list[dict]()
    if resume and checkpoint is not None and checkpoint.exists():
        start, history = _load_checkpoint(bank, checkpoint, fingerprint)
        log.info("resumed from %s after epoch %d", checkpoint, start)
    steps, accum = plan.steps_per_epoch, plan.accum_steps
    bar = tqdm(total=(schedule.epochs - start) * steps, desc="probe", unit="step",
               disable=not (progress and world.is_main))
    for epoch in range(start, schedule.epochs):
        bank.train()
        loss_sum = torch.zeros(len(bank.entries), dtype=torch.float64, device=device)
        seen = torch.zeros(1, dtype=torch.float64, device=device)
        micro, local_count, skipped = 0, 0, 0
        for tokens, labels in train_batches(epoch):
            step = micro // accum
            if micro % accum == 0:
                bank.schedule(epoch + step / steps, epochs=schedule.epochs, warmup_epochs=schedule.warmup_epochs,
                              min_lr=schedule.min_lr)
                bank.zero_grad()
                local_count = 0
            if not world.distributed and labels.numel() < 2:
                # BatchNorm needs two samples: a micro-batch whose images were (almost) all unreadable is left
                # out; a step left without samples does not update the heads. (Under torchrun the statistics
                # span every process's shard, so a short shard still takes part.)
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
        train_loss = (loss_sum / seen.clamp_min(1)).cpu().tolist()
        done = epoch + 1
        if done % schedule.eval_every == 0 or done == schedule.epochs:
            accs = evaluate_bank(bank, val_batches(), device)
            for e, (top1, top5), loss in zip(bank.entries, accs, train_loss):
                history.append({"head": e.spec.name, "lr": e.lr, "epoch": done, "top1": top1, "top5": top5,
                                "train_loss": loss})
            if world.is_main:
                best = max(zip(bank.names, accs), key=lambda t: t[1][0])
                log.info("epoch %d/%d: best %s top-1 %.2f", done, schedule.epochs, best[0], best[1][0])
        if checkpoint is not None and world.is_main:
            _save_atomic({"epoch": done, "bank": bank.training_state(), "history": history,
                          "fingerprint": fingerprint}, checkpoint)
        if on_epoch_end is not None:
            on_epoch_end(done)
    bar.close()
    return history
