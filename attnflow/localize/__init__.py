"""Object localization with attention and Selective Aggregation maps (paper Appendix C.3, Table 7, Fig. 8).

MaxBoxAccV2 as clovaai/wsolevaluation computes it (:mod:`attnflow.localize.metric`), OpenCV-equivalent contour
boxes without OpenCV (:mod:`attnflow.localize.contours`), ImageNet-val ground truth in its distributed formats
(:mod:`attnflow.localize.boxes`) and the dataset loop (:func:`localize`)::

    from attnflow.localize import localize, read_boxes
    truth = read_boxes("/data/imagenet/LOC_val_solution.csv")
    result = localize(model, "/data/imagenet/val", truth, head=load_head("runs/probe/seed0/heads/abmilp.pt"))
    result.max_box_acc_v2()        # {"cls_mean": 53.3, "head:abmilp": 59.4} for MAE ViT-B/16 in the paper
"""

from __future__ import annotations

from .._lazy import lazy_getattr

_EXPORTS: dict[str, str] = {
    "BOX_FORMATS": "attnflow.localize.boxes",
    "BoxFileError": "attnflow.localize.boxes",
    "GroundTruth": "attnflow.localize.boxes",
    "read_boxes": "attnflow.localize.boxes",
    "BoxAccuracy": "attnflow.localize.metric",
    "IOU_THRESHOLDS": "attnflow.localize.protocol",
    "LocalizationError": "attnflow.localize.protocol",
    "box_iou": "attnflow.localize.metric",
    "resize_boxes": "attnflow.localize.metric",
    "mask_boxes": "attnflow.localize.contours",
    "threshold_boxes": "attnflow.localize.contours",
    "LocalizationResult": "attnflow.localize.result",
    "merge_curves": "attnflow.localize.result",
    "localize": "attnflow.localize.evaluate",
    "BoxProtocol": "attnflow.localize.protocol",
    "quantize_scoremaps": "attnflow.localize.scoremaps",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return __all__
