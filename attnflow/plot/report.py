"""One-call figure set for ``attnflow run`` / ``attnflow demo``: the standard per-block figures."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from ..limits import check_dpi
from ..result import Result
from .blocks import model_sizes, plot_blocks, plot_metrics, plot_size_grid
from .heads import plot_heads
from .info import DataLike, as_result
from .style import PAPER_METRICS, close, save_figure

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
    check_dpi(dpi)
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
