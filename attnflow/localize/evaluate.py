"""``localize``: MaxBoxAccV2 of the [cls] attention map and of a Selective Aggregation head's map over a dataset
(paper Appendix C.3, Table 7), and optionally of the attention-rollout map, on the one loop.

One forward of the model per batch gives the last block's attention (the [cls] map), the tokens the head
was trained on (its map) and, when asked, the rollout product of every block (the rollout map,
:mod:`attnflow.aggregation.rollout`, streamed block by block). The maps are resized and quantised on the device;
the box search (a CPU task, tens of milliseconds per image and map) runs in a thread pool while the next batch is
read and encoded, and a batch counts once all its searches are done. Under ``torch.distributed`` each process
evaluates every ``world``-th image and the hit counts are summed, so N processes give exactly what one gives.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..aggregation.capture import AggregationCapture
from ..aggregation.vectors import aggregation_vectors, head_vectors
from ..data.images import ImageBatch
from ..data.sources import ImageSource
from ..limits import check_img_size
from ..data.decode import decode_of, fast_transform
from ..loop import Analysis, Commit, LoopRun, run_loop
from ..options import LoopOptions, dtype_name
from ..probes.backbone import check_head
from ..probes.heads import ProbeHead
from ..provenance import run_name, run_provenance, weights_fingerprint
from ..runstate import model_fingerprint
from ..vit import check_divisible, model_blocks
from .boxes import GroundTruth
from .data import LocalizationImages, Matched, SizeCheck, gt_boxes, match_images, resize_transform
from .examples import collect_examples
from .metric import BoxAccuracy
from .protocol import BoxProtocol, LocalizationError
from .result import LocalizationResult, curve_frame, summary_frame
from .scoremaps import CLS_SOURCE, HEAD_SOURCE_PREFIX, ROLLOUT_SOURCE, quantize_scoremaps, source_label

log = logging.getLogger(__name__)

PROTOCOL = ("wsolevaluation BoxEvaluator, multi_contour_eval (MaxBoxAccV2): whole image resized to a square, "
            "score map bicubic-resized to it, min-max normalised, uint8, mask = map > int(t * max), every "
            "contour's box (outer and hole contours, OpenCV RETR_TREE), best IoU over ground-truth boxes")


class MapCapture:
    """One forward per batch -> ``{source: [B, gh, gw] map}`` for the [cls] map, the rollout map (``rollout``)
    and a head's map, in that order."""

    def __init__(self, model: nn.Module, head: ProbeHead | None, *, amp: str,
                 device: torch.device, model_name: str, rollout: bool = False) -> None:
        meta = (getattr(head, "meta", {}) or {}) if head is not None else {}
        self.capture = AggregationCapture(model, block=meta.get("block", -1), layernorm=meta.get("layernorm", False),
                                          amp=amp, device=device, model_name=model_name, rollout=rollout)
        self.head, self.head_path = head, head.path if head is not None else None
        if head is not None:
            check_head(head, self.capture.encoder, self.head_path or "the head", model_name)
            self.head = head.to(device).eval()
        self.head_source = f"{HEAD_SOURCE_PREFIX}{head.spec.name}" if head is not None else None
        self.sources = ([CLS_SOURCE] if self.capture.encoder.has_cls else []) + ([ROLLOUT_SOURCE] if rollout else []) \
            + ([self.head_source] if self.head_source is not None else [])
        if not self.sources:
            raise LocalizationError(f"{model_name} has no [cls] token: localize its Selective Aggregation map with "
                                    "a trained head (e.g. runs/probe/seed0/heads/abmilp.pt) or its attention "
                                    "rollout map (the rollout option)")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        captured = self.capture.capture(images)
        grid = captured.layout.grid
        check_divisible(images.shape[-2:], captured.layout.patch_size)
        maps: dict[str, torch.Tensor] = {}
        if CLS_SOURCE in self.sources:
            maps[CLS_SOURCE] = aggregation_vectors(captured.attn, captured.layout, CLS_SOURCE).reshape(-1, *grid)
        if ROLLOUT_SOURCE in self.sources:
            maps[ROLLOUT_SOURCE] = self.capture.vectors(captured, ROLLOUT_SOURCE).reshape(-1, *grid)
        if self.head is not None and self.head_source is not None:
            maps[self.head_source] = head_vectors(self.head, captured.tokens).reshape(-1, *grid)
        return maps


def localize(model: nn.Module, data: str | Path, truth: GroundTruth, options: LoopOptions | None = None, *,
             head: ProbeHead | None = None, model_name: str | None = None,
             img_size: int = 224, protocol: BoxProtocol | None = None, threads: int | None = None,
             examples: int = 0, rollout: bool = False, **loop: Any) -> LocalizationResult:
    """MaxBoxAccV2 of the [cls] attention map, (with ``head``) the Selective Aggregation map and (with ``rollout``)
    the attention-rollout map over a folder.

    Args:
        model: a timm ViT (frozen).
        data: an image folder (recursive); images are matched to ``truth`` by path, file name or stem.
        truth: ground-truth boxes (:func:`attnflow.localize.read_boxes`).
        options: the loop's options (:class:`~attnflow.options.LoopOptions`); ``**loop`` overrides them by name.
            ``limit`` evaluates that many evenly spaced images that have boxes.
        head: a trained AbMILP / attentive-probing head of this model (:func:`attnflow.probes.load_head`; its
            ``path`` goes into the provenance and messages).
        model_name: the ``model`` column (default: the preset or architecture).
        img_size: side of the square the whole image is resized to (wsolevaluation: 224).
        protocol: IoU thresholds, score-map thresholds, contour mode and image resampling
            (:class:`~attnflow.localize.metric.BoxProtocol`; default: wsolevaluation's).
        threads: box-search threads (default: ``min(8, CPUs)``).
        examples: number of example images to keep for the figure (main process).
        rollout: also score the attention-rollout map (source ``rollout``: every block's attention, heads
            averaged, ``0.5 * A + 0.5 * I``, multiplied from the first block; the [cls] row, without [cls] the
            mean of the patch rows; :mod:`attnflow.aggregation.rollout`). Off by default: it taps every block.

    Returns:
        The :class:`LocalizationResult`. A resumed run ends with exactly the counts of an uninterrupted one; it
        must have had the same model, weights, images, boxes, head, resolution, autocast, protocol and number of
        processes.

    Raises:
        LocalizationError: a model without [cls], no head and no rollout.
        HeadMismatchError: a head of another model or token width.
        BoxFileError: no image of the folder has a box.
        DataError: no readable image.
        StateFileError, StateMismatchError: with ``resume``, an unreadable state or one of another run.
    """
    options = LoopOptions.of(options, **loop)
    check_img_size(img_size)
    protocol = protocol or BoxProtocol()
    name = run_name(model, model_name)
    capture = MapCapture(model, head, amp=options.amp, device=options.torch_device(),
                         model_name=name, rollout=rollout)
    matched = match_images(data, truth, options.limit)
    dataset = LocalizationImages(matched.paths, fast_transform(resize_transform(model, img_size, protocol.interpolation),
                                                               options.decode, options.torch_device()))
    step = BoxSearch(capture, matched, truth, protocol, (img_size, img_size), threads)
    fingerprint = model_fingerprint(model, name, capture.capture.encoder.amp_dtype, img_size=img_size,
                                    decode=decode_of(dataset.transform),
                                    crop_pct=None, head=weights_fingerprint(head) if head is not None else None,
                                    boxes=step.digest, metric=protocol.describe(),
                                    **({"sources": ",".join(capture.sources)} if rollout else {}))
    analysis = Analysis("localize", step, {**step.accuracies, "sizes": step.sizes}, fingerprint, in_flight=2)
    try:
        run = run_loop(analysis, ImageSource(dataset=dataset, paths=matched.paths, root=Path(data)), options)
    except BaseException:
        step.pool.shutdown(wait=False, cancel_futures=True)  # the searches not yet begun would be thrown away
        raise
    step.pool.shutdown()
    step.warn_sizes(truth)
    result = LocalizationResult(summary_frame(name, step.accuracies, step.labels),
                                curve_frame(name, step.accuracies), _meta(step, run, name, data, dataset, options))
    if examples and run.world.is_main:
        result.examples = collect_examples(capture, dataset, matched.keys, truth, step.accuracies, count=examples,
                                           size=step.size)
    return result


class BoxSearch:
    """The localization step: one forward per batch, then every image's box search in a thread pool; the batch's
    hits, size checks and position count once all its searches are done."""

    def __init__(self, capture: MapCapture, matched: Matched, truth: GroundTruth, protocol: BoxProtocol,
                 size: tuple[int, int], threads: int | None) -> None:
        self.capture, self.matched, self.truth, self.protocol, self.size = capture, matched, truth, protocol, size
        self.digest = truth.fingerprint()  # of the ground-truth boxes, independent of the file's row order
        self.accuracies = {s: BoxAccuracy.of(protocol) for s in capture.sources}
        self.labels = {s: source_label(s) for s in capture.sources}
        self.sizes = SizeCheck()
        self.pool = ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1))

    def __call__(self, batch: ImageBatch) -> _Searching:
        maps = {s: quantize_scoremaps(m, self.size).cpu().numpy() for s, m in self.capture(batch.images).items()}
        check = SizeCheck()
        jobs: list[tuple[str, Future]] = []
        assert batch.sizes is not None  # LocalizationImages gives every image's decoded size
        for i, (index, wh) in enumerate(zip(batch.indices.tolist(), batch.sizes.tolist())):
            key = self.matched.keys[index]
            gt = gt_boxes(self.truth, key, (wh[0], wh[1]), self.size, check, self.matched.paths[index].name)
            jobs += [(s, self.pool.submit(self.accuracies[s].hits_of, maps[s][i], gt)) for s in maps]
        return _Searching(self, jobs, check)

    def warn_sizes(self, truth: GroundTruth) -> None:
        """One warning when images differ in size from what the box file states (after the all-reduce)."""
        n, aspect = int(self.sizes.differ), int(self.sizes.aspect)
        if n:
            log.warning("%d images (first: %s) differ in size from what %s states; their boxes are scaled by the "
                        "file's size%s", n, self.sizes.first[0], truth.path,
                        f" ({aspect} also differ in aspect ratio: cropped images? their boxes are wrong)" if aspect
                        else " (images resized before the run are fine)")


@dataclass
class _Searching:
    """One batch whose box search is under way."""

    search: BoxSearch
    jobs: list[tuple[str, Future]]
    check: SizeCheck

    def wait(self) -> Commit:
        hits = [(source, future.result()) for source, future in self.jobs]  # waits; nothing counted yet

        def commit() -> None:
            for source, image_hits in hits:
                self.search.accuracies[source].add(image_hits)
            self.search.sizes.merge(self.check)
        return commit


def _meta(step: BoxSearch, run: LoopRun, name: str, data: str | Path, dataset: LocalizationImages,
          options: LoopOptions) -> dict[str, Any]:
    """Provenance of a localization run."""
    capture, truth, matched, head = step.capture.capture, step.truth, step.matched, step.capture.head
    return run_provenance(capture.model, name) | run.meta() | {
        "analysis": "object localization, MaxBoxAccV2 (Beyond [cls], Appendix C.3, Table 7 / Fig. 8)",
        "protocol": PROTOCOL, "sources": list(step.accuracies), "labels": step.labels,
        "head": ({"path": step.capture.head_path, "spec": head.spec.name, "meta": getattr(head, "meta", {}) or {}}
                 if head is not None else None),
        "token_block": capture.encoder.block, "attention_block": len(model_blocks(capture.model)) - 1,
        "boxes": {"path": truth.path, "format": truth.format, "images_with_boxes": len(truth),
                  "boxes": truth.n_boxes, "digest": step.digest},
        "data": {"root": str(data), "n_found": matched.n_found, "limit": options.limit,
                 "transform": repr(dataset.transform), "decode": decode_of(dataset.transform)},
        "img_size": step.size[0], **step.protocol.to_meta(),
        "images_without_boxes": len(matched.without_boxes),
        "without_boxes": [str(p) for p in matched.without_boxes[:100]],
        "size_differs_from_box_file": int(step.sizes.differ), "aspect_differs_from_box_file": int(step.sizes.aspect),
        "amp": dtype_name(capture.encoder.amp_dtype),
        "device": str(capture.device),
        **({"rollout": capture.describe_rollout()} if capture.rollout else {})}
