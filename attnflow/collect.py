"""attention_stats: the one loop that turns a model and a dataset into a :class:`~attnflow.result.Result`.

Device autodetection, bf16/fp16 autocast on GPU (the softmax stays fp32), ``inference_mode``, DataLoader
workers, a tqdm progress bar, periodic state files so that an interrupted run resumes to the same numbers,
and ``torch.distributed`` sharding (each process takes every ``world_size``-th image of a folder or Dataset, or
every ``world_size``-th batch of a DataLoader or iterable that every process iterates in full; a DataLoader with a
``DistributedSampler`` is used as it is; the reducer state is summed with ``all_reduce`` at the end).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from .data.images import DataError, ImageBatch, ImageFolderDataset, collate_skip_bad, evenly_spaced
from .data.transforms import eval_transform
from .errors import AttnflowError
from .kernels.route import QKRoute
from .dist import current_world
from .metrics import METRICS, attention_metrics, attention_metrics_from_logits, patch_distances, valid_metrics
from .options import autocast_dtype, dtype_name, resolve_device
from .provenance import run_provenance
from .reducers import StatsReducer
from .result import Result
from .runstate import (RunState, images_fingerprint, keep_progress, rank_state_path, run_fingerprint,
                       signals_deferred)
from .tap import AttentionTap, QueryKey, TokenLayout, model_blocks, model_has_cls, patch_embedding

log = logging.getLogger(__name__)

class InputShapeError(AttnflowError):
    """The images do not fit the model (resolution or channels)."""


def _as_batch(item: Any) -> ImageBatch:
    """An element of a user's DataLoader/iterable as an :class:`ImageBatch`."""
    if isinstance(item, ImageBatch):
        return item
    if isinstance(item, torch.Tensor):
        images = item
    elif isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        images = item[0]
    elif isinstance(item, dict) and isinstance(item.get("image", item.get("images")), torch.Tensor):
        images = item["image"] if "image" in item else item["images"]
    else:
        raise DataError(f"cannot read a batch of type {type(item).__name__}: expected an image tensor "
                        "[B, 3, H, W], an (images, labels) tuple, or a dict with 'image'")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    n = images.shape[0]
    return ImageBatch(images, torch.full((n,), -1), torch.full((n,), -1), [])


def _model_name(model: nn.Module, model_name: str | None) -> str:
    """The ``model`` column: given name, else the preset, else the timm architecture, else the class name."""
    info = getattr(model, "attnflow_info", None) or {}
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return model_name or info.get("preset") or cfg.get("architecture") or type(model).__name__


def attention_stats(
    model: nn.Module,
    data: Dataset | DataLoader | Iterable | str | Path,
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    amp: str = "auto",
    num_workers: int | None = None,
    img_size: int = 224,
    crop_pct: float | None = None,
    limit: int | None = None,
    model_name: str | None = None,
    state_path: str | Path | None = None,
    checkpoint_every: int = 50,
    resume: bool = False,
    progress: bool = True,
    compile: bool | None = None,
    meta: dict[str, Any] | None = None,
    fast_qk: bool | None = None,
    qk_kernel: str = "auto",
    keep_state: bool = False,
    _after_batch: Callable[[int], None] | None = None,
) -> Result:
    """Per-(block, head) attention statistics of ``model`` over ``data``.

    Args:
        model: a timm ViT-family model (see :class:`~attnflow.tap.AttentionTap`); used unmodified.
        data: a folder of images (path), a ``Dataset`` (items ``(image, label[, index])`` or ``BadImage``),
            a ``DataLoader``, any iterable of image tensors ``[B, 3, H, W]`` (or ``[3, H, W]``) or
            ``(images, labels)`` tuples, or one tensor ``[B, 3, H, W]`` (split into ``batch_size`` batches) or
            ``[3, H, W]``. Tensors must be float and normalised as the model expects (e.g. by
            :func:`~attnflow.data.transforms.eval_transform`); other float dtypes are cast to the model's.
        batch_size: images per forward (folder, Dataset or single-tensor input).
        device: ``"cuda"``, ``"cpu"``, ...; autodetected when ``None``.
        amp: ``auto`` (bf16 on a GPU that has it, else fp32), ``bf16``, ``fp16`` (CUDA only), ``fp32``.
            Autocast only: the softmax and the statistics stay fp32, accumulation is float64.
        num_workers: DataLoader workers (folder/Dataset input); default ``min(8, cpu_count)``.
        img_size: crop size for folder input (the model must be built at this resolution).
        crop_pct: center-crop fraction for folder input (default: the model's own).
        limit: use ``limit`` evenly spaced images of a folder or ``Dataset`` (deterministic subset), or the
            first ``limit`` images of any other iterable.
        model_name: value of the ``model`` column; default the preset or timm architecture name.
        state_path: file for periodic state; with ``resume=True`` an interrupted run continues from it.
        checkpoint_every: batches between state saves.
        resume: continue from ``state_path`` if it exists (its run must have had the same model, weights,
            images, resolution, crop and autocast dtype; the batch size may differ). A run that fails or is
            interrupted keeps the state of its last full batch when it made progress, and removes it otherwise.
        progress: show a tqdm progress bar (rank 0 only).
        compile: ``torch.compile`` the statistics function; default: on for CUDA or runs of 50+ batches.
        meta: extra provenance merged into ``Result.meta``.
        fast_qk: let plain timm ``Attention`` blocks keep fused attention and rebuild the identical map from
            their queries and keys inside the (compiled) statistics; other blocks are unaffected. Default: on
            for CUDA, where flash attention is far cheaper than a materialised map; off on CPU, where the
            non-fused attention costs little and computing the logits twice would not pay.
        qk_kernel: how ``fast_qk`` blocks turn queries and keys into metrics: ``auto`` (the Triton kernel of
            :mod:`attnflow.kernels.qk_metrics` on CUDA, checked against torch on each new shape, with a
            warning and the torch route if it fails or disagrees), ``triton`` or ``torch``.
        keep_state: leave the state of the finished run in ``state_path`` (for the caller to remove once the
            result is safely written; a resume from it returns the same result at once).

    Returns:
        :class:`~attnflow.result.Result` with ``mean``/``std`` over images per (block, head, metric).

    The model is measured in eval mode (no dropout) and moved to ``device``; each module's train/eval mode
    is restored afterwards. A first batch without negative values, for a model trained on mean-subtracted
    images, logs a warning (images not normalised?).

    Raises:
        DataError: empty folder, non-image path, no readable image at all.
        AttnflowError: a ``batch_size`` or ``checkpoint_every`` below 1.
        StateFileError, StateMismatchError: with ``resume``, an unreadable state or one of another run.
        InputShapeError: images that do not fit the model's resolution, whose channels are not dimension 1,
            or that are not floating point (e.g. uint8 pixels).
    """
    for arg, value in (("batch_size", batch_size), ("checkpoint_every", checkpoint_every)):
        if value < 1:
            raise AttnflowError(f"{arg} must be a positive integer, got {value}")
    device = resolve_device(device)
    amp_dtype = autocast_dtype(amp, device)
    rank, world = current_world().rank, current_world().size
    name = _model_name(model, model_name)
    model = model.to(device)
    blocks = model_blocks(model)
    n_blocks = len(blocks)

    dataset_root: str | None = None
    source: Any = data  # a Dataset, DataLoader or iterable of batches from here on
    if isinstance(data, (str, Path)):
        dataset_root = str(data)
        source = ImageFolderDataset(data, transform=eval_transform(model, img_size, crop_pct), limit=limit)
    elif isinstance(data, torch.Tensor):  # one image [3, H, W] or a batch [B, 3, H, W]
        source = list((data.unsqueeze(0) if data.dim() == 3 else data).split(batch_size))
    is_dataset = isinstance(source, Dataset) and not isinstance(source, torch.utils.data.IterableDataset) \
        and hasattr(source, "__len__")
    if limit is not None and dataset_root is None:
        if _distributed_sampler(source) is not None:
            raise AttnflowError("limit does not apply to a DataLoader with a DistributedSampler (each process "
                                "would cut its own shard): pass its Dataset, or a torch Subset of it")
        source = Subset(source, evenly_spaced(len(source), limit)) if is_dataset else _first_images(source, limit)
    n_items = len(source) if is_dataset else None

    state_file = RunState(rank_state_path(Path(state_path), rank, world) if state_path else None, {})
    if state_file.path is not None:
        folder = isinstance(source, ImageFolderDataset)
        state_file.fingerprint = run_fingerprint(
            model, name, n_items=n_items, world=world, rank=rank, amp=amp_dtype,
            images=images_fingerprint(source.paths, source.root) if folder else None,
            img_size=img_size if folder else None, crop_pct=crop_pct if folder else None)
    saved = state_file.load() if resume else None
    done_items = saved["done_items"] if saved else 0      # dataset positions (or batches) consumed
    n_images = saved["n_images"] if saved else 0
    bad: list[tuple[str, str]] = list(saved["bad"]) if saved else []
    if saved:
        log.info("resuming %s from %s: %d images done", name, state_file.path, n_images)

    batches, total = _batches(source, is_dataset, rank, world, done_items, batch_size, num_workers, device)
    has_cls = model_has_cls(model)
    valid = valid_metrics(has_cls)
    reducer = StatsReducer(n_blocks, _num_heads(blocks), METRICS, valid=valid, device=device)
    if saved:
        reducer.load_state_dict(saved["reducer"])

    if fast_qk is None:
        fast_qk = device.type == "cuda"
    metric_fn, qk_torch_fn = attention_metrics, metrics_from_qk
    if compile if compile is not None else (device.type == "cuda" or (total or 0) >= 50):
        metric_fn, qk_torch_fn = torch.compile(attention_metrics), torch.compile(metrics_from_qk)
    qk_route = QKRoute(qk_kernel, device, qk_torch_fn, metrics_from_qk) if fast_qk else None
    distances: dict[tuple, torch.Tensor] = {}
    pending: list[tuple[int, torch.Tensor]] = []  # this batch's [B, H, M] values, applied once it completes
    layout_seen: list[TokenLayout] = [TokenLayout(*saved["layout"])] if saved and saved.get("layout") else []

    def on_attention(block: int, attn: torch.Tensor | QueryKey) -> None:
        layout = tap.layout
        n_tokens = attn.q.shape[-2] if isinstance(attn, QueryKey) else attn.shape[-1]
        device_ = attn.q.device if isinstance(attn, QueryKey) else attn.device
        if layout is None or layout.n_tokens != n_tokens:
            raise InputShapeError(f"block {block}: {n_tokens} tokens do not match the token layout "
                                  f"{layout} of this model")
        key = (layout.grid, layout.patch_size, device_)
        if key not in distances:
            distances[key] = _patch_distances(layout.grid, layout.patch_size, str(device_))
            layout_seen.append(layout)
        if isinstance(attn, QueryKey):
            assert qk_route is not None  # the tap hands over queries and keys only with fast_qk
            values = qk_route(attn.q, attn.k, attn.scale, layout.num_prefix, layout.has_cls, distances[key])
        else:
            values = metric_fn(attn, layout.num_prefix, layout.has_cls, distances[key])
        pending.append((block, values))

    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    bar = tqdm(total=total, initial=done_items if is_dataset else 0, unit="img" if is_dataset else "batch",
               desc=f"attention stats {name}", disable=not progress or rank != 0, dynamic_ncols=True)
    start = time.perf_counter()
    n_batches = 0
    prepare = _ImageCheck(model, device)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()

    def snapshot() -> dict[str, Any]:
        layout = layout_seen[0] if layout_seen else None
        return {"done_items": done_items, "n_images": n_images, "bad": bad, "reducer": reducer.state_dict(),
                "layout": (layout.num_prefix, layout.has_cls, layout.grid, layout.patch_size) if layout else None,
                "seconds": (saved or {}).get("seconds", 0.0) + time.perf_counter() - start}

    try:
        with AttentionTap(model, callback=on_attention, fast_qk=fast_qk) as tap, torch.inference_mode(), autocast:
            for batch in batches:
                pending.clear()
                if batch.images.numel():
                    _forward(model, prepare(batch.images), tap.patch_size)
                # the batch is complete: only now does the state move on, all at once, so it is always consistent
                values = torch.stack([v for _, v in pending]) if pending else None
                with signals_deferred():
                    if values is not None:
                        reducer.update_blocks([block for block, _ in pending], values)
                    bad.extend(batch.bad)
                    n_images += batch.images.shape[0]
                    done_items += (batch.images.shape[0] + len(batch.bad)) if is_dataset else 1
                for path, reason in batch.bad:
                    log.warning("skipped %s (%s)", path, reason)
                n_batches += 1
                bar.update((batch.images.shape[0] + len(batch.bad)) if is_dataset else 1)
                if state_file.path is not None and n_batches % checkpoint_every == 0:
                    state_file.try_save(snapshot())   # (the snapshot copies the state to the host: a device sync)
                if _after_batch is not None:
                    _after_batch(n_batches)
    except BaseException as err:
        keep_progress(state_file, snapshot() if done_items else None, n_images, err)
        raise
    finally:
        bar.close()
        for module, training in modes:
            module.training = training
    elapsed = time.perf_counter() - start
    final = snapshot() if keep_state and state_file.path is not None else None  # before the all-reduce

    n_images, bad, layout = _gather(reducer, n_images, bad, layout_seen[0] if layout_seen else None, world)
    if world > 1 and isinstance(source, ImageFolderDataset):
        bad = _in_folder_order(bad, source.paths)
    if n_images == 0:
        state_file.remove()  # every file was unreadable: nothing to resume
        raise DataError(f"no readable image in the data ({len(bad)} skipped"
                        + (f", e.g. {bad[0][0]}: {bad[0][1]}" if bad else "") + ")")
    run_meta = run_provenance(model, name) | {
        "dataset_root": dataset_root,
        "images_used": n_images,
        "images_skipped": len(bad),
        "skipped": [{"path": p, "reason": r} for p, r in bad],
        "resolution": list(layout.grid[i] * layout.patch_size[i] for i in range(2)) if layout else None,
        "grid": list(layout.grid) if layout else None,
        "n_patches": layout.n_patches if layout else None,
        "num_prefix_tokens": layout.num_prefix if layout else None,
        "has_cls": has_cls,
        "dtype": dtype_name(amp_dtype),
        "device": str(device),
        "world_size": world,
        "batch_size": batch_size if is_dataset else None,
        "limit": limit,
        "crop_pct": crop_pct,
        "seconds": round(elapsed + ((saved or {}).get("seconds", 0.0)), 3),
        "resumed": saved is not None,
        "fast_qk_blocks": len(tap.fast_blocks),
        "qk_kernel": (qk_route.name if qk_route and tap.fast_blocks else None),
        "qk_kernel_fallback": qk_route.fallback_reason if qk_route else None,
    } | (meta or {})
    if final is not None:
        state_file.save(final)
    else:
        state_file.remove()
    return Result(reducer.to_frame(name), run_meta)


@functools.lru_cache(maxsize=16)
def _patch_distances(grid: tuple[int, int], patch_size: tuple[int, int], device: str) -> torch.Tensor:
    """:func:`~attnflow.metrics.patch_distances`, one tensor per layout and device in this process (read
    only), so the kernel's per-tensor caches (grid geometry, padded copy) carry over from run to run."""
    return patch_distances(grid, patch_size, device)


def metrics_from_qk(q: torch.Tensor, k: torch.Tensor, scale: float, num_prefix: int, has_cls: bool,
                    distances: torch.Tensor) -> torch.Tensor:
    """Metrics ``[B, H, M]`` of the map ``softmax((q * scale) @ k^T)`` of a plain timm ``Attention`` block.

    The logits are computed with timm's own operations (so bf16 under autocast, as in its non-fused path);
    compiled, the softmax and every row reduction fuse into passes over the logits
    (:func:`~attnflow.metrics.attention_metrics_from_logits`).
    """
    return attention_metrics_from_logits((q * scale) @ k.transpose(-2, -1), num_prefix, has_cls, distances)


def _first_images(data: Iterable, limit: int) -> Iterator[ImageBatch]:
    """The first ``limit`` images of an iterable of batches (the last batch cut short)."""
    if limit <= 0:
        raise DataError(f"limit must be positive, got {limit}")
    left = limit
    for item in data:
        batch = _as_batch(item)
        n = batch.images.shape[0]
        if n > left:
            batch = ImageBatch(batch.images[:left], batch.labels[:left], batch.indices[:left], batch.bad)
        yield batch
        left -= batch.images.shape[0]
        if left <= 0:
            return


class _ImageCheck:
    """Checks a batch ``[B, C, H, W]`` against the model and moves it to the device in the model's dtype.

    Raises:
        InputShapeError: integer images (raw pixels), or channels that are not dimension 1.
    """

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        param = next(model.parameters(), None)
        self.device, self.dtype = device, (param.dtype if param is not None else torch.float32)
        convs = (m for m in patch_embedding(model).modules() if isinstance(m, nn.Conv2d))
        self.channels: int | None = next((conv.in_channels for conv in convs), None)
        mean = (getattr(model, "pretrained_cfg", None) or {}).get("mean")
        self.check_range = bool(mean) and any(m > 0 for m in mean or ())  # normalised images then go below 0
        self.mean_std = (mean, (getattr(model, "pretrained_cfg", None) or {}).get("std"))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        shape = tuple(images.shape)
        if not images.is_floating_point():
            raise InputShapeError(f"images are {str(images.dtype).replace('torch.', '')} {list(shape)} (raw pixels?): "
                                  "attention_stats needs float images normalised as the model expects, e.g. "
                                  "by attnflow.eval_transform(model)")
        if self.channels is not None and (images.dim() != 4 or shape[1] != self.channels):
            hint = " (channels last? use images.permute(0, 3, 1, 2))" if shape[-1] == self.channels else ""
            raise InputShapeError(f"images must be [B, {self.channels}, H, W] ({self.channels} channels); got "
                                  f"{list(shape)}{hint}")
        images = images.to(self.device, dtype=self.dtype, non_blocking=True)
        if self.check_range:
            self.check_range = False  # the first batch only: one device sync per run
            low, high = images.aminmax()
            if low >= 0:
                log.warning("the first batch has no negative value (range [%.3g, %.3g]): are the images normalised? "
                            "The model expects mean %s, std %s, e.g. by attnflow.eval_transform(model)",
                            float(low), float(high), *self.mean_std)
        return images


def _forward(model: nn.Module, images: torch.Tensor, patch_size: tuple[int, int]) -> None:
    h, w = images.shape[-2:]
    if h % patch_size[0] or w % patch_size[1]:
        raise InputShapeError(f"images of {h}x{w} px do not split into {patch_size[0]}x{patch_size[1]} patches; "
                              f"use an --img-size that is a multiple of {patch_size[0]}")
    try:
        model(images)
    except AssertionError as err:  # timm's PatchEmbed asserts the input size
        raise InputShapeError(f"images of shape {tuple(images.shape[1:])} do not fit the model: {err} "
                              "Build the model at the data's resolution (--img-size).") from err


def _num_heads(blocks: list[nn.Module]) -> int:
    heads = getattr(blocks[0].attn, "num_heads", None)
    if heads is None:
        raise AttnflowError(f"{type(blocks[0].attn).__name__} has no `num_heads`")
    return int(heads)


def _batches(data: Any, is_dataset: bool, rank: int, world: int, done: int, batch_size: int,
             num_workers: int | None, device: torch.device) -> tuple[Iterator[ImageBatch], int | None]:
    """The batches still to process, and the total count for the progress bar."""
    total: int | None
    if is_dataset:
        indices = list(range(rank, len(data), world))
        total = len(indices)
        workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
        loader = DataLoader(Subset(data, indices[done:]), batch_size=batch_size, shuffle=False,
                            num_workers=workers, collate_fn=collate_skip_bad, pin_memory=device.type == "cuda",
                            persistent_workers=False)
        return iter(loader), total
    total = len(data) if hasattr(data, "__len__") else None
    if world > 1 and not _sharded_loader(data):
        # every process iterates the same batches: each takes every world-th one, so each image counts once
        total = len(range(rank, total, world)) if total is not None else None
    else:
        rank, world = 0, 1

    def gen() -> Iterator[ImageBatch]:
        for i, item in enumerate(data):
            if i % world == rank and i // world >= done:
                yield _as_batch(item)
    return gen(), total


def _distributed_sampler(data: Any) -> Any:
    """The ``DistributedSampler`` of a DataLoader that gives each process its own shard, else ``None``."""
    from torch.utils.data.distributed import DistributedSampler

    sampler = getattr(getattr(data, "batch_sampler", None), "sampler", getattr(data, "sampler", None))
    return sampler if isinstance(data, DataLoader) and isinstance(sampler, DistributedSampler) else None


def _sharded_loader(data: Any) -> bool:
    """Whether ``data`` is a DataLoader with a ``DistributedSampler``; warns when its padding repeats images."""
    sampler = _distributed_sampler(data)
    if sampler is None:
        return False
    repeated = sampler.total_size - len(sampler.dataset)
    if repeated > 0:
        log.warning("the DataLoader's DistributedSampler repeats %d image(s) to even out the shards, and they are "
                    "counted twice: pass its Dataset instead (sharded without repeats)", repeated)
    return True


def _gather(reducer: StatsReducer, n_images: int, bad: list[tuple[str, str]], layout: TokenLayout | None,
            world: int) -> tuple[int, list[tuple[str, str]], TokenLayout | None]:
    """Sum the reducer and image counts over processes; collect every process's skipped files, and the token
    layout of any process that read an image (this one's shard may hold only unreadable files)."""
    if world == 1:
        return n_images, bad, layout
    import torch.distributed as dist

    reducer.all_reduce()
    count = torch.tensor([n_images], dtype=torch.int64, device=reducer.sum.device)
    dist.all_reduce(count)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (bad, layout))
    layouts = [part_layout for _, part_layout in gathered if part_layout is not None]
    return int(count.item()), [b for part, _ in gathered for b in part], layout or next(iter(layouts), None)


def _in_folder_order(bad: list[tuple[str, str]], paths: list[Path]) -> list[tuple[str, str]]:
    """Skipped files in the folder's order (as one process lists them), not grouped by process."""
    position = {str(path): i for i, path in enumerate(paths)}
    return sorted(bad, key=lambda item: position.get(item[0], len(position)))
