"""One-call figure sets for ``attnflow run`` / ``attnflow demo``: the standard per-block figures and a maps figure."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from ..result import Result
from .blocks import model_sizes, plot_blocks, plot_metrics, plot_size_grid
from .heads import plot_heads
from .info import DataLike, as_result
from .mapfig import plot_attention_maps
from .maps import MAP_KINDS, PatchMaps, model_maps
from .style import PAPER_METRICS, PlotError, close, save_figure

log = logging.getLogger(__name__)


def block_figures(data: DataLike, out_dir: str | Path, *, stem: str = "", metrics: Sequence[str] | None = None,
                  band: str = "heads", formats: Sequence[str] = ("png", "pdf"), per_head: bool = False,
                  by_size: bool | None = None, dpi: int = 200) -> list[Path]:
    """Write the standard per-block figures of a result and return their paths.

    Files (``STEM`` defaults to nothing, ``EXT`` runs over ``formats``):

    * ``STEMmetrics.EXT`` - one panel per metric (the paper's Figs. 3-6 side by side);
    * ``STEM<metric>.EXT`` - one single-column figure per metric (Fig. 3, 4, 5, 6 each);
    * ``STEMsizes.EXT`` - the ViT-S/B/L grid (Figs. 10-13), when the models span several sizes (or
      ``by_size=True``);
    * ``STEMheads-<metric>.EXT`` - block x head heatmaps, with ``per_head=True``.

    Args:
        data: results (see :func:`attnflow.plot.plot_blocks`).
        out_dir: folder (created).
        stem: file name prefix, e.g. ``"vit-b-"``.
        metrics: metrics (default: the paper's four present in the data).
        band: band of the line plots.
        formats: file extensions to write.
        per_head: also write per-head heatmaps.
        by_size: write the size grid (default: when there is more than one model size).
        dpi: PNG resolution.

    Returns:
        Written paths, in the order above.
    """
    result: Result = as_result(data)
    out_dir = Path(out_dir)
    metrics = list(metrics or [m for m in PAPER_METRICS if m in result.metrics] or result.metrics)
    n_sizes = len(set(model_sizes(result).values()))
    jobs: list[tuple[str, Any]] = [("metrics", lambda: plot_metrics(result, metrics, band=band))]
    jobs += [(m, lambda m=m: plot_blocks(result, m, band=band).figure) for m in metrics]
    if by_size or (by_size is None and n_sizes > 1):
        jobs.append(("sizes", lambda: plot_size_grid(result, metrics, band=band)))
    if per_head:
        jobs += [(f"heads-{m}", lambda m=m: plot_heads(result, m)) for m in metrics]
    written: list[Path] = []
    for name, make in jobs:
        fig = make()
        for ext in formats:
            written.append(save_figure(fig, out_dir / f"{stem}{name}.{ext.lstrip('.')}", dpi=dpi))
        close(fig)
    log.info("wrote %d figure files to %s", len(written), out_dir)
    return written


def maps_figure(models: Mapping[str, torch.nn.Module], images: Sequence[Any], *,
                labels: Mapping[str, str] | None = None, img_size: int = 224, crop_pct: float = 0.875,
                kinds: Sequence[str] = MAP_KINDS, rows: str = "images", overlay: bool = True,
                block: int | None = None, title: str | None = None
                ) -> tuple[Figure, list[np.ndarray], dict[str, list[PatchMaps]]]:
    """Per-image maps (Fig. 9) of several loaded models on PIL images, in one figure.

    Args:
        models: display order name -> timm ViT in eval mode.
        images: PIL images.
        labels: name -> display label (default: the name).
        img_size, crop_pct: model input; the same crop for every model so that the maps align.
        kinds, rows, overlay, title: see :func:`attnflow.plot.plot_attention_maps`.
        block: 0-based block (default: the last).

    Returns:
        ``(figure, crops, maps)``: uint8 ``[img_size, img_size, 3]`` crops, ``maps[name]`` one
        :class:`PatchMaps` per image.
    """
    if not models:
        raise PlotError("maps_figure needs at least one model")
    crops: list[np.ndarray] | None = None
    maps: dict[str, list[PatchMaps]] = {}
    for name, model in models.items():
        model_crops, maps[name] = model_maps(model, images, img_size=img_size, crop_pct=crop_pct, block=block)
        crops = crops if crops is not None else model_crops
    assert crops is not None  # set by the first of the (at least one) models
    fig = plot_attention_maps(crops, maps, kinds=kinds, labels=labels, rows=rows, overlay=overlay, title=title)
    return fig, crops, maps
