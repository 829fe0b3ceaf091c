"""The localization result: a tidy summary table, the full BoxAcc curves, provenance and example boxes.

On disk (:meth:`LocalizationResult.write` into ``out_dir``; ``attnflow localize`` adds the examples)::

    localization.parquet / .csv   model, source, label, metric, iou_threshold, value, best_cam_threshold, images
    localization.json             provenance: model, checkpoint sha256, head, boxes file, protocol, images
    curve.parquet / .csv          model, source, iou_threshold, cam_threshold, hits, images, box_acc
    examples.pdf / .png           Fig. 8-style boxes on a few images (``examples`` > 0)

``metric`` is ``MaxBoxAcc`` (one row per IoU threshold, with the best score-map threshold) or ``MaxBoxAccV2``
(their mean; ``iou_threshold`` and ``best_cam_threshold`` empty). Values are percentages. The curve keeps the
integer hit counts, so curves of separate runs over disjoint images add up exactly (:func:`merge_curves`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..result import write_table
from .metric import BoxAccuracy
from .protocol import LocalizationError

TABLE = "localization"
CURVE = "curve"
SUMMARY_COLUMNS: tuple[str, ...] = ("model", "source", "label", "metric", "iou_threshold", "value",
                                    "best_cam_threshold", "images")
CURVE_COLUMNS: tuple[str, ...] = ("model", "source", "iou_threshold", "cam_threshold", "hits", "images", "box_acc")


@dataclass
class Example:
    """One image of the example figure.

    Attributes:
        name: file name.
        image: ``[S, S, 3]`` uint8, the resized image the model saw.
        gt: ``[G, 4]`` ground-truth boxes in its pixels.
        boxes: source -> the box the metric credits at the source's best threshold (highest IoU with a
            ground-truth box), ``[4]``.
        ious: source -> that box's IoU.
        maps: source -> ``[S, S]`` uint8 score map.
    """

    name: str
    image: np.ndarray
    gt: np.ndarray
    boxes: dict[str, np.ndarray]
    ious: dict[str, float]
    maps: dict[str, np.ndarray]


def summary_frame(model: str, accuracies: dict[str, BoxAccuracy], labels: dict[str, str]) -> pd.DataFrame:
    """The tidy summary table (:data:`SUMMARY_COLUMNS`) of every source's accumulator."""
    rows: list[dict[str, Any]] = []
    for source, acc in accuracies.items():
        s = acc.compute()
        for d, value, best in zip(acc.iou_thresholds, s.max_box_acc, s.best_threshold):
            rows.append({"model": model, "source": source, "label": labels[source], "metric": "MaxBoxAcc",
                         "iou_threshold": d, "value": float(value), "best_cam_threshold": round(float(best), 6),
                         "images": s.images})
        rows.append({"model": model, "source": source, "label": labels[source], "metric": "MaxBoxAccV2",
                     "iou_threshold": pd.NA, "value": s.max_box_acc_v2, "best_cam_threshold": np.nan,
                     "images": s.images})
    frame = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    return frame.astype({"model": "string", "source": "string", "label": "string", "metric": "string",
                         "iou_threshold": "Int64", "value": "float64", "best_cam_threshold": "float64",
                         "images": "int64"})


def curve_frame(model: str, accuracies: dict[str, BoxAccuracy]) -> pd.DataFrame:
    """BoxAcc at every (IoU threshold, score-map threshold), with the hit counts (:data:`CURVE_COLUMNS`)."""
    parts = []
    for source, acc in accuracies.items():
        d_idx, t_idx = np.meshgrid(np.arange(len(acc.iou_thresholds)), np.arange(len(acc.thresholds)), indexing="ij")
        hits = acc.hits[d_idx, t_idx].reshape(-1)
        parts.append(pd.DataFrame({
            "model": model, "source": source,
            "iou_threshold": np.asarray(acc.iou_thresholds)[d_idx.reshape(-1)],
            "cam_threshold": np.round(acc.thresholds[t_idx.reshape(-1)], 6),
            "hits": hits, "images": acc.count, "box_acc": hits * 100.0 / max(acc.count, 1)}))
    return pd.concat(parts, ignore_index=True).loc[:, list(CURVE_COLUMNS)]


def merge_curves(curves: list[pd.DataFrame]) -> pd.DataFrame:
    """Add the hit counts of runs over disjoint images (same model, sources and thresholds) and recompute BoxAcc.

    Raises:
        LocalizationError: when the curves do not share their (source, IoU, score-map threshold) grid.
    """
    keys = ["model", "source", "iou_threshold", "cam_threshold"]
    grids = [set(map(tuple, c[keys].astype(str).to_numpy())) for c in curves]
    if any(g != grids[0] for g in grids[1:]):
        raise LocalizationError("curves to merge must share model, sources, IoU and score-map thresholds")
    total = pd.concat(curves, ignore_index=True).groupby(keys, sort=False, as_index=False)[["hits", "images"]].sum()
    total["box_acc"] = total["hits"] * 100.0 / total["images"].clip(lower=1)
    return total.loc[:, list(CURVE_COLUMNS)]


@dataclass
class LocalizationResult:
    """MaxBoxAccV2 of every score-map source over a dataset.

    Attributes:
        frame: the summary table (:data:`SUMMARY_COLUMNS`).
        curve: the BoxAcc curves (:data:`CURVE_COLUMNS`).
        meta: provenance (JSON-serialisable).
        examples: images for the example figure (not written to the tables).
    """

    frame: pd.DataFrame
    curve: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)
    examples: list[Example] = field(default_factory=list)

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.meta.get("labels", {}))

    def max_box_acc_v2(self) -> dict[str, float]:
        """Source -> MaxBoxAccV2 (percent)."""
        rows = self.frame[self.frame["metric"] == "MaxBoxAccV2"]
        return {str(s): float(v) for s, v in zip(rows["source"], rows["value"])}

    def write(self, out_dir: str | Path) -> Path:
        """Write the summary table, its sidecar and the curve into ``out_dir``, all or nothing (see
        :func:`attnflow.result.write_table`).

        Returns:
            The summary's parquet path.
        """
        return write_table(Path(out_dir) / f"{TABLE}.parquet", self.frame, self.meta, extra={CURVE: self.curve})
