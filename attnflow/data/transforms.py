"""Per-model evaluation transforms, resolved from the model's own timm pretrained config, and the bound on the
size an image is resized to (:class:`BoundedResize`).

A transformers or open_clip model is first wrapped in its :class:`~attnflow.models.adapter.ModelAdapter`, whose
``pretrained_cfg`` holds that model's own normalisation (its preprocessor configuration, its pretrained tag's).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

import timm.data
import torch
import torch.nn as nn
from torchvision import transforms as T

from ..limits import MAX_RESIZE_FACTOR, check_crop_pct, check_img_size
from .images import ImageSizeError


def resized_size(size: int | Sequence[int], width: int, height: int, max_size: int | None = None) -> tuple[int, int]:
    """``(width, height)`` of an image of ``width x height`` after ``torchvision.transforms.Resize(size,
    max_size=max_size)``: one number is the shorter side (the aspect ratio kept), two are ``(height, width)``."""
    sides = [size] if isinstance(size, int) else list(size)
    if len(sides) == 2:
        return int(sides[1]), int(sides[0])
    short, long = sorted((width, height))
    new_short, new_long = int(sides[0]), int(sides[0] * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_short, new_long) if width <= height else (new_long, new_short)


class BoundedResize(T.Resize):
    """``torchvision.transforms.Resize`` that first refuses an image it would resize to more than
    :data:`attnflow.limits.MAX_RESIZE_FACTOR` times the pixels of the ``crop`` that follows it.

    An image of an extreme aspect ratio (a 1 x 100,000 px strip holds only 100k pixels, far under PIL's
    decompression-bomb limit) resized to 248 px on its shorter side would need ~6 G pixels (18 GB): it raises
    :class:`~attnflow.data.images.ImageSizeError` instead, before allocating anything, and the datasets skip and
    count it like a corrupt file. Images of ordinary shapes are resized exactly as by ``Resize``.

    Args:
        size, interpolation, max_size, antialias: as ``Resize``.
        crop: ``(height, width)`` of the model's input cut from the resized image.
    """

    def __init__(self, size: Any, crop: tuple[int, int], interpolation: Any = T.InterpolationMode.BILINEAR,
                 max_size: int | None = None, antialias: bool | None = True) -> None:
        super().__init__(size, interpolation=interpolation, max_size=max_size, antialias=antialias)
        self.crop = (int(crop[0]), int(crop[1]))

    @property
    def max_pixels(self) -> int:
        """The most pixels a resized image may hold."""
        return MAX_RESIZE_FACTOR * self.crop[0] * self.crop[1]

    def check(self, width: int, height: int) -> None:
        """Refuse an image of ``width x height`` whose resize would exceed :attr:`max_pixels`.

        Raises:
            ImageSizeError: naming both sizes and the limit.
        """
        new_w, new_h = resized_size(self.size, width, height, self.max_size)
        if new_w * new_h > self.max_pixels:
            raise ImageSizeError(
                f"extreme aspect ratio: {width}x{height} px would be resized to {new_w}x{new_h} before the "
                f"{self.crop[1]}x{self.crop[0]} crop, over {MAX_RESIZE_FACTOR}x its pixels (attnflow.limits)")

    def forward(self, img: Any) -> Any:
        from torchvision.transforms.functional import get_image_size

        self.check(*get_image_size(img))
        return super().forward(img)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, crop={self.crop}, max_factor={MAX_RESIZE_FACTOR})"


def bound_resizes(transform: Any, crop: tuple[int, int]) -> Any:
    """``transform`` with each ``Resize`` step of its ``Compose`` replaced by a :class:`BoundedResize` of the same
    settings (what every transform attnflow builds does; a transform without one is returned as is)."""
    steps = getattr(transform, "transforms", None)
    if steps is None:
        return transform
    for i, step in enumerate(steps):
        if type(step) is T.Resize:
            steps[i] = BoundedResize(step.size, crop, interpolation=step.interpolation, max_size=step.max_size,
                                     antialias=step.antialias)
    return transform

from ..models.adapter import adapt_model


def eval_transform(model: nn.Module, img_size: int = 224, crop_pct: float | None = None) -> Callable:
    """The model's eval transform (resize + center crop to ``img_size``, its own mean/std and interpolation).

    An image whose resize would hold more than :data:`attnflow.limits.MAX_RESIZE_FACTOR` times the crop's pixels
    (an extreme aspect ratio) raises :class:`~attnflow.data.images.ImageSizeError` before it is resized (see
    :class:`BoundedResize`); the datasets skip and count it.

    Args:
        model: a timm model (its ``pretrained_cfg`` gives mean, std, interpolation and crop_pct).
        img_size: side of the square crop fed to the model (:func:`attnflow.limits.check_img_size`).
        crop_pct: override of the model's crop fraction (resize side = ``img_size / crop_pct``; see
            :func:`attnflow.limits.check_crop_pct`).

    Returns:
        A callable PIL image -> ``[3, img_size, img_size]`` float tensor.

    Raises:
        OptionError: ``img_size`` or ``crop_pct`` outside their limits.
    """
    check_img_size(img_size)
    check_crop_pct(crop_pct)
    args: dict = {"input_size": (3, img_size, img_size)}
    if crop_pct is not None:
        args["crop_pct"] = crop_pct
    config = timm.data.resolve_data_config(args, model=adapt_model(model))
    return bound_resizes(timm.data.create_transform(**config, is_training=False), (img_size, img_size))


def eval_resize(img_size: int = 224, crop_pct: float = 0.875) -> BoundedResize:
    """The resize step of :func:`eval_transform` at ``img_size`` / ``crop_pct`` (center-crop mode), whose
    :meth:`BoundedResize.check` tells, before any model is loaded, whether an image would be skipped."""
    check_img_size(img_size)
    check_crop_pct(crop_pct, allow_none=False)
    return BoundedResize(int(img_size / crop_pct), (img_size, img_size))


def normalization(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input ``(mean, std)`` a timm model expects (its pretrained config)."""
    config = timm.data.resolve_data_config({}, model=adapt_model(model))
    return tuple(float(v) for v in config["mean"]), tuple(float(v) for v in config["std"])


def renormalize(images: torch.Tensor, source: tuple[Sequence[float], Sequence[float]],
                target: tuple[Sequence[float], Sequence[float]]) -> torch.Tensor:
    """Images normalised with ``source = (mean, std)`` re-expressed with ``target``'s: same pixels, another
    normalisation (``(x * std_s + mean_s - mean_t) / std_t``).

    Shape:
        ``[B, 3, H, W] -> [B, 3, H, W]``.
    """
    def col(values: Sequence[float]) -> torch.Tensor:
        return torch.as_tensor(values, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)

    (m_s, s_s), (m_t, s_t) = source, target
    return (images * col(s_s) + col(m_s) - col(m_t)) / col(s_t)


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> list[np.ndarray]:
    """Undo input normalisation: ``[B, 3, H, W]`` tensors -> ``B`` uint8 ``[H, W, 3]`` arrays for display."""
    m = torch.as_tensor(mean, dtype=images.dtype).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype).view(1, 3, 1, 1)
    x = (images.detach().cpu() * s + m).clamp(0, 1).permute(0, 2, 3, 1)
    return [(img.numpy() * 255).round().astype(np.uint8) for img in x]
