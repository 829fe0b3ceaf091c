"""Where a dataset loop's images come from, and how one process of a torchrun run takes its share.

An :class:`ImageSource` is either a map-style dataset (a folder, a ``Dataset``, a ``Subset`` of one) or an
iterable of batches (a ``DataLoader``, a list or generator of tensors, one big tensor split into batches):

* a dataset is sharded by position: process ``rank`` of ``world`` reads positions ``rank, rank + world, ...``,
  and its progress is counted in positions (images read or skipped), so a resumed run starts at the next one;
* an iterable is sharded by batch: every process iterates it in full and takes every ``world``-th batch (a
  ``DataLoader`` with a ``DistributedSampler`` already gives each process its own shard and is used as it is);
  its progress is counted in batches.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from .images import DataError, ImageBatch, ImageFolderDataset, collate_skip_bad, evenly_spaced

log = logging.getLogger(__name__)


@dataclass
class ImageSource:
    """The images of one run.

    Attributes:
        dataset: a map-style dataset of ``(image, label, index[, (width, height)])`` items or
            :class:`~attnflow.data.BadImage` (``None`` for an iterable of batches).
        batches: an iterable of batches (``None`` for a dataset).
        paths: the image files in dataset order, when known (they fingerprint a resumable run and order the
            skipped files).
        root: the folder the paths are relative to.
    """

    dataset: Dataset | None = None
    batches: Iterable | None = None
    paths: list[Path] | None = None
    root: Path | None = None

    @property
    def is_dataset(self) -> bool:
        return self.dataset is not None

    def __len__(self) -> int:
        """Positions of a dataset, batches of a sized iterable (0 when unknown)."""
        if self.dataset is not None:
            return len(self.dataset)  # type: ignore[arg-type]
        return len(self.batches) if hasattr(self.batches, "__len__") else 0  # type: ignore[arg-type]

    def shard(self, rank: int, world: int, done: int, batch_size: int, workers: int, pin_memory: bool,
              timeout: float = 0.0) -> tuple[Iterator[ImageBatch], int | None]:
        """This process's batches still to read after ``done`` items of its shard, and the shard's size in
        items (positions of a dataset, batches of an iterable; ``None`` when unknown).

        A dataset's DataLoader workers ignore Ctrl-C and SIGTERM (a terminal or a cluster signals the whole
        process group): the main process alone handles them, saves its state and shuts the workers down. With
        workers, ``timeout`` seconds without a batch stop the loader (a hung worker would wait forever).
        """
        if self.dataset is not None:
            positions = list(range(rank, len(self.dataset), world))  # type: ignore[arg-type]
            todo = positions[done:]
            workers = min(workers, -(-len(todo) // batch_size))  # no idle worker processes for a short rest
            loader = DataLoader(Subset(self.dataset, todo), batch_size=batch_size, shuffle=False,
                                num_workers=workers, collate_fn=collate_skip_bad, pin_memory=pin_memory,
                                worker_init_fn=ignore_interrupts if workers else None,
                                timeout=timeout if workers else 0.0)
            with _interrupts_blocked():  # the workers start (fork) with Ctrl-C and SIGTERM held until they ignore them
                batches = iter(loader)
            return batches, len(positions)
        assert self.batches is not None
        total = len(self.batches) if hasattr(self.batches, "__len__") else None  # type: ignore[arg-type]
        if world > 1 and not _sharded_loader(self.batches):
            total = len(range(rank, total, world)) if total is not None else None
        else:
            rank, world = 0, 1
        data = self.batches

        def take() -> Iterator[ImageBatch]:
            for i, item in enumerate(data):
                if i % world == rank and i // world >= done:
                    yield as_batch(item)
        return take(), total

    def items_in(self, batch: ImageBatch) -> int:
        """How far one batch moves the run: its positions (images and skipped files), or one batch."""
        return len(batch.images) + len(batch.bad) if self.dataset is not None else 1

    def on_device(self, batch: ImageBatch, device: torch.device) -> ImageBatch:
        """``batch`` as the analyses take it: a dataset whose transform hands over uint8 images
        (:class:`~attnflow.data.decode.TensorTransform`, ``decode="fast"`` or ``"gpu"``) has them converted and
        normalised on ``device`` (copied there without blocking; JPEGs still encoded are decoded there); any other
        batch is returned as it is."""
        dataset = self.dataset.dataset if isinstance(self.dataset, Subset) else self.dataset
        convert = getattr(getattr(dataset, "transform", None), "on_device", None)
        if convert is None or not len(batch.images):
            return batch
        return convert(batch, device)

    def in_order(self, skipped: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Skipped files in dataset order (as one process lists them), not grouped by process."""
        if not self.paths:
            return skipped
        position = {str(path): i for i, path in enumerate(self.paths)}
        return sorted(skipped, key=lambda item: position.get(item[0], len(position)))


def image_source(data: Any, *, transform: Callable | None = None, limit: int | None = None,
                 batch_size: int = 64, decode: str = "pil", device: torch.device | str = "cpu") -> ImageSource:
    """The :class:`ImageSource` of ``data``.

    Args:
        data: a folder or image file (read with ``transform``), a map-style ``Dataset``, a ``DataLoader`` or any
            iterable of batches (tensors ``[B, 3, H, W]`` or ``[3, H, W]``, ``(images, labels)`` tuples, dicts with
            ``image``), or one tensor ``[B, 3, H, W]`` / ``[3, H, W]`` (split into ``batch_size`` batches).
        transform: PIL image -> tensor, for a folder.
        limit: ``limit`` evenly spaced images of a folder or dataset, or the first ``limit`` images of an
            iterable.
        batch_size: the batches of one tensor.
        decode: how a folder's files are decoded (:data:`attnflow.options.DECODES`): the one place where a
            folder's transform becomes the fast path's (:func:`attnflow.data.decode.fast_transform`).
        device: the run's device (``decode="gpu"`` needs CUDA).

    Raises:
        DataError: an empty folder, a non-image path, a ``limit`` below 1.
        AttnflowError: a ``limit`` with a DataLoader whose DistributedSampler shards the data.
        OptionError: an unknown ``decode``, or ``gpu`` without CUDA.
    """
    if limit is not None and limit < 1:
        raise DataError(f"limit must be positive, got {limit}")
    if isinstance(data, (str, Path)):
        if transform is not None:
            from .decode import fast_transform

            transform = fast_transform(transform, decode, device)
        folder = ImageFolderDataset(data, transform=transform, limit=limit)
        return ImageSource(dataset=folder, paths=folder.paths, root=folder.root)
    if isinstance(data, torch.Tensor):
        data = list((data.unsqueeze(0) if data.dim() == 3 else data).split(batch_size))
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__"):
        if limit is not None:
            data = Subset(data, evenly_spaced(len(data), limit))
        paths, root = getattr(data, "paths", None), getattr(data, "root", None)
        return ImageSource(dataset=data, paths=list(paths) if paths is not None else None,
                           root=Path(root) if root is not None else None)
    if limit is not None:
        if _distributed_sampler(data) is not None:
            raise DataError("limit does not apply to a DataLoader with a DistributedSampler (each process would "
                            "cut its own shard): pass its Dataset, or a torch Subset of it")
        data = _first_images(data, limit)
    return ImageSource(batches=data)


_INTERRUPTS = {signal.SIGINT, signal.SIGTERM}


def ignore_interrupts(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the worker ignores Ctrl-C and SIGTERM (its parent ends it), then lets them
    through (they were held since the fork: one sent meanwhile is dropped here)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _INTERRUPTS)


@contextlib.contextmanager
def _interrupts_blocked() -> Iterator[None]:
    """Ctrl-C and SIGTERM held (not lost) in this thread inside the block, delivered after it. A DataLoader's
    workers fork inside it, so none can die of a signal before :func:`ignore_interrupts` runs (torch's own worker
    SIGTERM handler would let it die, and the parent's watchdog would then raise)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _INTERRUPTS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def as_batch(item: Any) -> ImageBatch:
    """An element of a user's DataLoader or iterable as an :class:`ImageBatch`.

    Raises:
        DataError: an element that holds no image tensor.
    """
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


def _first_images(data: Iterable, limit: int) -> Iterator[ImageBatch]:
    """The first ``limit`` images of an iterable of batches (the last batch cut short)."""
    left = limit
    for item in data:
        batch = as_batch(item)
        if batch.images.shape[0] > left:
            batch = ImageBatch(batch.images[:left], batch.labels[:left], batch.indices[:left], batch.bad)
        yield batch
        left -= batch.images.shape[0]
        if left <= 0:
            return


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
