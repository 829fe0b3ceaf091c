"""The dataset loop of ``attnflow localize``: MaxBoxAccV2 of the [cls] attention map and of a Selective
Aggregation head's map (paper Appendix C.3, Table 7).

One forward of the model per batch gives the last block's attention (the [cls] map) and the tokens the head
was trained on (its map). The maps are resized and quantised on the device; the box search (a CPU task, tens
of milliseconds per image and map) runs in a thread pool while the next batch is read and encoded. Under
``torch.distributed`` each process evaluates every ``world``-th image and the hit counts are summed, so N
processes give exactly what one gives.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..data.images import DataError
from ..probes.distributed import current_world, gather_objects
from ..probes.fixed_encode import AggregationCapture, check_head, head_vectors
from ..probes.heads import ProbeHead
from ..provenance import run_provenance
from .boxes import GroundTruth
from .data import LocalizationImages, SizeCheck, collate_sized, gt_boxes, match_images, resize_transform
from .examples import collect_examples
from .metric import CAM_CURVE_INTERVAL, IOU_THRESHOLDS, BoxAccuracy, LocalizationError
from .result import LocalizationResult, curve_frame, summary_frame
from .scoremaps import CLS_SOURCE, HEAD_SOURCE_PREFIX, cls_attention_maps, quantize_scoremaps, source_label

log = logging.getLogger(__name__)

PROTOCOL = ("wsolevaluation BoxEvaluator, multi_contour_eval (MaxBoxAccV2): whole image resized to a square, "
            "score map bicubic-resized to it, min-max normalised, uint8, mask = map > int(t * max), every "
            "contour's box (outer and hole contours, OpenCV RETR_TREE), best IoU over ground-truth boxes")


class MapCapture:
    """One forward per batch -> ``{source: [B, gh, gw] map}`` for the [cls] map and a head's map."""

    def __init__(self, model: nn.Module, head: ProbeHead | None, *, head_path: str | None, amp: str,
                 device: torch.device, model_name: str) -> None:
        meta = (getattr(head, "meta", {}) or {}) if head is not None else {}
        self.capture = AggregationCapture(model, block=meta.get("block", -1), layernorm=meta.get("layernorm", False),
                                          amp=amp, device=device, model_name=model_name)
        self.head = head
        if head is not None:
            check_head(head, self.capture, head_path or "the head")
            self.head = head.to(device).eval()
        self.sources = ([CLS_SOURCE] if self.capture.encoder.has_cls else []) + \
            ([f"{HEAD_SOURCE_PREFIX}{head.spec.name}"] if head is not None else [])
        if not self.sources:
            raise LocalizationError(f"{model_name} has no [cls] token: localize its Selective Aggregation map with "
                                    "a trained head (--head runs/probe/seed0/heads/abmilp.pt)")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        captured = self.capture.capture(images)
        grid = captured.layout.grid
        ph, pw = captured.layout.patch_size
        if (grid[0] * ph, grid[1] * pw) != tuple(images.shape[-2:]):
            raise LocalizationError(f"{images.shape[-2]}x{images.shape[-1]} px images do not split into {ph}x{pw} "
                                    f"patches: use an --img-size that is a multiple of {ph}")
        maps: dict[str, torch.Tensor] = {}
        if CLS_SOURCE in self.sources:
            maps[CLS_SOURCE] = cls_attention_maps(captured.attn, captured.layout)
        if self.head is not None:
            maps[self.sources[-1]] = head_vectors(self.head, captured).reshape(-1, *grid)
        return maps


def localize(model: nn.Module, data: str | Path, truth: GroundTruth, *, head: ProbeHead | None = None,
             head_path: str | None = None, model_name: str = "model", batch_size: int = 64,
             device: torch.device | str | None = None, amp: str = "auto", num_workers: int = 0, img_size: int = 224,
             interpolation: str = "bilinear", limit: int | None = None,
             iou_thresholds: Sequence[int] = IOU_THRESHOLDS, cam_curve_interval: float = CAM_CURVE_INTERVAL,
             holes: bool = True, threads: int | None = None, examples: int = 0,
             progress: bool = True) -> LocalizationResult:
    """MaxBoxAccV2 of the [cls] attention map and (with ``head``) the Selective Aggregation map over a folder.

    Args:
        model: a timm ViT (frozen).
        data: an image folder (recursive); images are matched to ``truth`` by path, file name or stem.
        truth: ground-truth boxes (:func:`attnflow.localize.read_boxes`).
        head: a trained AbMILP / attentive-probing head of this model (:func:`attnflow.probes.load_head`).
        head_path: the head's file, for provenance and messages.
        model_name: the ``model`` column.
        batch_size, device, amp, num_workers: the loop (device default: CUDA when available).
        img_size: side of the square the whole image is resized to (wsolevaluation: 224).
        interpolation: image resampling (wsolevaluation: bilinear).
        limit: evaluate ``limit`` evenly spaced images that have boxes.
        iou_thresholds, cam_curve_interval: the metric (defaults: 30/50/70 and 0.01).
        holes: count hole contours as OpenCV's ``RETR_TREE`` does (wsolevaluation); ``False`` for outer
            contours only.
        threads: box-search threads (default: ``min(8, CPUs)``).
        examples: number of example images to keep for the figure (main process).
        progress: tqdm bar (main process).

    Returns:
        The :class:`LocalizationResult`.

    Raises:
        LocalizationError: a model without [cls] and no head, a head of another model.
        BoxFileError: no image of the folder has a box.
        DataError: no readable image.
    """
    world_info = current_world()
    rank, world = world_info.rank, world_info.size
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                         else "cpu")
    capture = MapCapture(model, head, head_path=head_path, amp=amp, device=device, model_name=model_name)
    sources = capture.sources
    matched = match_images(data, truth, limit)
    transform = resize_transform(model, img_size, interpolation)
    dataset = LocalizationImages(matched.paths, transform)
    shard = Subset(dataset, list(range(rank, len(dataset), world))) if world > 1 else dataset
    loader = DataLoader(shard, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_sized,
                        pin_memory=device.type == "cuda")
    accs = {s: BoxAccuracy(iou_thresholds, cam_curve_interval, holes=holes) for s in sources}
    size = (img_size, img_size)
    check = SizeCheck()
    skipped: list[tuple[str, str]] = []
    pending: deque[list[tuple[str, Future]]] = deque()

    def drain(keep: int) -> None:
        while len(pending) > keep:
            for source, future in pending.popleft():
                accs[source].add(future.result())

    with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
        for batch, sizes in tqdm(loader, desc="localize", unit="batch", disable=not (progress and rank == 0)):
            skipped.extend(batch.bad)
            for path, reason in batch.bad:
                log.warning("skipping %s: %s", path, reason)
            if batch.images.numel() == 0:
                continue
            maps = {s: quantize_scoremaps(m, size).cpu().numpy() for s, m in capture(batch.images).items()}
            jobs: list[tuple[str, Future]] = []
            for i, (index, wh) in enumerate(zip(batch.indices.tolist(), sizes.tolist())):
                key = matched.keys[index]
                gt = gt_boxes(truth, key, (wh[0], wh[1]), size, check, matched.paths[index].name)
                jobs += [(s, pool.submit(accs[s].hits_of, maps[s][i], gt)) for s in sources]
            pending.append(jobs)
            drain(keep=2)  # the box search of two batches overlaps the next forward
        drain(keep=0)
    for acc in accs.values():
        acc.all_reduce()
    skipped = gather_objects(skipped)
    differ = gather_objects([(check.differ, check.aspect, check.first)])
    used = next(iter(accs.values())).count
    if used == 0:
        raise DataError(f"no readable image among {len(dataset)} ({len(skipped)} unreadable)")
    _warn_sizes(differ, truth)
    labels = {s: source_label(s) for s in sources}
    meta = {
        **run_provenance(model, model_name),
        "analysis": "object localization, MaxBoxAccV2 (Beyond [cls], Appendix C.3, Table 7 / Fig. 8)",
        "protocol": PROTOCOL, "sources": sources, "labels": labels,
        "head": ({"path": head_path, "spec": head.spec.name, "meta": getattr(head, "meta", {}) or {}}
                 if head is not None else None),
        "token_block": capture.capture.encoder.block, "attention_block": len(model.blocks) - 1,  # type: ignore
        "boxes": {"path": truth.path, "format": truth.format, "images_with_boxes": len(truth),
                  "boxes": truth.n_boxes},
        "data": {"root": str(data), "n_found": matched.n_found, "limit": limit, "transform": repr(transform)},
        "img_size": img_size, "interpolation": interpolation, "iou_thresholds": list(iou_thresholds),
        "cam_curve_interval": cam_curve_interval, "hole_contours": holes,
        "images_used": used, "images_skipped": len(skipped),
        "skipped": [{"path": p, "reason": r} for p, r in skipped],
        "images_without_boxes": len(matched.without_boxes),
        "without_boxes": [str(p) for p in matched.without_boxes[:100]],
        "size_differs_from_box_file": sum(d[0] for d in differ),
        "aspect_differs_from_box_file": sum(d[1] for d in differ),
        "world_size": world, "amp": amp, "device": str(device),
    }
    result = LocalizationResult(summary_frame(model_name, accs, labels), curve_frame(model_name, accs), meta)
    if examples and rank == 0:
        result.examples = collect_examples(capture, dataset, matched.keys, truth, accs, count=examples, size=size)
    return result


def _warn_sizes(differ: list[tuple[int, int, str]], truth: GroundTruth) -> None:
    n, aspect = sum(d[0] for d in differ), sum(d[1] for d in differ)
    if n:
        first = next(d[2] for d in differ if d[2])
        log.warning("%d images (first: %s) differ in size from what %s states; their boxes are scaled by the "
                    "file's size%s", n, first, truth.path,
                    f" ({aspect} also differ in aspect ratio: cropped images? their boxes are wrong)" if aspect
                    else " (images resized before the run are fine)")
