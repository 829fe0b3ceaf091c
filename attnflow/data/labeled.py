"""A dataset over an explicit list of ``(path, label)`` pairs that skips unreadable images.

The ImageNet, ImageNet-subset and CUB datasets are built on it. Items follow the contract of
:class:`attnflow.data.images.ImageFolderDataset`: ``(image, label, index)`` or a :class:`BadImage`, so
:func:`attnflow.data.images.collate_skip_bad` batches all of them alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from .images import BadImage, DataError, evenly_spaced, read_sample


class LabeledImageList(Dataset):
    """Images at given paths with given integer labels.

    Args:
        paths: image files.
        labels: one class index per path (``0 <= label < len(classes)``).
        classes: class identifiers in label order (wnids, CUB class folders).
        transform: PIL image -> ``[3, H, W]`` tensor; ``None`` returns the PIL image.
        limit: keep ``limit`` evenly spaced items (a deterministic subset covering every class) or all.
        root: the dataset folder, for messages and provenance.

    Attributes:
        keep: positions in the given ``paths`` of the items kept (all of them without ``limit``).

    ``dataset[i]`` is ``(image [3, H, W], label, i)``, or a :class:`BadImage` for an empty or unreadable file.
    """

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], classes: Sequence[str],
                 transform: Callable | None = None, limit: int | None = None, root: str | Path = "") -> None:
        if len(paths) != len(labels):
            raise DataError(f"{root}: {len(paths)} paths but {len(labels)} labels")
        if not paths:
            raise DataError(f"{root}: the dataset has no images")
        keep = evenly_spaced(len(paths), limit)
        self.keep: list[int] = keep
        self.root = Path(root)
        self.n_found = len(paths)
        self.paths: list[Path] = [Path(paths[i]) for i in keep]
        self.labels: list[int] = [int(labels[i]) for i in keep]
        self.classes: list[str] = list(classes)
        self.class_to_idx: dict[str, int] = {c: i for i, c in enumerate(self.classes)}
        self.transform = transform

    @property
    def targets(self) -> list[int]:
        """Labels in item order (the torchvision ``ImageFolder`` name)."""
        return self.labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int] | BadImage:
        return read_sample(self.paths[i], self.labels[i], i, self.transform)
