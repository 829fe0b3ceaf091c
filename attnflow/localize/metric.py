"""MaxBoxAccV2 (Choe et al., CVPR 2020, "Evaluating Weakly Supervised Object Localization Methods Right"),
computed as clovaai/wsolevaluation's ``BoxEvaluator`` with ``multi_contour_eval=True`` computes it.

Per image, with the score map already resized to the evaluation size and quantised to uint8
(:func:`attnflow.localize.scoremaps.quantize_scoremaps`):

1. for every score-map threshold ``t`` in ``np.arange(0, 1, cam_curve_interval)`` (0.00, 0.01, ..., 0.99), the
   mask ``map > int(t * max(map))`` (OpenCV ``THRESH_BINARY``, strictly greater);
2. the box of every contour of that mask (:mod:`attnflow.localize.contours`);
3. the best IoU between any of those boxes and any ground-truth box of the image (inclusive pixel
   coordinates: a box ``(x0, y0, x1, y1)`` covers ``(x1 - x0 + 1) * (y1 - y0 + 1)`` pixels);
4. a hit at IoU threshold ``d`` (30, 50, 70 %) when that IoU is ``>= d / 100``.

Over the dataset, ``BoxAcc(t, d)`` is the percentage of images with a hit; ``MaxBoxAcc(d) = max_t BoxAcc(t, d)``
and ``MaxBoxAccV2 = mean_d MaxBoxAcc(d)``. :class:`BoxAccuracy` keeps only the int64 hit counts per
``(d, t)`` and the image count, so memory does not grow with the dataset, two accumulators merge exactly and
processes sum their counts with one ``all_reduce``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..reducers import Accumulator
from .protocol import CAM_CURVE_INTERVAL, IOU_THRESHOLDS, BoxProtocol, LocalizationError
from .contours import threshold_boxes

def cam_thresholds(interval: float = CAM_CURVE_INTERVAL) -> np.ndarray:
    """``np.arange(0, 1, interval)``: the score-map thresholds as fractions of the map's maximum."""
    if not 0 < interval < 1:
        raise LocalizationError(f"cam_curve_interval must be in (0, 1), got {interval}")
    return np.arange(0, 1, interval)


def box_iou(boxes: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU of every box with every ground-truth box, in inclusive pixel coordinates (wsolevaluation's
    ``calculate_multiple_iou``: ``+1`` in every width and height; a pair with an empty union gets 0).

    Shape:
        boxes ``[K, 4]``, gt ``[G, 4]`` (``x0, y0, x1, y1``) -> ``[K, G]`` float64.
    """
    a = np.asarray(boxes, dtype=np.int64)[:, None, :]                               # [K, 1, 4]
    b = np.asarray(gt, dtype=np.int64)[None, :, :]                                  # [1, G, 4]
    iw = np.maximum(0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1)
    ih = np.maximum(0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    union = area_a + area_b - inter
    degenerate = union <= 0
    return np.where(degenerate, 0.0, inter / np.where(degenerate, 1, union))


def resize_boxes(boxes: np.ndarray, image_size: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Ground-truth boxes of an image of ``image_size = (w, h)`` in the coordinates of the image resized to
    ``size = (W, H)``: ``int(x * W / w)``, ``int(y * H / h)`` (wsolevaluation's ``resize_bbox``, truncating).

    Shape:
        ``[G, 4] -> [G, 4]`` int64.
    """
    b = np.asarray(boxes, dtype=np.float64)
    (w, h), (new_w, new_h) = map(float, image_size), map(float, size)
    return np.trunc(b * np.array([new_w, new_h, new_w, new_h]) / np.array([w, h, w, h])).astype(np.int64)


def best_ious(scoremap: np.ndarray, gt: np.ndarray, thresholds: np.ndarray, *, holes: bool = True) -> np.ndarray:
    """For each threshold, the best IoU between a box of the thresholded map and a ground-truth box.

    Args:
        scoremap: ``[H, W]`` uint8 score map (0..255).
        gt: ``[G, 4]`` ground-truth boxes in the map's pixel coordinates.
        thresholds: ``[T]`` fractions of the map's maximum (:func:`cam_thresholds`).
        holes: count hole contours (OpenCV ``RETR_TREE``, as wsolevaluation).

    Returns:
        ``[T]`` float64.
    """
    top = scoremap.max()
    cut = (np.asarray(thresholds, dtype=np.float64) * top).astype(np.int64)        # int(t * max), t >= 0
    boxes = threshold_boxes(scoremap, cut, holes=holes)
    counts = np.fromiter((len(b) for b in boxes), dtype=np.int64, count=len(boxes))
    per_box = box_iou(np.concatenate(boxes), gt).max(axis=1)                        # [sum K_t]
    return np.maximum.reduceat(per_box, np.concatenate([[0], np.cumsum(counts)[:-1]]))


def image_hits(scoremap: np.ndarray, gt: np.ndarray, thresholds: np.ndarray,
               iou_thresholds: Sequence[int] = IOU_THRESHOLDS, *, holes: bool = True) -> np.ndarray:
    """Whether the map localises the object at each (IoU threshold, score-map threshold).

    Returns:
        ``[D, T]`` bool: ``best_ious(...)[t] >= d / 100``.
    """
    ious = best_ious(scoremap, gt, thresholds, holes=holes)
    return ious[None, :] >= np.array([d / 100 for d in iou_thresholds])[:, None]


@dataclass(frozen=True)
class BoxAccuracySummary:
    """What :meth:`BoxAccuracy.compute` returns.

    Attributes:
        box_acc: ``[D, T]`` BoxAcc in percent at every (IoU threshold, score-map threshold).
        max_box_acc: ``[D]`` MaxBoxAcc per IoU threshold (percent).
        best_threshold: ``[D]`` the first score-map threshold that reaches it.
        max_box_acc_v2: the mean of ``max_box_acc`` (percent).
        images: number of images evaluated.
    """

    box_acc: np.ndarray
    max_box_acc: np.ndarray
    best_threshold: np.ndarray
    max_box_acc_v2: float
    images: int


class BoxAccuracy(Accumulator):
    """Streaming MaxBoxAccV2: int64 hit counts per (IoU threshold, score-map threshold) and an image count.

    Args:
        iou_thresholds: IoU thresholds in percent (default 30, 50, 70).
        cam_curve_interval: spacing of the score-map thresholds (default 0.01: 100 thresholds).
        holes: count hole contours as wsolevaluation (OpenCV ``RETR_TREE``) does.

    Example::

        acc = BoxAccuracy()
        for scoremap, gt in data:          # uint8 [224, 224], [G, 4] boxes in the map's pixels
            acc.update(scoremap, gt)
        acc.all_reduce()                   # under torch.distributed: sum the counts of every process
        acc.compute().max_box_acc_v2
    """

    def __init__(self, iou_thresholds: Sequence[int] = IOU_THRESHOLDS,
                 cam_curve_interval: float = CAM_CURVE_INTERVAL, *, holes: bool = True) -> None:
        super().__init__()
        ious = tuple(int(d) for d in iou_thresholds)
        if not ious or any(not 0 < d <= 100 for d in ious) or len(set(ious)) != len(ious):
            raise LocalizationError(f"IoU thresholds must be distinct percentages in 1..100, got {list(ious)}")
        self.iou_thresholds = ious
        self.cam_curve_interval = float(cam_curve_interval)
        self.thresholds = cam_thresholds(self.cam_curve_interval)
        self.holes = holes
        self._hits: torch.Tensor
        self._count: torch.Tensor
        self.add_state("_hits", torch.zeros((len(ious), len(self.thresholds)), dtype=torch.int64))      # [D, T]
        self.add_state("_count", torch.zeros((), dtype=torch.int64))

    @property
    def hits(self) -> np.ndarray:
        """``[D, T]`` int64 hit counts."""
        return self._hits.numpy()

    @property
    def count(self) -> int:
        """Images counted."""
        return int(self._count)

    @classmethod
    def of(cls, protocol: BoxProtocol) -> BoxAccuracy:
        """An empty accumulator for ``protocol``'s thresholds and contour mode."""
        return cls(protocol.iou_thresholds, protocol.cam_curve_interval, holes=protocol.holes)

    def hits_of(self, scoremap: np.ndarray, gt: np.ndarray) -> np.ndarray:
        """``[D, T]`` bool hits of one image (thread-safe: it does not touch the counts)."""
        gt = np.asarray(gt)
        if gt.ndim != 2 or gt.shape[1] != 4 or len(gt) == 0:
            raise LocalizationError(f"ground-truth boxes must be a non-empty [G, 4] array, got shape {gt.shape}")
        if scoremap.dtype != np.uint8 or scoremap.ndim != 2:
            raise LocalizationError(f"score maps must be 2-D uint8 (quantize_scoremaps), got {scoremap.dtype} "
                                    f"{scoremap.shape}")
        return image_hits(scoremap, gt, self.thresholds, self.iou_thresholds, holes=self.holes)

    def add(self, hits: np.ndarray) -> None:
        """Count one image's ``[D, T]`` hits (from :meth:`hits_of`)."""
        self._hits += torch.from_numpy(np.asarray(hits, dtype=np.int64))
        self._count += 1

    def update(self, scoremap: np.ndarray, gt: np.ndarray) -> None:
        """Evaluate one image: ``scoremap`` ``[H, W]`` uint8, ``gt`` ``[G, 4]`` boxes in its pixels."""
        self.add(self.hits_of(scoremap, gt))

    def _settings(self) -> tuple:
        return self.iou_thresholds, self.cam_curve_interval, self.holes

    def _check_compatible(self, other: Any) -> None:
        if not isinstance(other, BoxAccuracy) or other._settings() != self._settings():
            raise LocalizationError("cannot merge box accuracies with different IoU thresholds, cam curve "
                                    "interval or contour mode")
        super()._check_compatible(other)

    def state_dict(self) -> dict[str, Any]:
        """The counts and settings (to save partial results and merge them later)."""
        return {"iou_thresholds": list(self.iou_thresholds), "cam_curve_interval": self.cam_curve_interval,
                "holes": self.holes, **super().state_dict()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> BoxAccuracy:
        """A new accumulator with the settings and counts of :meth:`state_dict`."""
        acc = cls(state["iou_thresholds"], state["cam_curve_interval"], holes=state["holes"])
        acc.load_state_dict(state)
        return acc

    def compute(self) -> BoxAccuracySummary:
        """BoxAcc curves, MaxBoxAcc per IoU threshold and MaxBoxAccV2 (percent).

        Raises:
            LocalizationError: when no image was counted.
        """
        if self.count == 0:
            raise LocalizationError("no image was evaluated: MaxBoxAcc is undefined")
        box_acc = self.hits * 100.0 / float(self.count)                                # [D, T]
        best = box_acc.argmax(axis=1)
        max_acc = box_acc.max(axis=1)
        return BoxAccuracySummary(box_acc=box_acc, max_box_acc=max_acc, best_threshold=self.thresholds[best],
                                  max_box_acc_v2=float(np.average(max_acc)), images=self.count)
