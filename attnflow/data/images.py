"""Image folders as datasets that skip (and count) corrupt files instead of crashing a long run.

Supports any folder of images, searched recursively: ImageFolder-style class folders
(``root/<class>/<img>``) and flat folders such as ImageNet-val's ``ILSVRC2012_val_00000001.JPEG``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import AttnflowError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}
)


class DataError(AttnflowError, ValueError):
    """A dataset path that cannot be used (empty folder, not an image, ...); the message is one clear line."""


@dataclass(frozen=True)
class BadImage:
    """Placeholder a dataset returns for an unreadable file; the collate function drops and records it."""

    path: str
    reason: str


@dataclass
class ImageBatch:
    """One collated batch.

    Attributes:
        images: ``[B, 3, H, W]`` float tensor, already normalised.
        labels: ``[B]`` int64 class indices (-1 when the folder has no classes).
        indices: ``[B]`` int64 dataset indices of the images.
        bad: ``(path, reason)`` for each file of this batch that was skipped.
    """

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    bad: list[tuple[str, str]]


def is_image_file(path: Path) -> bool:
    """Whether ``path`` has an image extension (case-insensitive)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def find_images(root: str | Path) -> list[Path]:
    """All image files under ``root`` (recursive), sorted by path.

    Raises:
        DataError: if ``root`` does not exist, is a non-image file, or holds no image.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such file or folder")
    if root.is_file():
        if not is_image_file(root):
            raise DataError(f"{root}: not an image file or a folder of images "
                            f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
        return [root]
    paths = sorted(p for p in root.rglob("*") if p.is_file() and is_image_file(p))
    if not paths:
        raise DataError(f"{root}: the folder holds no image files "
                        f"(searched recursively for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return paths


def evenly_spaced(n_total: int, limit: int | None) -> list[int]:
    """``limit`` indices spread evenly over ``range(n_total)``: a deterministic subset that covers every class.

    Returns all indices when ``limit`` is ``None`` or not smaller than ``n_total``.
    """
    if limit is None or limit >= n_total:
        return list(range(n_total))
    if limit <= 0:
        raise DataError(f"--limit must be positive, got {limit}")
    return np.unique(np.linspace(0, n_total - 1, limit).round().astype(np.int64)).tolist()


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image fully (so truncated files fail here) and convert it to RGB."""
    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


class ImageFolderDataset(Dataset):
    """Images under a folder, with class labels when the folder has class sub-folders.

    Args:
        root: folder (searched recursively) or a single image file.
        transform: PIL image -> ``[3, H, W]`` tensor (e.g. :func:`attnflow.data.eval_transform`).
        limit: keep ``limit`` evenly spaced images (deterministic subset) or all when ``None``.

    ``dataset[i]`` is ``(image [3, H, W], label, i)``, or a :class:`BadImage` for an unreadable file.
    """

    def __init__(self, root: str | Path, transform: Callable | None = None, limit: int | None = None) -> None:
        self.root = Path(root)
        paths = find_images(self.root)
        self.n_found = len(paths)
        self.paths: list[Path] = [paths[i] for i in evenly_spaced(len(paths), limit)]
        base = self.root if self.root.is_dir() else self.root.parent
        class_dirs = sorted({p.parent.relative_to(base).parts[0] for p in self.paths if p.parent != base})
        self.classes: list[str] = class_dirs
        index = {c: i for i, c in enumerate(class_dirs)}
        self.labels: list[int] = [
            index[p.parent.relative_to(base).parts[0]] if p.parent != base else -1 for p in self.paths
        ]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int] | BadImage:
        return read_sample(self.paths[i], self.labels[i], i, self.transform)


def read_sample(path: Path, label: int, index: int,
                transform: Callable | None) -> tuple[torch.Tensor, int, int] | BadImage:
    """``(transform(image), label, index)``, or a :class:`BadImage` for an empty or undecodable file."""
    try:
        if path.stat().st_size == 0:
            return BadImage(str(path), "empty file")
        img = load_rgb(path)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        return BadImage(str(path), f"unreadable image: {err}")
    return (transform(img) if transform is not None else img), label, index


def collate_skip_bad(samples: Sequence[Any]) -> ImageBatch:
    """Collate dataset items into an :class:`ImageBatch`, dropping :class:`BadImage` entries into ``batch.bad``.

    Items may be ``(image, label, index)``, ``(image, label)`` or a bare image tensor (missing labels and
    indices become -1), so any map-style dataset works. A batch may end up with zero images (every file
    bad): ``images`` is then an empty ``[0]`` tensor.
    """
    good: list[tuple[torch.Tensor, int, int]] = []
    bad: list[tuple[str, str]] = []
    for s in samples:
        if isinstance(s, BadImage):
            bad.append((s.path, s.reason))
        elif isinstance(s, torch.Tensor):
            good.append((s, -1, -1))
        else:
            good.append((s[0], int(s[1]) if len(s) > 1 else -1, int(s[2]) if len(s) > 2 else -1))
    if not good:
        empty = torch.empty(0, dtype=torch.int64)
        return ImageBatch(torch.empty(0), empty, empty.clone(), bad)
    return ImageBatch(torch.stack([g[0] for g in good]), torch.tensor([g[1] for g in good], dtype=torch.int64),
                      torch.tensor([g[2] for g in good], dtype=torch.int64), bad)
