"""Per-model evaluation transforms, resolved from the model's own timm pretrained config."""

from __future__ import annotations

from typing import Callable

import timm.data
import torch.nn as nn


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
    config = timm.data.resolve_data_config(args, model=model)
    return timm.data.create_transform(**config, is_training=False)
