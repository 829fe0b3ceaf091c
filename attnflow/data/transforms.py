"""Per-model evaluation transforms, resolved from the model's own timm pretrained config.

A transformers or open_clip model is first wrapped in its :class:`~attnflow.models.adapter.ModelAdapter`, whose
``pretrained_cfg`` holds that model's own normalisation (its preprocessor configuration, its pretrained tag's).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

import timm.data
import torch
import torch.nn as nn

from ..models.adapter import adapt_model


def eval_transform(model: nn.Module, img_size: int = 224, crop_pct: float | None = None) -> Callable:
    """The model's eval transform (resize + center crop to ``img_size``, its own mean/std and interpolation).

    Args:
        model: a timm model (its ``pretrained_cfg`` gives mean, std, interpolation and crop_pct).
        img_size: side of the square crop fed to the model.
        crop_pct: override of the model's crop fraction (resize side = ``img_size / crop_pct``).

    Returns:
        A callable PIL image -> ``[3, img_size, img_size]`` float tensor.
    """
    args: dict = {"input_size": (3, img_size, img_size)}
    if crop_pct is not None:
        args["crop_pct"] = crop_pct
    config = timm.data.resolve_data_config(args, model=adapt_model(model))
    return timm.data.create_transform(**config, is_training=False)


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
