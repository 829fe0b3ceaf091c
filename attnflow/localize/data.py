"""Images for localization: every image resized to a square (no crop, as wsolevaluation's test transform), its
original size kept for rescaling the ground-truth boxes, unreadable files skipped and counted."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..data.images import BadImage, ImageFolderDataset, evenly_spaced, read_sample
from ..reducers import Accumulator
from .boxes import BoxFileError, GroundTruth
from .metric import resize_boxes

log = logging.getLogger(__name__)


def resize_transform(model: nn.Module, img_size: int = 224, interpolation: str = "bilinear") -> Callable:
    """wsolevaluation's test transform with the model's own normalisation: resize the whole image to
    ``img_size x img_size`` (aspect ratio not kept, nothing cropped), to tensor, normalise with the model's
    mean/std. The resize is a :class:`~attnflow.data.transforms.BoundedResize`, as in every transform attnflow
    builds; to a fixed square it holds exactly the input's pixels, so no image is ever refused for its size.

    Returns:
        PIL image -> ``[3, img_size, img_size]`` float tensor.

    Raises:
        OptionError: an ``img_size`` outside :func:`attnflow.limits.check_img_size`.
    """
    from torchvision import transforms as T

    from ..data.transforms import BoundedResize, normalization
    from ..limits import check_img_size

    check_img_size(img_size)
    mean, std = normalization(model)
    mode = T.InterpolationMode(interpolation)
    return T.Compose([BoundedResize((img_size, img_size), (img_size, img_size), interpolation=mode), T.ToTensor(),
                      T.Normalize(mean, std)])


@dataclass(frozen=True)
class Matched:
    """Images of a folder matched to a ground-truth file.

    Attributes:
        paths: images with boxes (after ``limit``), in folder order.
        keys: their keys in the ground truth.
        without_boxes: images of the folder that have no box in the file.
        n_found: images found under the folder.
    """

    paths: list[Path]
    keys: list[str]
    without_boxes: list[Path]
    n_found: int


def match_images(root: str | Path, truth: GroundTruth, limit: int | None = None) -> Matched:
    """The images under ``root`` that have boxes in ``truth``, ``limit`` of them evenly spaced.

    Raises:
        BoxFileError: when no image of the folder has a box (the wrong file, or a key convention that does not
            match: the message shows an image name and a key of the file).
    """
    folder = ImageFolderDataset(root)
    base = folder.root if folder.root.is_dir() else folder.root.parent
    keys = [truth.key_for(p, base) for p in folder.paths]
    have = [i for i, k in enumerate(keys) if k is not None]
    missing = [p for p, k in zip(folder.paths, keys) if k is None]
    if not have:
        example = next(iter(truth.boxes))
        raise BoxFileError(f"none of the {folder.n_found} images under {root} has a box in {truth.path} (image "
                           f"{folder.paths[0].name!r}; the file names images like {example!r})")
    if missing:
        log.warning("%d of %d images have no box in %s and are not evaluated (first: %s)", len(missing),
                    folder.n_found, truth.path, missing[0].name)
    keep = [have[i] for i in evenly_spaced(len(have), limit)]
    return Matched([folder.paths[i] for i in keep], [keys[i] for i in keep], missing,  # type: ignore[misc]
                   folder.n_found)


class LocalizationImages(torch.utils.data.Dataset):
    """``dataset[i]`` is ``(image [3, S, S], -1, i, (width, height))`` or a :class:`BadImage`.

    Args:
        paths: image files.
        transform: PIL image -> tensor (:func:`resize_transform`), or its fast form
            (:class:`attnflow.data.decode.TensorTransform`, which reads the file itself and gives uint8 images).
    """

    def __init__(self, paths: Sequence[Path], transform: Callable) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int, tuple[int, int]] | BadImage:
        return read_sample(self.paths[i], -1, i, self.transform, size=True)


class SizeCheck(Accumulator):
    """Images whose decoded size differs from the size the box file states (their boxes are scaled by the file's
    size, as wsolevaluation does: right for images resized before the run, wrong for cropped ones).

    Attributes:
        differ: images whose size differs.
        aspect: of those, images whose aspect ratio differs too (cropped images?).
        first: the first such image's name (one per process after an all-reduce).
    """

    def __init__(self) -> None:
        super().__init__()
        self.differ: torch.Tensor
        self.aspect: torch.Tensor
        self.first: list[str]
        self.add_state("differ", torch.zeros((), dtype=torch.int64))
        self.add_state("aspect", torch.zeros((), dtype=torch.int64))
        self.add_state("first", [], "cat")

    def add(self, name: str, aspect: bool) -> None:
        """Count one image whose size differs (``aspect``: its aspect ratio too)."""
        self.differ += 1
        self.aspect += int(aspect)
        if not self.first:
            self.first.append(name)


def gt_boxes(truth: GroundTruth, key: str, image_size: tuple[int, int], size: tuple[int, int],
             check: SizeCheck | None = None, name: str = "") -> np.ndarray:
    """An image's ground-truth boxes in the coordinates of the ``size = (W, H)`` model input.

    The coordinates are scaled by the size the box file states for the image when it states one (as
    wsolevaluation scales by ``image_sizes.txt``), else by the decoded ``image_size = (w, h)``.
    """
    stated = truth.size_of(key)
    if stated is not None and check is not None and tuple(stated) != tuple(image_size):
        check.add(name, abs(stated[0] / stated[1] - image_size[0] / image_size[1]) > 0.01 * stated[0] / stated[1])
    return resize_boxes(truth.boxes[key], stated or image_size, size)
