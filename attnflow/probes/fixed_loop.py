"""The dataset loop of ``attnflow aggregate``: entropy and pairwise KL of fixed aggregation vectors.

One forward of the model (and one of the reference) per batch, every source's vectors from it, a streaming
:class:`attnflow.probes.fixed_stats.AggregationStats`; unreadable images are skipped and counted. Under
``torch.distributed`` each process reads every ``world``-th image and the statistics are summed, so N
processes give what one gives.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ..atomic import write_atomically
from ..options import autocast_dtype
from ..data.images import DataError, ImageFolderDataset, collate_skip_bad
from ..data.transforms import eval_transform
from ..provenance import run_provenance, weights_fingerprint
from ..runstate import (RunState, images_fingerprint, keep_progress, rank_state_path, run_fingerprint,
                        signals_deferred)
from ..tap import TokenLayout
from ..dist import current_world, gather_objects
from .fixed import HEAD_PREFIX, SOURCES, AggregationError, Source, model_label, parse_source, source_label
from .fixed_encode import AggregationCapture, check_head, head_vectors
from .fixed_stats import Q_FLOOR, AggregationStats
from .heads import ProbeHead

log = logging.getLogger(__name__)


@dataclass
class AggregationResult:
    """Statistics of fixed aggregation vectors over a dataset.

    Attributes:
        frame: tidy table, columns :data:`attnflow.probes.fixed_stats.STATS_COLUMNS`.
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
        """Write ``path`` (.parquet), the sibling .csv and the .json sidecar; each file is moved into place
        after it is complete (the parquet last)."""
        path = Path(path)
        parquet = path if path.suffix == ".parquet" else path.with_name(path.name + ".parquet")
        parquet.parent.mkdir(parents=True, exist_ok=True)
        writers = {parquet.with_suffix(".json"): lambda p: p.write_text(json.dumps(self.meta, indent=2,
                                                                                   default=str)),
                   parquet.with_suffix(".csv"): lambda p: self.frame.to_csv(p, index=False),
                   parquet: lambda p: self.frame.to_parquet(p, index=False)}
        write_atomically(writers)
        return parquet


def default_sources(has_cls: bool, reference_name: str | None = None, head: ProbeHead | None = None) -> list[str]:
    """Every source that fits: the model's own (the [cls] ones only with [cls]), the reference's, the head's."""
    out = [s for s in SOURCES if has_cls or s == "central"]
    if reference_name is not None:
        out.append(f"reference:{reference_name}")
    if head is not None:
        out.append(f"{HEAD_PREFIX}{head.spec.name}")
    return out


def reference_mismatch(source: Source, reference_name: str) -> str:
    """The error line for a ``reference:<name>`` source that names another model than the reference given."""
    return (f"source {source.name} names {source.target} but --reference is {reference_name}: its vectors would "
            f"be {reference_name}'s; use reference:{reference_name}")


def aggregation_statistics(model: nn.Module, data: str | Path | Dataset, *, model_name: str = "model",
                           reference: nn.Module | None = None, reference_name: str | None = None,
                           head: ProbeHead | None = None, head_path: str | None = None,
                           sources: Sequence[str] | None = None, batch_size: int = 64,
                           device: torch.device | str | None = None, amp: str = "auto", num_workers: int = 0,
                           img_size: int = 224, crop_pct: float | None = None, limit: int | None = None,
                           progress: bool = True, state_path: str | Path | None = None,
                           checkpoint_every: int = 50, resume: bool = False,
                           keep_state: bool = False) -> AggregationResult:
    """Mean entropy of every source's aggregation vectors and mean KL divergence of every ordered pair.

    Args:
        model: the aggregated timm ViT (e.g. MAE ViT-B/16).
        data: an image folder (read with the model's eval transform at ``img_size`` / ``crop_pct``) or a
            dataset of ``(image, label, index)`` items normalised for ``model`` (:class:`attnflow.data.BadImage`
            items are skipped and counted).
        model_name: the ``model`` column and the label stem (a preset name gives ``MAE``).
        reference: a reference model (e.g. DINO ViT-B/16) with a [cls] token and the same patch grid.
        reference_name: its name (source ``reference:<name>``).
        head: a trained selective-aggregation head (its weights become source ``head:<spec>``); its tokens
            are read as it was trained (``head.meta`` block and layernorm).
        head_path: the head's file, for provenance.
        sources: the sources to compare (default: :func:`default_sources`).
        batch_size, device, amp, num_workers: the loop (device default: CUDA when available).
        img_size, crop_pct: the eval transform for a folder.
        limit: use ``limit`` evenly spaced images of a folder.
        progress: tqdm bar (main process).
        state_path: file for periodic state (one per process under torch.distributed, as
            :func:`~attnflow.runstate.rank_state_path`); with ``resume=True`` an interrupted run continues from
            it. The state is refused when the model, weights, reference, head, sources, images, resolution,
            crop, autocast or number of processes differ; the batch size may change.
        checkpoint_every: batches between state saves.
        resume: continue from ``state_path`` if it exists.
        keep_state: leave the finished run's state in ``state_path`` (the caller removes it once the outputs
            are written; a resume from it returns the same result at once).

    Returns:
        The :class:`AggregationResult`.

    Raises:
        AggregationError: a source that does not fit, a head of another model, a reference of another grid.
        DataError: no readable image.
        StateFileError, StateMismatchError: with ``resume``, an unreadable state or one of another run.
    """
    if checkpoint_every < 1:
        raise AggregationError(f"checkpoint_every must be a positive integer, got {checkpoint_every}")
    world_info = current_world()
    rank, world = world_info.rank, world_info.size
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                         else "cpu")
    meta_head = (getattr(head, "meta", {}) or {}) if head is not None else {}
    capture = AggregationCapture(model, reference=reference, block=meta_head.get("block", -1),
                                 layernorm=meta_head.get("layernorm", False), amp=amp, device=device,
                                 model_name=model_name, reference_name=reference_name or "the reference")
    has_cls = capture.encoder.has_cls
    if head is not None:
        check_head(head, capture, head_path or "the head")
        head = head.to(device).eval()
    names = list(sources) if sources is not None else default_sources(has_cls, reference_name if reference is not None
                                                                       else None, head)
    parsed: list[Source] = [parse_source(s, allow_head=True) for s in names]
    for src in parsed:
        if src.kind == "reference" and reference is None:
            raise AggregationError(f"source {src.name} needs a reference model")
        if src.kind == "reference" and reference_name is not None and src.target != reference_name:
            raise AggregationError(reference_mismatch(src, reference_name))
        if src.kind == "head" and head is None:
            raise AggregationError(f"source {src.name} needs a trained head")
        if src.needs_cls and not has_cls:
            raise AggregationError(f"source {src.name} needs a [cls] token and {model_name} has none")
    if isinstance(data, (str, Path)):
        folder = ImageFolderDataset(data, eval_transform(model, img_size=img_size, crop_pct=crop_pct), limit=limit)
        dataset: Dataset = folder
        data_info: dict[str, Any] = {"root": str(data), "n_found": folder.n_found, "limit": limit,
                                     "transform": repr(folder.transform)}
    else:
        dataset, data_info = data, {"dataset": type(data).__name__}
    n_total = len(dataset)  # type: ignore[arg-type]
    stats = AggregationStats([s.name for s in parsed], device=device)
    state_file = RunState(rank_state_path(Path(state_path), rank, world) if state_path else None, {})
    if state_file.path is not None:
        folder_data = isinstance(dataset, ImageFolderDataset)
        images = images_fingerprint(dataset.paths, dataset.root) if isinstance(dataset, ImageFolderDataset) else None
        state_file.fingerprint = {
            **run_fingerprint(model, model_name, n_items=n_total, world=world, rank=rank,
                              amp=autocast_dtype(amp, device),
                              images=images,
                              img_size=img_size if folder_data else None, crop_pct=crop_pct if folder_data else None),
            "head": weights_fingerprint(head) if head is not None else None,
            "reference": weights_fingerprint(reference) if reference is not None else None,
            "sources": ",".join(s.name for s in parsed)}
    saved = state_file.load() if resume else None
    done = saved["done_items"] if saved else 0  # positions of this process's shard already counted
    skipped: list[tuple[str, str]] = [(str(p), str(r)) for p, r in saved["skipped"]] if saved else []
    layout = TokenLayout(*saved["layout"]) if saved and saved.get("layout") else None
    if saved:
        stats.load_state_dict(saved["reducer"])
        log.info("resuming %s from %s: %d images done", model_name, state_file.path, done)
    positions = list(range(rank, n_total, world))
    loader = DataLoader(Subset(dataset, positions[done:]), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=collate_skip_bad, pin_memory=device.type == "cuda")
    start = time.perf_counter()

    def snapshot() -> dict[str, Any]:
        return {"done_items": done, "reducer": stats.state_dict(), "skipped": list(skipped),
                "layout": (layout.num_prefix, layout.has_cls, layout.grid, layout.patch_size) if layout else None,
                "seconds": (saved or {}).get("seconds", 0.0) + time.perf_counter() - start}

    n_batches = 0
    try:
        for batch in tqdm(loader, desc="aggregate", unit="batch", disable=not (progress and rank == 0)):
            for path, reason in batch.bad:
                log.warning("skipping %s: %s", path, reason)
            vectors: dict[str, torch.Tensor] = {}
            if batch.images.numel():
                captured = capture.capture(batch.images)
                vectors = {s.name: capture.vectors(captured, s, dtype=torch.float64) for s in parsed
                           if s.kind != "head"}
                if head is not None:
                    vectors.update({s.name: head_vectors(head, captured, dtype=torch.float64) for s in parsed
                                    if s.kind == "head"})
            # the batch is complete: only now does the state move on, all at once, so it is always consistent
            with signals_deferred():
                if vectors:
                    stats.update(vectors)
                    layout = captured.layout
                skipped.extend(batch.bad)
                done += batch.images.shape[0] + len(batch.bad)
            n_batches += 1
            if state_file.path is not None and n_batches % checkpoint_every == 0:
                state_file.try_save(snapshot())
    except BaseException as err:
        keep_progress(state_file, snapshot() if done else None, done, err)
        raise
    final = snapshot() if keep_state and state_file.path is not None else None  # before the all-reduce
    elapsed = (saved or {}).get("seconds", 0.0) + time.perf_counter() - start
    stats.all_reduce()
    skipped = gather_objects(skipped)
    layouts = gather_objects([layout] if layout is not None else [])
    if int(stats.count) == 0:
        state_file.remove()  # every file was unreadable: nothing to resume
        raise DataError(f"no readable image among {n_total} ({len(skipped)} unreadable)")
    label = model_label(model, model_name)
    ref_label = model_label(reference, reference_name) if reference is not None else None
    layout = layouts[0]
    meta = {
        **run_provenance(model, model_name),
        "analysis": "fixed token aggregation (Beyond [cls], Appendix C.2, Table 5 / Fig. 7)",
        "sources": [s.name for s in parsed],
        "labels": {s.name: source_label(s, label, ref_label) for s in parsed},
        "reference": ({**run_provenance(reference, reference_name or "reference"),
                       "renormalized": capture.renormalized} if reference is not None else None),
        "head": ({"path": head_path, "spec": head.spec.name, "meta": meta_head} if head is not None else None),
        "token_block": capture.encoder.block, "attention_block": len(model.blocks) - 1,  # type: ignore[arg-type]
        "layernorm": capture.encoder.layernorm,
        "data": data_info, "img_size": img_size, "crop_pct": crop_pct,
        "grid": list(layout.grid), "n_patches": layout.n_patches,
        "images_used": int(stats.count), "images_skipped": len(skipped),
        "skipped": [{"path": p, "reason": r} for p, r in skipped],
        "q_floor": Q_FLOOR, "world_size": world, "amp": amp, "device": str(device),
        "seconds": round(elapsed, 3), "resumed": saved is not None,
    }
    if final is not None:
        state_file.save(final)
    else:
        state_file.remove()
    return AggregationResult(stats.to_frame(model_name), meta)
