"""``aggregation_statistics``: the Table 5 / Fig. 7 statistics of fixed aggregation vectors over a dataset, on the
one loop (:mod:`attnflow.loop`).

Each batch runs the aggregated model once (and the reference once), every source's ``[B, N]`` vectors come from
that forward (:mod:`attnflow.aggregation.vectors`), and :class:`~attnflow.aggregation.statistics.AggregationStats`
sums their entropies and pairwise KL divergences; the loop shards, resumes and all-reduces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from ..data.decode import decode_of
from ..data.sources import image_source
from ..data.transforms import eval_transform
from ..loop import Analysis, LayoutRecord, LoopRun, Ready, run_loop
from ..limits import check_crop_pct, check_img_size
from ..options import LoopOptions, dtype_name
from ..probes.backbone import check_head
from ..probes.heads import ProbeHead
from ..provenance import run_name, run_provenance, weights_fingerprint
from ..result import write_table
from ..runstate import model_fingerprint
from ..vit import model_blocks
from .capture import RULES_VERSION, AggregationCapture
from .sources import (AggregationError, Source, default_sources, model_label, parse_source, reference_mismatch,
                      source_label)
from .statistics import Q_FLOOR, AggregationStats
from .vectors import head_vectors


@dataclass
class AggregationResult:
    """Statistics of fixed aggregation vectors over a dataset.

    Attributes:
        frame: tidy table, columns :data:`STATS_COLUMNS`.
        meta: provenance (model, reference, head, data, images used and skipped, labels of the sources).
    """

    frame: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def sources(self) -> list[str]:
        return list(self.meta.get("sources", []))

    @property
    def labels(self) -> dict[str, str]:
        """Source -> the paper's Table 5 name."""
        return dict(self.meta.get("labels", {}))

    def write(self, path: str | Path) -> Path:
        """Write ``path`` (.parquet), the sibling .csv and the .json sidecar, all or nothing (see
        :func:`attnflow.result.write_table`); returns the parquet path."""
        return write_table(path, self.frame, self.meta)


def aggregation_statistics(model: nn.Module, data: str | Path | Dataset, options: LoopOptions | None = None, *,
                           reference: nn.Module | None = None, reference_name: str | None = None,
                           head: ProbeHead | None = None,
                           sources: Sequence[str] | None = None, img_size: int = 224, crop_pct: float | None = None,
                           model_name: str | None = None, **loop: Any) -> AggregationResult:
    """Mean entropy of every source's aggregation vectors and mean KL divergence of every ordered pair.

    Args:
        model: the aggregated timm ViT (e.g. MAE ViT-B/16).
        data: an image folder (read with the model's eval transform at ``img_size`` / ``crop_pct``) or a
            dataset of ``(image, label, index)`` items normalised for ``model`` (:class:`attnflow.data.BadImage`
            items are skipped and counted).
        options: the loop's options (:class:`~attnflow.options.LoopOptions`); ``**loop`` overrides them by name.
        reference: a reference model (e.g. DINO ViT-B/16) with a [cls] token and the same patch grid.
        reference_name: its name (source ``reference:<name>``).
        head: a trained selective-aggregation head (its weights become source ``head:<spec>``); its tokens
            are read as it was trained (``head.meta`` block and layernorm).
        sources: the sources to compare (default: :func:`~attnflow.aggregation.sources.default_sources`);
            ``rollout`` (attention rollout, :mod:`attnflow.aggregation.rollout`) is not a default: it taps every
            block of the one forward (un-fused attention) and multiplies the blocks' maps in float64.
        img_size, crop_pct: the eval transform for a folder.
        model_name: the ``model`` column and the label stem (a preset name gives ``MAE``); default the preset.

    Returns:
        The :class:`AggregationResult`. A resumed run must have had the same model, weights, reference, head,
        sources, images, resolution, crop, autocast and number of processes (the batch size may change).

    Raises:
        AggregationError: a source that does not fit, a reference of another grid.
        HeadMismatchError: a head of another model or token width.
        DataError: no readable image.
        StateFileError, StateMismatchError: with ``resume``, an unreadable state or one of another run.
    """
    options = LoopOptions.of(options, **loop)
    check_crop_pct(crop_pct)
    check_img_size(img_size)
    device = options.torch_device()
    name = run_name(model, model_name)
    step = AggregationStep(model, reference, reference_name, head, device, options.amp, name)
    parsed = step.resolve(sources)
    folder = isinstance(data, (str, Path))
    source = image_source(data, transform=eval_transform(model, img_size=img_size, crop_pct=crop_pct) if folder
                          else None, limit=options.limit, batch_size=options.batch_size, decode=options.decode,
                          device=device)
    decode = decode_of(getattr(source.dataset, "transform", None)) if folder else None
    fingerprint = model_fingerprint(
        model, name, step.capture.encoder.amp_dtype, decode=decode, img_size=img_size if folder else None,
        crop_pct=crop_pct if folder else None, sources=",".join(s.name for s in parsed), rules=RULES_VERSION,
        head=weights_fingerprint(head) if head is not None else None,
        reference=weights_fingerprint(reference) if reference is not None else None)
    run = run_loop(Analysis("aggregate", step, {"stats": step.stats, "layout": step.layouts}, fingerprint),
                   source, options)
    meta = run_provenance(model, name) | run.meta() | step.describe(run, img_size, crop_pct) | {
        "data": {"root": str(data), "n_found": getattr(source.dataset, "n_found", None), "limit": options.limit,
                 "transform": repr(getattr(source.dataset, "transform", None)), "decode": decode} if folder
        else {"dataset": type(data).__name__}}
    return AggregationResult(step.stats.to_frame(name), meta)


class AggregationStep:
    """One forward of the model (and one of the reference) per batch -> every source's ``[B, N]`` vectors, added
    to :attr:`stats` when the loop commits the batch."""

    def __init__(self, model: nn.Module, reference: nn.Module | None, reference_name: str | None,
                 head: ProbeHead | None, device: torch.device, amp: str, name: str) -> None:
        meta_head = (getattr(head, "meta", {}) or {}) if head is not None else {}
        self.capture = AggregationCapture(model, reference=reference, block=meta_head.get("block", -1),
                                          layernorm=meta_head.get("layernorm", False), amp=amp, device=device,
                                          model_name=name, reference_name=reference_name or "the reference")
        if head is not None:
            check_head(head, self.capture.encoder, head.path or "the head", name)
            head = head.to(device).eval()
        self.head, self.head_path = head, head.path if head is not None else None
        self.name, self.reference_name = name, reference_name
        self.layouts = LayoutRecord()
        self.stats: AggregationStats
        self.sources: list[Source] = []

    def resolve(self, names: Sequence[str] | None) -> list[Source]:
        """Parse and check the sources (default: every one that fits); builds :attr:`stats`.

        Raises:
            AggregationError: a source that needs a reference, a head or a [cls] token this run lacks.
        """
        has_cls, reference = self.capture.encoder.has_cls, self.capture.reference
        if names is None:
            names = default_sources(has_cls, self.reference_name if reference is not None else None, self.head)
        self.sources = [parse_source(s, allow_head=True) for s in names]
        for src in self.sources:
            if src.kind == "reference" and reference is None:
                raise AggregationError(f"source {src.name} needs a reference model")
            if src.kind == "reference" and self.reference_name is not None and src.target != self.reference_name:
                raise AggregationError(reference_mismatch(src, self.reference_name))
            if src.kind == "head" and self.head is None:
                raise AggregationError(f"source {src.name} needs a trained head")
            if src.needs_cls and not has_cls:
                raise AggregationError(f"source {src.name} needs a [cls] token and {self.name} has none")
        self.capture.rollout = any(s.needs_every_block for s in self.sources)  # every block tapped only then
        self.stats = AggregationStats([s.name for s in self.sources], device=self.capture.device)
        return self.sources

    def __call__(self, batch: Any) -> Ready:
        captured = self.capture.capture(batch.images)
        vectors = {s.name: (head_vectors(self.head, captured.tokens, dtype=torch.float64) if s.kind == "head"
                            else self.capture.vectors(captured, s, dtype=torch.float64)) for s in self.sources}

        def commit() -> None:
            self.stats.update(vectors)
            self.layouts.add(captured.layout)
        return Ready(commit)

    def describe(self, run: LoopRun, img_size: int, crop_pct: float | None) -> dict[str, Any]:
        """Provenance of the aggregation run."""
        capture, layout = self.capture, self.layouts.layout
        label = model_label(capture.model, self.name)
        reference = capture.reference
        ref_label = model_label(reference, self.reference_name) if reference is not None else None
        assert layout is not None  # the loop read at least one image
        return {
            "analysis": "fixed token aggregation (Beyond [cls], Appendix C.2, Table 5 / Fig. 7)",
            "sources": [s.name for s in self.sources], "rules": RULES_VERSION,
            "labels": {s.name: source_label(s, label, ref_label) for s in self.sources},
            "reference": ({**run_provenance(reference, self.reference_name or "reference"),
                           "renormalized": capture.renormalized} if reference is not None else None),
            "head": ({"path": self.head_path, "spec": self.head.spec.name,
                      "meta": getattr(self.head, "meta", {}) or {}} if self.head is not None else None),
            "token_block": capture.encoder.block, "attention_block": len(model_blocks(capture.model)) - 1,
            "layernorm": capture.encoder.layernorm, "img_size": img_size, "crop_pct": crop_pct,
            "grid": list(layout.grid), "n_patches": layout.n_patches, "q_floor": Q_FLOOR,
            "amp": dtype_name(capture.encoder.amp_dtype), "device": str(capture.device),
            **({"rollout": capture.describe_rollout()} if capture.rollout else {})}
