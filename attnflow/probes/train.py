"""The image path of the probe: a frozen encoder feeds a head bank, per seed, with checkpoints and resume.

Scale: run under ``torchrun --nproc_per_node=G -m attnflow probe ...``: every process encodes its shard of
each global micro-batch (bf16 autocast on GPU; heads in fp32), gradients are summed once per optimizer step
(see :mod:`attnflow.dist`), and BatchNorm statistics span the global micro-batch, so G
processes train the same heads as one.

A run is a few named steps: build the encoder (:func:`make_encoder`), find where the training tokens come from
(:func:`token_source`: the images, encoded on the fly, or a token cache), train each seed
(:func:`train_seed`: held-out split, batch plan, head bank, :func:`~attnflow.probes.loop.train_bank`, saved
heads) and write the run table (:func:`~attnflow.probes.outputs.write_run_table`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd
import torch
from torch.utils.data import Dataset, Subset

from ..dist import World, broadcast_module, current_world, gather_objects, init_from_env, wait_for_main
from ..options import autocast_dtype, default_workers, dtype_name
from .bank import HeadBank
from .blockbank import BlockBank, BlockEntry
from .cache import TokenCache, extract_tokens
from ..encode import BlockTokenEncoder, TokenEncoder, resolve_blocks
from .fit import RESULT_COLUMNS, check_classes, result_tables
from ..models.record import model_record
from .backbone import backbone_record
from .holdout import HoldoutSplit, held_out_total, holdout_split, no_split
from .imagedata import SeededDataset, dataset_labels, image_loader
from .loop import Bank, Batch, Schedule, train_bank
from .outputs import safe_name, save_head, write_run_table
from .protocols import ProbeConfig, TrainOptions
from .sampler import BatchPlan, shard_range
from .specs import HeadSpec, check_heads_fit, parse_head_list
from .tasks import TaskData

log = logging.getLogger(__name__)

EvalBatches = Callable[[], Iterator[Batch]]
Record = Callable[[list[tuple[str, str]]], None]
"""Where a loader reports the ``(path, reason)`` of the files of a batch it could not read."""


class SkippedImages:
    """The unreadable files a probe run met, each once, by split: ``train`` (training and held-out images) and
    ``val``. Images are read again every epoch; a file is counted once however often it fails. (Without a cache,
    a training image that no epoch's batches include, the partial last batch being dropped, is never read.)"""

    SPLITS = ("train", "val")

    def __init__(self) -> None:
        self.found: dict[str, dict[str, str]] = {split: {} for split in self.SPLITS}
        self.counts: dict[str, int] = {}  # a split whose count is known without every path (an old cache)

    def recorder(self, split: str) -> Record:
        """A callback that adds a batch's unreadable files to ``split``."""
        def record(bad: list[tuple[str, str]]) -> None:
            for path, reason in bad:
                self.found[split].setdefault(path, reason)

        return record

    def gathered(self) -> "SkippedImages":
        """Every process's files (under torchrun each reads its shard), on every process."""
        out = SkippedImages()
        out.counts = dict(self.counts)
        items = [(split, path, reason) for split, files in self.found.items() for path, reason in files.items()]
        for split, path, reason in gather_objects(items):
            out.found[split].setdefault(path, reason)
        return out

    def meta(self) -> dict[str, Any]:
        """``images_skipped`` (count per split) and ``skipped`` (``split, path, reason`` of each) for results.json."""
        return {"images_skipped": {s: max(len(self.found[s]), self.counts.get(s, 0)) for s in self.SPLITS},
                "skipped": [{"split": s, "path": p, "reason": r} for s in self.SPLITS
                            for p, r in sorted(self.found[s].items())]}


def _encode(encoder: TokenEncoder, images: torch.Tensor, shape: list) -> torch.Tensor:
    """Tokens of a batch (``[B, T, D]``, or ``[B, L, T, D]`` from a :class:`BlockTokenEncoder`); an empty batch
    (every image unreadable) gives ``B = 0``.

    Before the first readable batch ``T`` is unknown, and the empty batch gets one patch token (after [cls],
    :meth:`TokenEncoder.empty`): no head has parameters that depend on ``T``, but pooling needs a patch. (Under
    torchrun an empty shard of a micro-batch still goes through the heads: their BatchNorm statistics and
    gradients are summed over processes.)
    """
    if images.numel() == 0:
        return torch.zeros(0, *shape[1:]) if shape else encoder.empty()
    tokens = encoder(images)
    shape[:] = list(tokens.shape)
    return tokens


def image_train_batches(encoder: TokenEncoder, dataset: Dataset, plan: BatchPlan, seed: int, workers: int,
                        record: Record | None = None) -> Callable[[int], Iterator[Batch]]:
    """Training micro-batches encoded on the fly; augmentation seeded per ``(seed, epoch, image)``; the files that
    cannot be read go to ``record``."""
    shape: list = []

    def epoch_batches(epoch: int) -> Iterator[Batch]:
        flat = [idx.tolist() for step in plan.epoch(epoch) for idx in step]
        loader = image_loader(SeededDataset(dataset, seed, epoch), flat, workers,
                              pin_memory=encoder.device.type == "cuda")
        for batch in loader:
            if record is not None and batch.bad:
                record(batch.bad)
            yield _encode(encoder, batch.images, shape), batch.labels

    return epoch_batches


def image_eval_batches(encoder: TokenEncoder, dataset: Dataset, batch_size: int, workers: int,
                       record: Record | None = None) -> EvalBatches:
    """This process's contiguous shard of an evaluation set, encoded on the fly; the files that cannot be read go
    to ``record``."""
    world = current_world()
    shard = shard_range(len(dataset), world.size, world.rank)  # type: ignore[arg-type]
    chunks = [list(range(lo, min(lo + batch_size, shard.stop))) for lo in range(shard.start, shard.stop, batch_size)]
    shape: list = []

    def batches() -> Iterator[Batch]:
        for batch in image_loader(dataset, chunks, workers, pin_memory=encoder.device.type == "cuda"):
            if record is not None and batch.bad:
                record(batch.bad)
            yield _encode(encoder, batch.images, shape), batch.labels

    return batches


@dataclass
class SeedBatches:
    """Where one seed's training reads its tokens: training micro-batches, validation and held-out batches."""

    train: Callable[[int], Iterator[Batch]]
    val: EvalBatches
    holdout: EvalBatches | None


class ImageSource:
    """Tokens encoded from the images on the fly, every epoch (augmented training crops)."""

    def __init__(self, encoder: TokenEncoder, data: TaskData, workers: int, eval_size: int) -> None:
        self.encoder, self.data, self.workers, self.eval_size = encoder, data, workers, eval_size
        self.skipped = SkippedImages()

    def size(self) -> int:
        """Training images (the plan's and the split's index space)."""
        return len(self.data.train)  # type: ignore[arg-type]

    def train_labels(self) -> torch.Tensor:
        """``[n]`` labels of the training images."""
        return dataset_labels(self.data.train)

    def batches(self, plan: BatchPlan, seed: int, split: HoldoutSplit) -> SeedBatches:
        train = Subset(self.data.train, split.fit.tolist()) if split.active else self.data.train
        record = self.skipped.recorder("train")
        held = (image_eval_batches(self.encoder, Subset(self.data.train_eval(), split.held.tolist()),
                                   self.eval_size, self.workers, record) if split.active else None)
        return SeedBatches(image_train_batches(self.encoder, train, plan, seed, self.workers, record),
                           image_eval_batches(self.encoder, self.data.val, self.eval_size, self.workers,
                                              self.skipped.recorder("val")), held)


class CacheSource:
    """Tokens read from on-disk caches (see :mod:`attnflow.probes.cache`); unreadable images are left out."""

    def __init__(self, train: TokenCache, val: TokenCache, train_eval: TokenCache | None, eval_size: int) -> None:
        self.train, self.val, self.train_eval, self.eval_size = train, val, train_eval, eval_size
        self.skipped = SkippedImages()  # every image was read once, at extraction: the caches know them all
        for split, caches in (("train", (train, train_eval)), ("val", (val,))):
            for cache in caches:
                if cache is None:
                    continue
                record = self.skipped.recorder(split)
                record([(item["path"], item["reason"]) for item in cache.manifest.get("skipped", [])])
                unreadable = int(cache.manifest.get("unreadable", 0))  # caches written before paths were kept
                self.skipped.counts[split] = max(self.skipped.counts.get(split, 0), unreadable)

    def size(self) -> int:
        """Readable training images (the plan's and the split's index space)."""
        return len(self.train.valid)

    def train_labels(self) -> torch.Tensor:
        """``[n]`` labels of the readable training images."""
        return self.train.labels[self.train.valid]

    def batches(self, plan: BatchPlan, seed: int, split: HoldoutSplit) -> SeedBatches:
        rows = self.train.valid
        held = None
        if split.active:  # held-out images are scored on un-augmented tokens, as the validation images
            held = (self.train_eval or self.train).eval_batches(self.eval_size, rows=rows[split.held])
        return SeedBatches(self.train.train_batches(plan, seed, rows=rows[split.fit] if split.active else None),
                           self.val.eval_batches(self.eval_size), held)


TokenSource = ImageSource | CacheSource


def make_encoder(model: torch.nn.Module, config: ProbeConfig, device: torch.device, model_name: str,
                 reference: torch.nn.Module | None) -> tuple[TokenEncoder, dict[str, Any] | None]:
    """The frozen encoder (rank 0's weights on every process) and the provenance of a fixed aggregation.

    With ``config.blocks`` naming several blocks the encoder is a :class:`BlockTokenEncoder` (tokens ``[B, L, T,
    D]`` of every block from one forward); one listed block is the same run as ``block`` set to it."""
    encoder: TokenEncoder
    aggregation: dict[str, Any] | None = None
    blocks = resolve_blocks(model, config.blocks) if config.blocks is not None else None
    if config.aggregation is not None:  # one fixed-weight token per image (paper Table 5)
        from ..aggregation.capture import FixedAggregationEncoder

        encoder = FixedAggregationEncoder(model, config.aggregation, reference=reference, block=config.block,
                                          layernorm=config.layernorm, amp=config.amp, device=device,
                                          model_name=model_name)
        if encoder.reference is not None:
            broadcast_module(encoder.reference)
        aggregation = encoder.describe()
    elif blocks is not None and len(blocks) > 1:
        encoder = BlockTokenEncoder(model, blocks=blocks, layernorm=config.layernorm, amp=config.amp, device=device)
    else:
        encoder = TokenEncoder(model, block=blocks[0] if blocks else config.block, layernorm=config.layernorm,
                               amp=config.amp, device=device)
    broadcast_module(encoder.model)  # every process encodes with rank 0's weights (matters for random_init)
    return encoder, aggregation


def token_source(encoder: TokenEncoder, data: TaskData, config: ProbeConfig, root: Path, ident: dict[str, Any],
                 progress: bool) -> TokenSource:
    """The images, or with ``config.cache`` the token caches under ``root``: rank 0 extracts them (or reuses
    complete ones) while the other processes wait, then every process opens them (they share ``root``). A held-out
    split of augmented views also gets the training images through the validation transform (``train-eval``)."""
    eval_size = min(config.micro_batch, 512)
    workers = default_workers() if config.workers is None else config.workers
    if not config.cache:
        return ImageSource(encoder, data, workers, eval_size)
    splits: list[tuple[str, Dataset, int]] = [("train", data.train, config.views), ("val", data.val, 1)]
    if config.selects_lr and data.train_transform is not data.val_transform:
        splits.append(("train-eval", data.train_eval(), 1))
    if current_world().is_main:
        for split, dataset, views in splits:
            transform = data.info["val_transform" if split != "train" else "train_transform"]
            extract_tokens(encoder, dataset, root / split, views=views, dtype=config.cache_dtype,
                           info={**ident, "split": split, "transform": transform},
                           batch_size=eval_size, workers=workers, progress=progress)
    wait_for_main()
    caches = {split: TokenCache.open(root / split) for split, _, _ in splits}
    return CacheSource(caches["train"], caches["val"], caches.get("train-eval"), eval_size)


@dataclass
class ProbeRun:
    """What every seed of one ``probe`` run shares."""

    encoder: TokenEncoder
    data: TaskData
    config: ProbeConfig
    source: TokenSource
    specs: list[HeadSpec]
    out: Path
    model_name: str
    model_info: dict[str, Any]
    model_size: str | None
    world: World
    device: torch.device

    @property
    def blocks(self) -> list[int]:
        """The blocks whose heads the run trains (0-based, ascending): several from a :class:`BlockTokenEncoder`,
        else the encoder's one block."""
        return list(getattr(self.encoder, "blocks", [self.encoder.block]))

    @property
    def several_blocks(self) -> bool:
        """Whether the run trains the heads of several blocks (a :class:`BlockBank`, tokens ``[n, L, T, D]``)."""
        return isinstance(self.encoder, BlockTokenEncoder)

    def make_bank(self, options: TrainOptions, lrs: list[float]) -> Bank:
        """The heads of one seed: a :class:`HeadBank`, or a :class:`BlockBank` (one bank per block)."""
        kw: dict[str, Any] = dict(dim=self.encoder.dim, num_classes=self.data.num_classes,
                                  has_cls=self.encoder.has_cls)
        if self.several_blocks:
            return BlockBank.from_options(self.blocks, self.specs, lrs, options, **kw)
        return HeadBank.from_options(self.specs, lrs, options, **kw)

    def split(self, seed: int) -> HoldoutSplit:
        """The seed's held-out split of the training samples (none unless the run chooses lrs)."""
        if not self.config.selects_lr:
            return no_split(self.source.size())
        return holdout_split(self.source.train_labels(), self.config.holdout, seed)

    def fingerprint(self, options: TrainOptions, bank: Bank, split: HoldoutSplit) -> dict[str, Any]:
        """Every setting that changes the training (not: seeds, workers, eval cadence, micro-batch size) or the
        scores (``eval_amp``, recorded when not the default ``fp32``, so runs from before it existed resume); a
        resume with other ones would mix two runs in one table. ``blocks`` is recorded as resolved (``5,8,11`` and
        ``5,8,-1`` of a 12-block model are the same run), and only when set, so runs from before it existed
        resume."""
        skip = ("seeds", "workers", "eval_every", "micro_batch", "blocks",
                *(("eval_amp",) if self.config.eval_amp == "fp32" else ()))
        fingerprint = {"model": self.model_name, "checkpoint_sha256": self.model_info.get("sha256"),
                       "encoder": self.encoder.fingerprint, "task": self.config.task, "heads": bank.names,
                       "seed": options.seed, "epochs": options.epochs, "batch_size": options.batch_size,
                       "accum_steps": options.accum_steps, "world_size": self.world.size,
                       "optimizer": options.optimizer, "n_train": len(split.fit), "n_holdout": len(split.held),
                       "block": self.config.block, "layernorm": self.config.layernorm,
                       "lrs": [e.lr for e in bank.entries],
                       "config": {k: v for k, v in self.config.to_dict().items() if k not in skip}}
        if self.config.aggregation is not None:
            fingerprint["aggregation"] = self.config.aggregation
        if self.config.blocks is not None:
            fingerprint["blocks"] = self.blocks
        return fingerprint


def train_seed(run: ProbeRun, seed: int, *, resume: bool, progress: bool) -> tuple[pd.DataFrame, TrainOptions]:
    """Train every head (and lr) for ``seed``; save the heads; return the seed's history (every evaluated epoch,
    :data:`attnflow.probes.fit.RESULT_COLUMNS`) and its resolved options."""
    split = run.split(seed)
    options = run.config.train_options(seed, n_train=len(split.fit), world_size=run.world.size,
                                       model_size=run.model_size)
    plan = BatchPlan(len(split.fit), options.resolved_batch(len(split.fit)), options.accum_steps, run.world.size,
                     run.world.rank, seed)
    bank = run.make_bank(options, options.peak_lrs(plan.batch_size)).to(run.device)
    broadcast_module(bank)
    batches = run.source.batches(plan, seed, split)
    seed_dir = run.out / f"seed{seed}"
    rows = train_bank(bank, plan=plan, train_batches=batches.train, val_batches=batches.val,
                      holdout_batches=batches.holdout,
                      schedule=Schedule(options.epochs, options.warmup_epochs, options.min_lr, options.eval_every),
                      device=run.device, checkpoint=seed_dir / "checkpoint.pt", resume=resume,
                      fingerprint=run.fingerprint(options, bank, split), progress=progress)
    history, table = result_tables(rows, seed, options.selects_lr)
    if run.world.is_main:
        save_heads(run, seed_dir / "heads", bank, table, options)
    return history, options


def save_heads(run: ProbeRun, folder: Path, bank: Bank, table: pd.DataFrame, options: TrainOptions) -> None:
    """Save every trained head with its provenance, block (0-based), last-epoch accuracy and whether its lr was
    kept; the kept head of a grid is also saved under its spec's own name (``heads/abmilp.pt``), as the head of a
    one-lr run is. The heads of a several-block run go to one folder per block, ``heads/block{B}/``."""
    backbone = backbone_record(run.encoder.model)  # see check_head
    for entry in bank.entries:
        block = entry.block if isinstance(entry, BlockEntry) else run.encoder.block
        row = table[(table["head"] == entry.spec.name) & (table["lr"] == entry.lr)]
        row = row[row["block"] == block] if "block" in row.columns else row
        meta = {"model": run.model_name, "task": run.config.task, "seed": options.seed, "lr": entry.lr,
                "epochs": options.epochs, "top1": float(row["top1"].iloc[0]) if len(row) else None,
                "selected": bool(row["selected"].iloc[0]) if len(row) else None,
                "block": block, "layernorm": run.config.layernorm, **backbone}
        if run.config.aggregation is not None:
            meta["aggregation"] = run.config.aggregation
        where = folder / f"block{block}" if isinstance(entry, BlockEntry) else folder
        name = entry.name.split("/", 1)[1] if isinstance(entry, BlockEntry) else entry.name
        save_head(where / f"{safe_name(name)}.pt", entry.head, meta=meta)
        if meta["selected"] and name != entry.spec.name:
            save_head(where / f"{safe_name(entry.spec.name)}.pt", entry.head, meta=meta)


def chosen_lrs(table: pd.DataFrame) -> dict[str, dict[str, float]]:
    """``{"seed0": {head: lr}}`` of the lrs a run kept (its only lr, or the one chosen on held-out data); the heads
    of a several-block run are named ``block{B}/{head}``."""
    last = table[table["epoch"] == table.groupby("seed")["epoch"].transform("max")]
    kept = last[last["selected"]]
    several = "block" in table.columns and table["block"].nunique() > 1

    def names(rows: pd.DataFrame) -> list[str]:
        return [f"block{b}/{h}" for b, h in zip(rows["block"], rows["head"])] if several else list(rows["head"])

    return {f"seed{s}": dict(zip(names(rows), rows["lr"])) for s, rows in kept.groupby("seed", sort=False)}


def _run_meta(run: ProbeRun, options: TrainOptions, table: pd.DataFrame, aggregation: dict | None
              ) -> dict[str, Any]:
    meta = {"model": run.model_name, "model_info": run.model_info, "data": run.data.info,
            "config": run.config.to_dict(), "epochs": options.epochs, "batch_size": options.batch_size,
            "accum_steps": options.accum_steps, "world_size": run.world.size, "lrs": options.peak_lrs(),
            "lr_selection": "held-out" if options.selects_lr else None,
            "n_holdout": len(run.split(options.seed).held), "chosen_lrs": chosen_lrs(table),
            "has_cls": run.encoder.has_cls, "dim": run.encoder.dim, "device": str(run.device),
            "blocks": run.blocks, "n_blocks": len(getattr(run.encoder.model, "blocks")),
            "cache": str(run.out / "cache") if run.config.cache else None}
    if aggregation is not None:
        meta["aggregation"] = aggregation
    return meta


def probe_images(model: torch.nn.Module, data: TaskData, config: ProbeConfig, out_dir: str | Path, *,
                 model_name: str, model_size: str | None = None,
                 device: torch.device | None = None, resume: bool = False, progress: bool = True,
                 reference: torch.nn.Module | None = None) -> pd.DataFrame:
    """Train the configured heads on a frozen encoder for every seed; write the run directory.

    Args:
        model: the frozen timm encoder.
        data: the task's datasets (see :func:`attnflow.probes.tasks.load_task`).
        config: the resolved protocol.
        out_dir: the run directory (see :mod:`attnflow.probes.outputs` for its layout).
        model_name: preset or timm name (the ``model`` column).
        model_size: ``S/B/L/H`` (ImageNet: 50 epochs for L/H unless ``config.epochs`` is set).
        device: default CUDA when available; under torchrun ``cuda:LOCAL_RANK``.
        resume: continue interrupted seeds from their per-epoch checkpoints.
        progress: show progress bars.
        reference: the reference model of a ``reference:<name>`` aggregation (``config.aggregation``).

    Returns:
        The run table (columns ``model, task, block`` + :data:`attnflow.probes.fit.RESULT_COLUMNS`; ``block``
        0-based), every evaluated epoch of every seed; with ``config.blocks`` naming several blocks, every block's
        heads, trained from one encoder pass per micro-batch (:class:`~attnflow.probes.blockbank.BlockBank`).
        ``results.json`` counts the unreadable files met per split (``images_skipped``: ``train`` covers the
        held-out images, ``val``) and lists each (``skipped``); ``data.n_train`` and ``data.n_val`` count the
        files, readable or not.
    """
    out = Path(out_dir)
    world, device = init_from_env(device)
    model_info = model_record(model).to_dict()  # provenance of the weights
    encoder, aggregation = make_encoder(model, config, device, model_name, reference)
    specs = parse_head_list(config.heads)
    check_heads_fit(specs, encoder.has_cls)  # before any (long) cache extraction
    check_classes(data.num_classes, data.info["root"])
    ident = {"model": model_name, "checkpoint_sha256": model_info.get("sha256"), "img_size": config.img_size,
             "dataset": data.info["root"]}
    source = token_source(encoder, data, config, out / "cache", ident, progress)
    run = ProbeRun(encoder, data, config, source, specs, out, model_name, model_info, model_size, world, device)
    seeds = [train_seed(run, seed, resume=resume, progress=progress) for seed in config.seeds]
    skipped = source.skipped.gathered()
    table = pd.concat([h for h, _ in seeds], ignore_index=True).assign(model=model_name, task=config.task)
    if "block" not in table.columns:
        table["block"] = encoder.block
    table = table.loc[:, ["model", "task", "block", *RESULT_COLUMNS]]
    if aggregation is not None:  # the cls head read the fixed-weight token: name the column after the source
        table["head"] = f"fixed:{config.aggregation}"
    if world.is_main:
        write_run_table(table, {**_run_meta(run, seeds[0][1], table, aggregation), **skipped.meta()}, out)
        log.info("wrote %s", out / "results.parquet")
    return table


def resolved_settings(config: ProbeConfig, data: TaskData, *, device: torch.device, world_size: int = 1,
                      model_size: str | None = None) -> dict[str, Any]:
    """The settings a run of ``config`` on ``data`` trains with, resolved as :func:`probe_images` resolves them
    (batch from the training images left after the held-out split; unreadable images, found only while
    reading, can lower an automatic batch of a cached run)."""
    n = len(data.train)  # type: ignore[arg-type]
    held = held_out_total(dataset_labels(data.train), config.holdout) if config.selects_lr else 0
    options = config.train_options(min(config.seeds), n_train=n - held, world_size=world_size,
                                   model_size=model_size)
    return {"task": config.task, "heads": config.heads, "blocks": config.blocks, "train images": n, "held out": held,
            "base lrs": None if options.lr is not None else list(options.base_lr), "lrs": options.peak_lrs(),
            "lr choice": "per head, on the held-out images" if config.selects_lr else (
                "none: every lr is reported" if options.grid_size > 1 else "fixed"),
            "epochs": options.epochs, "batch": options.batch_size, "accum_steps": options.accum_steps,
            "optimizer": options.optimizer, "workers": default_workers() if config.workers is None else config.workers,
            "device": str(device), "amp": f"{config.amp} ({dtype_name(autocast_dtype(config.amp, device))})",
            "seeds": list(config.seeds)}
