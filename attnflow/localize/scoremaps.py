"""Score maps for localization: the [cls] attention map, the attention-rollout map and a Selective Aggregation
head's map, resized to the evaluation size and quantised as wsolevaluation does.

wsolevaluation's ``CAMComputer`` resizes each score map to the input size with ``cv2.resize(...,
INTER_CUBIC)``, min-max normalises it (a constant map or one with a NaN becomes all zeros) and its
``BoxEvaluator`` thresholds ``(map * 255).astype(np.uint8)``. Here the same steps run batched in torch on the
model's device, with one host copy per batch:

* resizing is ``F.interpolate(mode="bicubic", align_corners=False)``: the same cubic convolution kernel as
  OpenCV's ``INTER_CUBIC`` (``a = -0.75``, half-pixel centres, replicated border). Checked against OpenCV 4.10
  on 14x14 -> 224x224 maps: relative difference < 3e-6, after quantisation 1 pixel in ~70,000 is one grey
  level apart (float rounding), which moves a box only when that pixel sits exactly at a threshold;
* normalisation and quantisation are the same float32 operations (``x -= min``, ``x /= max``,
  ``uint8(x * 255)``, truncating).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CLS_SOURCE = "cls_mean"
"""Source name of the [cls] attention map (the last block's [cls] row, mean over heads, over the patches)."""

ROLLOUT_SOURCE = "rollout"
"""Source name of the attention-rollout map (every block, :mod:`attnflow.aggregation.rollout`); scored only when
asked."""

HEAD_SOURCE_PREFIX = "head:"
"""Source names of trained heads' maps: ``head:<spec>`` (e.g. ``head:abmilp``)."""

SOURCE_LABELS: dict[str, str] = {CLS_SOURCE: "[cls] attention map", ROLLOUT_SOURCE: "Attention rollout map"}
"""The paper's Table 7 column names (the rollout map is not in the paper); every ``head:`` source is a "Selective
Aggregation map"."""


def source_label(source: str) -> str:
    """Table 7's name of a source (``"[cls] attention map"``, ``"Selective Aggregation map"``,
    ``"Attention rollout map"``)."""
    if source.startswith(HEAD_SOURCE_PREFIX):
        return "Selective Aggregation map"
    return SOURCE_LABELS.get(source, source)


def upsample_scoremaps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resizing as OpenCV's ``INTER_CUBIC`` (float32).

    Shape:
        ``[B, h, w] -> [B, H, W]`` for ``size = (H, W)``.
    """
    return F.interpolate(maps.float()[:, None], size=tuple(size), mode="bicubic", align_corners=False)[:, 0]


def normalize_scoremaps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each map to ``[0, 1]`` (wsolevaluation's ``normalize_scoremap``): a map that is
    constant or holds a NaN becomes all zeros.

    Shape:
        ``[B, H, W] -> [B, H, W]`` float32.
    """
    x = maps.float().clone()
    flat = x.flatten(1)
    bad = flat.isnan().any(dim=1)
    low = flat.nan_to_num(nan=0.0).amin(dim=1)
    high = flat.nan_to_num(nan=0.0).amax(dim=1)
    bad |= low == high
    x -= low.view(-1, 1, 1)
    x /= torch.where(bad, torch.ones_like(high), high - low).view(-1, 1, 1)
    return torch.where(bad.view(-1, 1, 1), torch.zeros_like(x), x)


def quantize_scoremaps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Patch-grid maps -> the uint8 score maps wsolevaluation thresholds: resize, normalise, ``uint8(x * 255)``.

    Shape:
        ``[B, gh, gw] -> [B, H, W]`` uint8 on the input's device.
    """
    return (normalize_scoremaps(upsample_scoremaps(maps, size)) * 255).to(torch.uint8)
