"""Image-side helpers of the probe: the training transform, per-sample seeded augmentation, loaders.

Augmentation randomness is seeded per ``(seed, salt, index)`` inside ``__getitem__`` (salt = epoch or view),
so the crops an image gets do not depend on the number of DataLoader workers, the batch it lands in or
whether the run was interrupted and resumed.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

import timm.data
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from ..data.images import collate_skip_bad
from ..limits import check_img_size


def train_transform(model: torch.nn.Module, img_size: int = 224, scale: tuple[float, float] = (0.08, 1.0)
                    ) -> Callable:
    """MAE linear-probe augmentation: RandomResizedCrop(bicubic) + horizontal flip + the model's mean/std.

    (MAE uses a TF-style RandomResizedCrop without torchvision's 10-try loop; the crop distribution is the
    same up to that fallback.) The bound of every transform attnflow builds (a resize to at most
    :data:`attnflow.limits.MAX_RESIZE_FACTOR` times the input's pixels) holds here by construction: the crop is
    resized straight to ``img_size x img_size``, so no image is refused for its shape (the eval transform of
    the validation images may refuse one of an extreme aspect ratio).

    Raises:
        OptionError: an ``img_size`` outside :func:`attnflow.limits.check_img_size`.
    """
    check_img_size(img_size)
    config = timm.data.resolve_data_config({"input_size": (3, img_size, img_size)}, model=model)
    return T.Compose([
        T.RandomResizedCrop(img_size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean=config["mean"], std=config["std"]),
    ])


def sample_seed(seed: int, salt: int, index: int) -> int:
    """The augmentation seed of one sample."""
    return (seed * 1_000_003 + salt * 7_919 + index * 104_729 + 1) % (2**63 - 1)


class SeededDataset(Dataset):
    """Wraps a dataset so that each item's random transform is seeded by ``(seed, salt, index)``."""

    def __init__(self, dataset: Dataset, seed: int, salt: int) -> None:
        self.dataset, self.seed, self.salt = dataset, seed, salt

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        s = sample_seed(self.seed, self.salt, index)
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
            torch.manual_seed(s)
            random.seed(s)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """Labels ``[n]`` of a labelled dataset without loading images (``targets`` or ``labels``)."""
    labels = getattr(dataset, "targets", None)
    if labels is None:
        labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = [dataset[i][1] for i in range(len(dataset))]  # type: ignore[arg-type]
    return torch.as_tensor(list(labels), dtype=torch.int64)


def image_loader(dataset: Dataset, batches: Sequence[Sequence[int]], num_workers: int,
                 pin_memory: bool = False) -> DataLoader:
    """A loader yielding :class:`attnflow.data.ImageBatch` for the given index batches, in order.

    It starts at most one worker per batch, and none for a single batch (a worker could not overlap anything
    there, and starting it costs more than reading a small folder's epoch); the images and their seeded crops
    do not depend on the number of workers.
    """
    workers = 0 if len(batches) <= 1 else min(num_workers, len(batches))
    return DataLoader(dataset, batch_sampler=[list(map(int, b)) for b in batches], num_workers=workers,
                      collate_fn=collate_skip_bad, pin_memory=pin_memory)
