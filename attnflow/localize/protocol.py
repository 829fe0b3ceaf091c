"""How localization is scored: the wsolevaluation protocol's settings (:class:`BoxProtocol`) and their limits.

A light module (no torch): the command line reads its choices when it builds its parser.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import AttnflowError
from ..limits import OptionError, check_cam_curve_interval

IOU_THRESHOLDS: tuple[int, ...] = (30, 50, 70)
"""wsolevaluation's ``iou_threshold_list`` (percent)."""

CAM_CURVE_INTERVAL: float = 0.01
"""wsolevaluation's ``cam_curve_interval`` of its evaluation script and README (100 thresholds)."""


INTERPOLATIONS: tuple[str, ...] = ("bilinear", "bicubic", "nearest")
"""Image resampling choices; wsolevaluation's ``transforms.Resize((224, 224))`` is bilinear."""

class LocalizationError(AttnflowError, ValueError):
    """Localization settings or inputs that cannot be evaluated (one clear line)."""


@dataclass(frozen=True)
class BoxProtocol:
    """How boxes are scored (default: clovaai/wsolevaluation's MaxBoxAccV2).

    Attributes:
        iou_thresholds: IoU thresholds in percent.
        cam_curve_interval: spacing of the score-map thresholds (0.01: 100 thresholds), at least
            :data:`MIN_CAM_CURVE_INTERVAL` (:func:`attnflow.limits.check_cam_curve_interval`).
        holes: count hole contours as OpenCV's ``RETR_TREE`` does (wsolevaluation); ``False``: outer contours only.
        interpolation: image resampling to the square input, one of :data:`INTERPOLATIONS`.
    """

    iou_thresholds: tuple[int, ...] = IOU_THRESHOLDS
    cam_curve_interval: float = CAM_CURVE_INTERVAL
    holes: bool = True
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        ious = tuple(int(d) for d in self.iou_thresholds)
        if not ious or any(not 0 < d <= 100 for d in ious) or len(set(ious)) != len(ious):
            raise LocalizationError(f"IoU thresholds must be distinct percentages in 1..100, got {list(ious)}")
        object.__setattr__(self, "iou_thresholds", ious)
        try:
            check_cam_curve_interval(self.cam_curve_interval)
        except OptionError as err:
            raise LocalizationError(str(err)) from None
        if self.interpolation not in INTERPOLATIONS:
            raise LocalizationError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got "
                                    f"{self.interpolation!r}")

    def describe(self) -> str:
        """One line of the settings (the resume fingerprint's ``metric``)."""
        return (f"IoU {list(self.iou_thresholds)}, interval {self.cam_curve_interval}, holes {self.holes}, "
                f"{self.interpolation}")

    def to_meta(self) -> dict[str, Any]:
        """The settings as a result records them."""
        return {"interpolation": self.interpolation, "iou_thresholds": list(self.iou_thresholds),
                "cam_curve_interval": self.cam_curve_interval, "hole_contours": self.holes}
