"""Image folders as datasets that skip (and count) corrupt files instead of crashing a long run.

Supports any folder of images, searched recursively: ImageFolder-style class folders
(``root/<class>/<img>``) and flat folders such as ImageNet-val's ``ILSVRC2012_val_00000001.JPEG``.

What counts as an image (:data:`IMAGE_EXTENSIONS`, GIFs by their first frame) and how it is decoded
(:func:`load_rgb`: 16-bit and float images scaled to 8 bits, EXIF orientation *not* applied) is decided here.
A file that cannot be used (empty, truncated, undecodable, over PIL's decompression-bomb limit, or of an aspect
ratio so extreme that its resize would exceed :data:`attnflow.limits.MAX_RESIZE_FACTOR` times the model's input)
is skipped and counted; a sub-folder that cannot be listed is an error (its images would vanish uncounted).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, cast, overload

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import AttnflowError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif"}
)
"""File extensions read as images (case-insensitive); a GIF is read as its first frame."""


class DataError(AttnflowError, ValueError):
    """A dataset path that cannot be used (empty folder, not an image, ...); the message is one clear line."""


class ImageSizeError(DataError):
    """An image whose resize would exceed :data:`attnflow.limits.MAX_RESIZE_FACTOR` times the pixels of the
    model's input (raised by :class:`attnflow.data.transforms.BoundedResize` before it allocates anything; the
    datasets turn it into a :class:`BadImage`, skipped and counted)."""


@dataclass(frozen=True)
class BadImage:
    """Placeholder a dataset returns for an unreadable file; the collate function drops and records it."""

    path: str
    reason: str


@dataclass
class ImageBatch:
    """One collated batch.

    Attributes:
        images: ``[B, 3, H, W]`` float tensor, already normalised; from a transform that hands the device uint8
            images (:class:`attnflow.data.decode.TensorTransform`) a uint8 batch, or an :class:`Encoded` list
            with ``decode="gpu"``, which the loop turns into the normalised floats on the device before any
            analysis sees the batch.
        labels: ``[B]`` int64 class indices (-1 when the folder has no classes).
        indices: ``[B]`` int64 dataset indices of the images.
        bad: ``(path, reason)`` for each file of this batch that was skipped.
        sizes: ``[B, 2]`` int64 ``(width, height)`` of each decoded image before its transform, when the dataset
            gives it (localization rescales boxes with it); else ``None``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    bad: list[tuple[str, str]]
    sizes: torch.Tensor | None = None

    def pin_memory(self) -> "ImageBatch":
        """The batch with its images in pinned memory (the DataLoader calls this with ``pin_memory=True``), so
        that the copy to a CUDA device can be non-blocking. Still-encoded JPEGs are left as they are."""
        if isinstance(self.images, Encoded) or not self.images.numel():
            return self
        return dataclasses.replace(self, images=self.images.pin_memory())


class Encoded(list):
    """A batch whose JPEGs are still encoded (``decode="gpu"``, decoded on the device): per image, an
    :class:`attnflow.data.decode.EncodedJpeg` or, for a file the device does not decode, the resized and cropped
    uint8 ``[3, H, W]`` image."""


def is_image_file(path: Path) -> bool:
    """Whether ``path`` has an image extension (case-insensitive)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def is_hidden(name: str) -> bool:
    """Whether a file or folder name is hidden (``.DS_Store``, macOS ``._photo.jpg``, ``.ipynb_checkpoints``)."""
    return name.startswith(".")


def _walk_images(root: Path) -> list[Path]:
    """Image files under the folder ``root``, following linked folders (each real folder once, so link cycles
    end) and keeping links to files even when their target is gone (they are then reported, not lost).
    Hidden files and folders are skipped.

    Raises:
        DataError: a folder that cannot be listed (its images would be left out without a count).
    """
    def unreadable(err: OSError) -> None:
        raise unreadable_folder(err, root)

    paths: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not is_hidden(d)]
        paths += [Path(dirpath, f) for f in filenames if not is_hidden(f) and is_image_file(Path(f))]
    return sorted(paths)


def unreadable_folder(err: OSError, root: str | Path) -> DataError:
    """The error for a folder under ``root`` that cannot be listed (refused: its images would vanish uncounted)."""
    return DataError(f"{err.filename}: cannot read the folder ({err.strerror or err}), so its images would be "
                     f"left out uncounted; make it readable, or move it out of {root}")


def find_images(root: str | Path) -> list[Path]:
    """All image files under ``root`` (recursive, through linked folders), sorted by path.

    Hidden files and folders (names starting with ``.``: macOS ``._*.jpg`` and ``.DS_Store``,
    ``.ipynb_checkpoints``) are skipped, as ``attnflow data verify`` does. Links whose target is missing are
    kept, so that reading them reports them as skipped.

    Raises:
        DataError: if ``root`` does not exist, is a non-image file, holds no image, or has a folder that cannot
            be listed (a permission error: refused rather than its images left out uncounted).
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such file or folder")
    if root.is_file():
        if not is_image_file(root):
            raise DataError(f"{root}: not an image file or a folder of images "
                            f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
        return [root]
    paths = _walk_images(root)
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
        raise DataError(f"limit must be positive, got {limit}")
    return np.unique(np.linspace(0, n_total - 1, limit).round().astype(np.int64)).tolist()


IMAGE_READ_ERRORS: tuple[type[Exception], ...] = (OSError, UnidentifiedImageError, SyntaxError, ValueError)
"""What PIL raises for an empty, truncated or undecodable file (a skipped image, not a failed run)."""


SIXTEEN_BIT_MODES: frozenset[str] = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
"""PIL modes of 16-bit grayscale images (PNG, TIFF), whose plain RGB conversion clips at 255."""


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image fully (so truncated files fail here) and convert it to RGB.

    * 16-bit grayscale images are scaled to 8 bits (``round(v / 257)``, 65535 -> 255) first: PIL's own
      conversion clips every value above 255 to white. Older Pillow versions open 16-bit PNGs in mode ``I``.
    * 32-bit float images (mode ``F``, e.g. a float32 TIFF) whose values all lie in ``[0, 1]`` are scaled to
      ``round(255 v)``: PIL's own conversion truncates them to 0 or 1, a black image. Float images with values
      beyond 1 (or below 0) are read as 0..255 values, rounded and clipped to that range (PIL clips too, but
      truncates); NaN or infinite pixels make the file unreadable (skipped and counted).
    * A GIF (or any multi-frame file) is read as its first frame.
    * The EXIF orientation tag is **not** applied: pixels are used as stored, as torchvision's ``ImageFolder`` and
      the paper's pipeline read them, so a photo a viewer shows upright may reach the model rotated.

    Raises:
        OSError, ValueError, ...: see :data:`IMAGE_READ_ERRORS`.
    """
    with Image.open(path) as img:
        img.load()
        if img.mode in SIXTEEN_BIT_MODES or (img.mode == "I" and img.format == "PNG"):
            gray = np.asarray(img).astype(np.float64) / 257.0
            return Image.fromarray(np.clip(gray.round(), 0, 255).astype(np.uint8)).convert("RGB")
        if img.mode == "F":
            return Image.fromarray(float_to_uint8(np.asarray(img))).convert("RGB")
        return img.convert("RGB")


def float_to_uint8(values: np.ndarray) -> np.ndarray:
    """8-bit pixels of a float image: ``round(255 v)`` when every value is in ``[0, 1]``, else the values taken as
    0..255 (rounded and clipped).

    Raises:
        ValueError: NaN or infinite pixels.
    """
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError("a float image with NaN or infinite pixels")
    if values.size and values.min() >= 0 and values.max() <= 1:
        values = values * 255.0
    return np.clip(values.round(), 0, 255).astype(np.uint8)


class ImageFolderDataset(Dataset):
    """Images under a folder, with class labels when the folder has class sub-folders.

    Args:
        root: folder (searched recursively) or a single image file.
        transform: PIL image -> ``[3, H, W]`` tensor (e.g. :func:`attnflow.data.eval_transform`).
        limit: keep ``limit`` evenly spaced images (deterministic subset) or all when ``None``.

    ``dataset[i]`` is ``(image [3, H, W], label, i)``, or a :class:`BadImage` for an unreadable file.
    ``classes`` are the first-level folders that hold images, over the whole folder (so a ``limit`` never
    renumbers them); images directly under ``root`` get label -1.
    """

    def __init__(self, root: str | Path, transform: Callable | None = None, limit: int | None = None) -> None:
        self.root = Path(root)
        paths = find_images(self.root)
        self.n_found = len(paths)
        base = self.root if self.root.is_dir() else self.root.parent
        folders = [p.parent.relative_to(base).parts[0] if p.parent != base else None for p in paths]
        self.classes: list[str] = sorted({f for f in folders if f is not None})
        index = {c: i for i, c in enumerate(self.classes)}
        labels = [-1 if folder is None else index[folder] for folder in folders]
        keep = evenly_spaced(len(paths), limit)
        self.paths: list[Path] = [paths[i] for i in keep]
        self.labels: list[int] = [labels[i] for i in keep]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int] | BadImage:
        return read_sample(self.paths[i], self.labels[i], i, self.transform)


@overload
def read_sample(path: Path, label: int, index: int, transform: None) -> tuple[Image.Image, int, int] | BadImage: ...


@overload
def read_sample(path: Path, label: int, index: int, transform: Callable | None,
                size: bool = False) -> tuple[Any, ...] | BadImage: ...


def read_sample(path: Path, label: int, index: int, transform: Callable | None,
                size: bool = False) -> tuple[Any, ...] | BadImage:
    """``(transform(image), label, index)``, or a :class:`BadImage` for an empty or undecodable file, or one the
    transform refuses to resize (:class:`ImageSizeError`: an extreme aspect ratio).

    Without a transform the first item is the RGB PIL image itself. A transform that reads files itself (its
    ``reads_files`` is true, :class:`attnflow.data.decode.TensorTransform`) is given the path; its errors are
    PIL's for the same file, so a file is skipped for the same reason on either path. With ``size``, the item
    ends with the image's ``(width, height)`` before the transform.
    """
    reads_files = bool(getattr(transform, "reads_files", False))
    try:
        problem = _unusable(path)
        if problem is not None:
            return BadImage(str(path), problem)
        if reads_files:  # decodes and transforms in one call
            image, (width, height) = transform.read(path)  # type: ignore[union-attr]
        else:
            img = load_rgb(path)
            image, (width, height) = img, img.size
    except ImageSizeError as err:  # before IMAGE_READ_ERRORS, which holds its base class ValueError
        return BadImage(str(path), str(err))
    except Image.DecompressionBombError as err:
        return BadImage(str(path), f"too large: {err} (raise PIL.Image.MAX_IMAGE_PIXELS to read it)")
    except IMAGE_READ_ERRORS as err:
        return BadImage(str(path), f"unreadable image: {err}")
    if transform is not None and not reads_files:
        try:
            image = transform(image)
        except ImageSizeError as err:
            return BadImage(str(path), str(err))
    return (image, label, index, (int(width), int(height))) if size else (image, label, index)


def _unusable(path: Path) -> str | None:
    """Why ``path`` cannot be read before decoding it (a broken link, an empty file), else ``None``.

    Raises:
        OSError: the file cannot be stat'ed.
    """
    if path.is_symlink() and not path.exists():
        return f"broken link: {os.readlink(path)} does not exist"
    if path.stat().st_size == 0:
        return "empty file"
    return None


def collate_skip_bad(samples: Sequence[Any]) -> ImageBatch:
    """Collate dataset items into an :class:`ImageBatch`, dropping :class:`BadImage` entries into ``batch.bad``.

    Items may be ``(image, label, index[, (width, height)])``, ``(image, label)`` or a bare image tensor (missing
    labels and indices become -1), so any map-style dataset works. A batch may end up with zero images (every
    file bad): ``images`` is then an empty ``[0]`` tensor. Items that are still-encoded JPEGs
    (:class:`attnflow.data.decode.EncodedJpeg`, ``decode="gpu"``) make the batch an :class:`Encoded` list.
    """
    good: list[tuple[torch.Tensor, int, int]] = []
    sizes: list[tuple[int, int]] = []
    bad: list[tuple[str, str]] = []
    for s in samples:
        if isinstance(s, BadImage):
            bad.append((s.path, s.reason))
        elif isinstance(s, torch.Tensor):
            good.append((s, -1, -1))
        else:
            good.append((s[0], int(s[1]) if len(s) > 1 else -1, int(s[2]) if len(s) > 2 else -1))
            if len(s) > 3:
                sizes.append((int(s[3][0]), int(s[3][1])))
    if not good:
        empty = torch.empty(0, dtype=torch.int64)
        return ImageBatch(torch.empty(0), empty, empty.clone(), bad)
    encoded = any(not isinstance(g[0], torch.Tensor) for g in good)  # JPEG bytes (decode="gpu"), for the device
    images = cast(torch.Tensor, Encoded(g[0] for g in good)) if encoded else torch.stack([g[0] for g in good])
    return ImageBatch(images, torch.tensor([g[1] for g in good], dtype=torch.int64),
                      torch.tensor([g[2] for g in good], dtype=torch.int64), bad,
                      torch.tensor(sizes, dtype=torch.int64).reshape(-1, 2) if sizes else None)


def load_images(root: str | Path, limit: int | None,
                check: Callable[[int, int], None] | None = None) -> tuple[list[Path], list[Image.Image]]:
    """Up to ``limit`` evenly spaced readable images under ``root`` as ``(paths, PIL images)``, in file order.

    Unreadable files are skipped with a warning, and the next readable files (in file order) take their
    place, so a corrupt file among the chosen ones does not shrink the figure. ``check(width, height)`` may
    refuse an image by raising :class:`ImageSizeError` (e.g. ``eval_resize(img_size, crop_pct).check``: an
    image the eval transform would refuse), which is skipped the same way."""
    paths = find_images(root)
    if limit is not None and limit <= 0:
        raise DataError(f"limit must be positive, got {limit}")
    chosen = evenly_spaced(len(paths), limit)
    spare = sorted(set(range(len(paths))) - set(chosen))
    wanted = len(chosen)
    found: dict[int, Image.Image] = {}
    for i in chosen + spare:
        if len(found) == wanted:
            break
        sample = read_sample(paths[i], -1, i, None)  # a BadImage for empty, broken, undecodable, too large
        if isinstance(sample, BadImage):
            log.warning("skipping %s: %s", paths[i], sample.reason)
            continue
        if check is not None:
            try:
                check(*sample[0].size)
            except ImageSizeError as err:
                log.warning("skipping %s: %s", paths[i], err)
                continue
        found[i] = sample[0]
    kept = [paths[i] for i in sorted(found)]
    images = [found[i] for i in sorted(found)]
    if not images:
        raise DataError(f"{root}: none of the selected images could be read")
    return kept, images
