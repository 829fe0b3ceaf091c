"""The image path of the probe: a frozen encoder feeds a head bank, per seed, with checkpoints and resume.

Scale: run under ``torchrun --nproc_per_node=G -m attnflow probe ...``: every process encodes its shard of
each global micro-batch (bf16 autocast on GPU; heads in fp32), gradients are summed once per optimizer step
(see :mod:`attnflow.dist`), and BatchNorm statistics span the global micro-batch, so G
processes train the same heads as one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd
import torch
from torch.utils.data import Dataset

from .bank import HeadBank
from .cache import TokenCache, extract_tokens
from ..dist import broadcast_module, current_world, init_from_env, wait_for_main
from ..encode import TokenEncoder
from .fit import RESULT_COLUMNS, check_classes
from .backbone import backbone_record
from .imagedata import SeededDataset, image_loader
from .loop import Batch, Schedule, train_bank
from .outputs import safe_name, save_head, write_run_table
from .protocols import ProbeConfig
from .sampler import BatchPlan, shard_range
from .specs import check_heads_fit, parse_head_list
from .tasks import TaskData

log = logging.getLogger(__name__)


def _encode(encoder: TokenEncoder, images: torch.Tensor, shape: list) -> torch.Tensor:
    """Tokens of a batch; an empty batch (every image unreadable) gives ``[0, T, D]``.

    Before the first readable batch ``T`` is unknown, and the empty batch gets one patch token (after [cls]):
    no head has parameters that depend on ``T``, but pooling needs a patch. (Under torchrun an empty shard of a
    micro-batch still goes through the heads: their BatchNorm statistics and gradients are summed over processes.)
    """
    if images.numel() == 0:
        return torch.zeros(0, *shape[1:]) if shape else torch.zeros(0, int(encoder.has_cls) + 1, encoder.dim)
    tokens = encoder(images)
    shape[:] = list(tokens.shape)
    return tokens


def image_train_batches(encoder: TokenEncoder, dataset: Dataset, plan: BatchPlan, seed: int, num_workers: int
                        ) -> Callable[[int], Iterator[Batch]]:
    """Training micro-batches encoded on the fly; augmentation seeded per ``(seed, epoch, image)``."""
    shape: list = []

    def epoch_batches(epoch: int) -> Iterator[Batch]:
        flat = [idx.tolist() for step in plan.epoch(epoch) for idx in step]
        loader = image_loader(SeededDataset(dataset, seed, epoch), flat, num_workers,
                              pin_memory=encoder.device.type == "cuda")
        for batch in loader:
            yield _encode(encoder, batch.images, shape), batch.labels

    return epoch_batches


def image_eval_batches(encoder: TokenEncoder, dataset: Dataset, batch_size: int, num_workers: int,
                       world_size: int, rank: int) -> Callable[[], Iterator[Batch]]:
    """This process's contiguous shard of the validation set, encoded on the fly."""
    shard = shard_range(len(dataset), world_size, rank)  # type: ignore[arg-type]
    chunks = [list(range(lo, min(lo + batch_size, shard.stop))) for lo in range(shard.start, shard.stop, batch_size)]
    shape: list = []

    def batches() -> Iterator[Batch]:
        for batch in image_loader(dataset, chunks, num_workers, pin_memory=encoder.device.type == "cuda"):
            yield _encode(encoder, batch.images, shape), batch.labels

    return batches


def _extract_caches(encoder: TokenEncoder, data: TaskData, config: ProbeConfig, root: Path, model_name: str,
                    model_info: dict[str, Any], *, batch_size: int, progress: bool) -> tuple[TokenCache, TokenCache]:
    """The train and val token caches under ``root``: rank 0 extracts them (or reuses complete ones) while the
    other processes wait, then every process opens them (they share ``root``)."""
    world = current_world()
    if world.is_main:
        ident = {"model": model_name, "checkpoint_sha256": model_info.get("sha256"), "img_size": config.img_size,
                 "dataset": data.info["root"]}
        for split, dataset, views in (("train", data.train, config.views), ("val", data.val, 1)):
            extract_tokens(encoder, dataset, root / split, views=views, dtype=config.cache_dtype,
                           info={**ident, "split": split, "transform": data.info[f"{split}_transform"]},
                           batch_size=batch_size, num_workers=config.num_workers, progress=progress)
    wait_for_main()
    return TokenCache.open(root / "train"), TokenCache.open(root / "val")


def probe_images(model: torch.nn.Module, data: TaskData, config: ProbeConfig, out_dir: str | Path, *,
                 model_name: str, model_info: dict[str, Any] | None = None, model_size: str | None = None,
                 device: torch.device | None = None, resume: bool = False, progress: bool = True,
                 reference: torch.nn.Module | None = None) -> pd.DataFrame:
    """Train the configured heads on a frozen encoder for every seed; write the run directory.

    Args:
        model: the frozen timm encoder.
        data: the task's datasets (see :func:`attnflow.probes.tasks.load_task`).
        config: the resolved protocol.
        out_dir: the run directory (see :mod:`attnflow.probes.outputs` for its layout).
        model_name: preset or timm name (the ``model`` column).
        model_info: provenance of the weights (``model.attnflow_info``).
        model_size: ``S/B/L/H`` (ImageNet: 50 epochs for L/H unless ``config.epochs`` is set).
        device: default CUDA when available; under torchrun ``cuda:LOCAL_RANK``.
        resume: continue interrupted seeds from their per-epoch checkpoints.
        progress: show progress bars.
        reference: the reference model of a ``reference:<name>`` aggregation (``config.aggregation``).

    Returns:
        The run table (columns ``model, task`` + :data:`attnflow.probes.fit.RESULT_COLUMNS`).
    """
    out = Path(out_dir)
    world, device = init_from_env(device)
    model_info = dict(model_info or getattr(model, "attnflow_info", {}) or {})
    encoder: TokenEncoder
    aggregation: dict[str, Any] | None = None  # provenance of a fixed aggregation
    if config.aggregation is not None:  # one fixed-weight token per image (paper Table 5)
        from ..aggregation.capture import FixedAggregationEncoder

        encoder = FixedAggregationEncoder(model, config.aggregation, reference=reference, block=config.block,
                                          layernorm=config.layernorm, amp=config.amp, device=device,
                                          model_name=model_name)
        if encoder.reference is not None:
            broadcast_module(encoder.reference)
        aggregation = encoder.describe()
    else:
        encoder = TokenEncoder(model, block=config.block, layernorm=config.layernorm, amp=config.amp, device=device)
    broadcast_module(encoder.model)  # every process encodes with rank 0's weights (matters for --random-init)
    backbone = backbone_record(encoder.model, model_info)  # saved with each head (see check_head)
    specs = parse_head_list(config.heads)
    check_heads_fit(specs, encoder.has_cls)  # before any (long) cache extraction
    check_classes(data.num_classes, data.info["root"])
    epochs = config.resolved_epochs(model_size)
    accum = config.resolved_accum_steps(world.size)
    lrs = config.peak_lrs()
    eval_size = min(config.micro_batch, 512)
    train_cache = val_cache = None
    if config.cache:
        train_cache, val_cache = _extract_caches(encoder, data, config, out / "cache", model_name, model_info,
                                                 batch_size=eval_size, progress=progress)
    frames = []
    for seed in config.seeds:
        n_train = len(train_cache.valid) if train_cache is not None else len(data.train)  # type: ignore[arg-type]
        plan = BatchPlan(n_train, config.batch_size, accum, world.size, world.rank, seed)
        bank = HeadBank(specs, lrs, dim=encoder.dim, num_classes=data.num_classes, has_cls=encoder.has_cls,
                        optimizer=config.optimizer, momentum=config.momentum, weight_decay=config.weight_decay,
                        seed=seed, head_init=config.head_init).to(device)
        broadcast_module(bank)
        if train_cache is not None and val_cache is not None:
            train_batches = train_cache.train_batches(plan, seed)
            val_batches = val_cache.eval_batches(eval_size)
        else:
            train_batches = image_train_batches(encoder, data.train, plan, seed, config.num_workers)
            val_batches = image_eval_batches(encoder, data.val, eval_size, config.num_workers, world.size, world.rank)
        fingerprint = {"model": model_name, "checkpoint_sha256": model_info.get("sha256"),
                       "encoder": encoder.fingerprint, "task": config.task,
                       "heads": bank.names, "seed": seed, "epochs": epochs, "batch_size": config.batch_size,
                       "accum_steps": accum, "world_size": world.size, "optimizer": config.optimizer,
                       "n_train": n_train, "block": config.block, "layernorm": config.layernorm,
                       # every other setting that changes the training (not: seeds, workers, eval cadence,
                       # micro-batch size); a resume with other ones would mix two runs in one table
                       "lrs": list(lrs), "config": {k: v for k, v in config.to_dict().items()
                                                    if k not in ("seeds", "num_workers", "eval_every", "micro_batch")}}
        if config.aggregation is not None:
            fingerprint["aggregation"] = config.aggregation
        seed_dir = out / f"seed{seed}"
        rows = train_bank(bank, plan=plan, train_batches=train_batches, val_batches=val_batches,
                          schedule=Schedule(epochs, config.warmup_epochs, config.min_lr, config.eval_every),
                          device=device, checkpoint=seed_dir / "checkpoint.pt", resume=resume,
                          fingerprint=fingerprint, progress=progress)
        frame = pd.DataFrame(rows).assign(seed=seed)
        frames.append(frame)
        if world.is_main:
            last = frame[frame["epoch"] == frame["epoch"].max()]
            for entry in bank.entries:
                acc = last[(last["head"] == entry.spec.name) & (last["lr"] == entry.lr)]
                save_head(seed_dir / "heads" / f"{safe_name(entry.name)}.pt", entry.head,
                          meta={"model": model_name, "task": config.task, "seed": seed, "lr": entry.lr,
                                "epochs": epochs, "top1": float(acc["top1"].iloc[0]) if len(acc) else None,
                                "block": config.block, "layernorm": config.layernorm, **backbone,
                                **({"aggregation": config.aggregation} if aggregation else {})})
    table = pd.concat(frames, ignore_index=True).assign(model=model_name, task=config.task)
    table = table.loc[:, ["model", "task", *RESULT_COLUMNS]]
    if aggregation is not None:  # the cls head read the fixed-weight token: name the column after the source
        table["head"] = f"fixed:{config.aggregation}"
    if world.is_main:
        meta = {"model": model_name, "model_info": model_info, "data": data.info, "config": config.to_dict(),
                "epochs": epochs, "accum_steps": accum, "world_size": world.size, "lrs": lrs,
                "has_cls": encoder.has_cls, "dim": encoder.dim, "device": str(device),
                "cache": str(out / "cache") if config.cache else None}
        if aggregation is not None:
            meta["aggregation"] = aggregation
        write_run_table(table, meta, out)
        log.info("wrote %s", out / "results.parquet")
    return table
