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
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..options import autocast_dtype
from ..data.images import DataError
from ..dist import current_world, gather_objects
from ..probes.fixed_encode import AggregationCapture, check_head, head_vectors
from ..probes.heads import ProbeHead
from ..provenance import run_provenance, weights_fingerprint
from ..runstate import (RunState, images_fingerprint, keep_progress, rank_state_path, run_fingerprint,
                        signals_deferred)
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
             progress: bool = True, state_path: str | Path | None = None, checkpoint_every: int = 50,
             resume: bool = False, keep_state: bool = False) -> LocalizationResult:
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
        state_path: file for periodic state (one per process under torch.distributed, as
            :func:`~attnflow.runstate.rank_state_path`); with ``resume=True`` an interrupted run continues from
            it and ends with exactly the counts of an uninterrupted one. The state is refused when the model,
            weights, images, boxes, head, resolution, autocast, metric settings or number of processes differ.
        checkpoint_every: batches between state saves.
        resume: continue from ``state_path`` if it exists.
        keep_state: leave the finished run's state in ``state_path`` (the caller removes it once the outputs
            are written; a resume from it returns the same result at once).

    Returns:
        The :class:`LocalizationResult`.

    Raises:
        LocalizationError: a model without [cls] and no head, a head of another model.
        BoxFileError: no image of the folder has a box.
        DataError: no readable image.
        StateFileError, StateMismatchError: with ``resume``, an unreadable state or one of another run.
    """
    if checkpoint_every < 1:
        raise LocalizationError(f"checkpoint_every must be a positive integer, got {checkpoint_every}")
    world_info = current_world()
    rank, world = world_info.rank, world_info.size
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                         else "cpu")
    capture = MapCapture(model, head, head_path=head_path, amp=amp, device=device, model_name=model_name)
    sources = capture.sources
    matched = match_images(data, truth, limit)
    transform = resize_transform(model, img_size, interpolation)
    dataset = LocalizationImages(matched.paths, transform)
    accs = {s: BoxAccuracy(iou_thresholds, cam_curve_interval, holes=holes) for s in sources}
    boxes_digest = truth.fingerprint()
    state_file = RunState(rank_state_path(Path(state_path), rank, world) if state_path else None, {})
    if state_file.path is not None:
        state_file.fingerprint = {
            **run_fingerprint(model, model_name, n_items=len(dataset), images=images_fingerprint(matched.paths,
                              Path(data)), img_size=img_size, crop_pct=None, amp=autocast_dtype(amp, device),
                              world=world, rank=rank),
            "head": weights_fingerprint(head) if head is not None else None, "boxes": boxes_digest,
            "metric": f"IoU {list(iou_thresholds)}, interval {cam_curve_interval}, holes {holes}, {interpolation}"}
    saved = state_file.load() if resume else None
    done = saved["done_items"] if saved else 0  # positions of this process's shard whose boxes are counted
    skipped: list[tuple[str, str]] = [(str(p), str(r)) for p, r in saved["skipped"]] if saved else []
    check = SizeCheck(*saved["size_check"]) if saved else SizeCheck()
    if saved:
        for source, acc_state in saved["reducer"].items():
            accs[source] = BoxAccuracy.from_state_dict(acc_state)
        log.info("resuming %s from %s: %d images done", model_name, state_file.path, done)
    positions = list(range(rank, len(dataset), world))
    loader = DataLoader(Subset(dataset, positions[done:]), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=collate_sized, pin_memory=device.type == "cuda")
    size = (img_size, img_size)
    start = time.perf_counter()
    # batches whose box search is under way; a batch counts (hits, skipped files, size check, position) only
    # once all its futures are done, so a saved state is always that of whole batches
    pending: deque[_Pending] = deque()
    n_drained = 0

    def drain(keep: int) -> None:
        nonlocal done, n_drained
        while len(pending) > keep:
            batch = pending[0]
            hits = [(source, future.result()) for source, future in batch.jobs]  # waits; nothing counted yet
            with signals_deferred():  # the whole batch counts, or none of it
                pending.popleft()
                for source, image_hits in hits:
                    accs[source].add(image_hits)
                skipped.extend(batch.bad)
                check.differ, check.aspect = check.differ + batch.check.differ, check.aspect + batch.check.aspect
                check.first = check.first or batch.check.first
                done += batch.n_items
                n_drained += 1
            if state_file.path is not None and n_drained % checkpoint_every == 0:
                state_file.try_save(snapshot())

    def snapshot() -> dict:
        return {"done_items": done, "reducer": {s: acc.state_dict() for s, acc in accs.items()},
                "skipped": list(skipped), "size_check": (check.differ, check.aspect, check.first),
                "seconds": (saved or {}).get("seconds", 0.0) + time.perf_counter() - start}

    pool = ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1))
    try:
        for batch, sizes in tqdm(loader, desc="localize", unit="batch", total=len(loader),
                                 disable=not (progress and rank == 0)):
            for path, reason in batch.bad:
                log.warning("skipping %s: %s", path, reason)
            batch_check = SizeCheck()
            jobs: list[tuple[str, Future]] = []
            if batch.images.numel():
                maps = {s: quantize_scoremaps(m, size).cpu().numpy() for s, m in capture(batch.images).items()}
                for i, (index, wh) in enumerate(zip(batch.indices.tolist(), sizes.tolist())):
                    key = matched.keys[index]
                    gt = gt_boxes(truth, key, (wh[0], wh[1]), size, batch_check, matched.paths[index].name)
                    jobs += [(s, pool.submit(accs[s].hits_of, maps[s][i], gt)) for s in sources]
            pending.append(_Pending(jobs, list(batch.bad), batch_check,
                                    batch.images.shape[0] + len(batch.bad)))
            drain(keep=2)  # the box search of two batches overlaps the next forward
        drain(keep=0)
    except BaseException as err:
        pool.shutdown(wait=False, cancel_futures=True)  # the searches not yet begun would be thrown away
        keep_progress(state_file, snapshot() if done else None, done, err)
        raise
    pool.shutdown()
    final = snapshot() if keep_state and state_file.path is not None else None  # before the all-reduce
    elapsed = (saved or {}).get("seconds", 0.0) + time.perf_counter() - start
    for acc in accs.values():
        acc.all_reduce()
    skipped = gather_objects(skipped)
    differ = gather_objects([(check.differ, check.aspect, check.first)])
    used = next(iter(accs.values())).count
    if used == 0:
        state_file.remove()  # every file was unreadable: nothing to resume
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
                  "boxes": truth.n_boxes, "digest": boxes_digest},
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
        "seconds": round(elapsed, 3),
        "resumed": saved is not None,
    }
    if final is not None:
        state_file.save(final)
    else:
        state_file.remove()
    result = LocalizationResult(summary_frame(model_name, accs, labels), curve_frame(model_name, accs), meta)
    if examples and rank == 0:
        result.examples = collect_examples(capture, dataset, matched.keys, truth, accs, count=examples, size=size)
    return result


@dataclass
class _Pending:
    """One batch whose box search is under way."""

    jobs: list[tuple[str, Future]]
    bad: list[tuple[str, str]]
    check: SizeCheck
    n_items: int


def _warn_sizes(differ: list[tuple[int, int, str]], truth: GroundTruth) -> None:
    n, aspect = sum(d[0] for d in differ), sum(d[1] for d in differ)
    if n:
        first = next(d[2] for d in differ if d[2])
        log.warning("%d images (first: %s) differ in size from what %s states; their boxes are scaled by the "
                    "file's size%s", n, first, truth.path,
                    f" ({aspect} also differ in aspect ratio: cropped images? their boxes are wrong)" if aspect
                    else " (images resized before the run are fine)")
