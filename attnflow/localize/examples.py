"""Example images for the Fig. 8-style figure: each source's box at its best score-map threshold."""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np
import torch

from ..data.images import BadImage, collate_skip_bad, evenly_spaced
from .boxes import GroundTruth
from .contours import threshold_boxes
from .metric import BoxAccuracy, box_iou
from .result import Example
from .scoremaps import quantize_scoremaps

log = logging.getLogger(__name__)


def best_cut(acc: BoxAccuracy, iou: int = 50) -> float:
    """The score-map threshold of the highest BoxAcc at IoU ``iou`` (the middle IoU threshold when absent);
    the first one on ties."""
    d = acc.iou_thresholds.index(iou) if iou in acc.iou_thresholds else len(acc.iou_thresholds) // 2
    return float(acc.thresholds[int(np.argmax(acc.hits[d]))])


def credited_box(scoremap: np.ndarray, gt: np.ndarray, cut: float, *, holes: bool = True) -> tuple[np.ndarray, float]:
    """The box the metric credits at threshold fraction ``cut``: of every contour's box of
    ``scoremap > int(cut * max)``, the one with the highest IoU with a ground-truth box.

    Returns:
        ``([4] box, its IoU)``.
    """
    level = int(np.float64(cut) * scoremap.max())
    boxes = threshold_boxes(scoremap, np.array([level]), holes=holes)[0]
    ious = box_iou(boxes, gt).max(axis=1)
    best = int(np.argmax(ious))
    return boxes[best], float(ious[best])


def collect_examples(capture: Callable[[torch.Tensor], dict[str, torch.Tensor]], dataset: Any, keys: list[str],
                     truth: GroundTruth, accs: dict[str, BoxAccuracy], *, count: int,
                     size: tuple[int, int]) -> list[Example]:
    """``count`` evenly spaced readable images with their ground truth and every source's credited box.

    Args:
        capture: images ``[B, 3, S, S]`` -> ``{source: [B, gh, gw] map}`` (one forward).
        dataset: a :class:`attnflow.localize.data.LocalizationImages` (unreadable files are replaced by the
            next readable ones).
        keys: the ground-truth key of each dataset item.
        truth: the ground truth.
        accs: each source's finished accumulator (gives its best threshold at IoU 50).
        count: number of images.
        size: ``(H, W)`` of the model input.
    """
    from ..data.transforms import denormalize
    from .data import gt_boxes

    chosen = evenly_spaced(len(dataset), count)
    spare = [i for i in range(len(dataset)) if i not in set(chosen)]
    items: list[tuple[int, Any, tuple[int, int]]] = []
    for i in chosen + spare:
        if len(items) == min(count, len(dataset)):
            break
        sample = dataset[i]
        if not isinstance(sample, BadImage):
            items.append((i, sample[0], sample[3]))
    if not items:
        return []
    batch = collate_skip_bad([(t, -1, i) for i, t, _ in items])
    convert = getattr(dataset.transform, "on_device", None)  # the fast path's uint8 images: normalised here
    if convert is not None:
        batch = convert(batch, torch.device("cpu"))
        kept = set(batch.indices.tolist())  # (a JPEG that no decoder reads is dropped there)
        items = [item for item in items if item[0] in kept]
    images = batch.images
    maps = {s: quantize_scoremaps(m, size).cpu().numpy() for s, m in capture(images).items()}
    exact = getattr(dataset.transform, "pil", dataset.transform)
    normalize = next(t for t in exact.transforms if type(t).__name__ == "Normalize")
    pixels = denormalize(images, normalize.mean, normalize.std)
    out = []
    for j, (i, _, wh) in enumerate(items):
        gt = gt_boxes(truth, keys[i], wh, (size[1], size[0]))
        credited = {s: credited_box(maps[s][j], gt, best_cut(accs[s]), holes=accs[s].holes) for s in maps}
        out.append(Example(name=dataset.paths[i].name, image=pixels[j], gt=gt,
                           boxes={s: b for s, (b, _) in credited.items()},
                           ious={s: iou for s, (_, iou) in credited.items()},
                           maps={s: maps[s][j] for s in maps}))
    return out
