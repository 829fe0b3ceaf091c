"""Render the figures of an analysis config from its results (and, for ``maps``, from per-image maps)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..maps import PatchMaps
from ..result import Result
from .config import FigureEntry

log = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet_random_init_warnings(on: bool = True) -> Iterator[None]:
    """Silence the plot layer's per-figure random-weights warning inside the block (restored after), for
    commands that print their own banner once."""
    logger = logging.getLogger("attnflow.plot.blocks")
    old = logger.level
    if on:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


@dataclass
class MapsData:
    """What a ``maps`` figure draws: the crops the models saw and each model's maps, one per image.

    Attributes:
        paths: the image files, in row order.
        crops: ``[S, S, 3]`` uint8 crops.
        maps: model id -> one :class:`PatchMaps` per image.
        labels: model id -> legend label.
        random: ids of models with random weights.
    """

    paths: list[Path]
    crops: list[np.ndarray] | None = None
    maps: dict[str, list[PatchMaps]] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    random: list[str] = field(default_factory=list)


def output_files(fig: FigureEntry, out_dir: Path, metrics: Sequence[str] | None = None) -> list[Path]:
    """Files a figure entry writes, as far as they can be named before rendering (for a dry run).

    ``set`` figures also write ``NAME-sizes`` when the models span several sizes; that file is listed only when
    ``by_size`` is set.
    """
    from ..plot.style import PAPER_METRICS

    ms = list(fig.metrics or metrics or PAPER_METRICS)
    if fig.kind == "set":
        parts = ["metrics", *ms] + (["sizes"] if fig.by_size else []) + \
            ([f"heads-{m}" for m in ms] if fig.per_head else [])
        stems = [f"{fig.name}-{p}" for p in parts]
    elif fig.kind == "heads":
        stems = [f"{fig.name}-{m}" for m in ms]
    else:
        stems = [fig.name]
    return [out_dir / f"{s}.{ext}" for s in stems for ext in fig.formats]


def render_stats_figure(fig: FigureEntry, result: Result, out_dir: Path) -> list[Path]:
    """Write one statistics figure (every kind but ``maps``) of ``result``; returns the written files."""
    from ..plot import block_figures, plot_blocks, plot_heads, plot_metrics, plot_size_grid
    from ..plot.style import DOUBLE_COLUMN, PAPER_METRICS, close, metric_label, root_figure, save_figure

    metrics = list(fig.metrics or [m for m in PAPER_METRICS if m in result.metrics] or result.metrics)
    if fig.kind == "set":
        return block_figures(result, out_dir, stem=f"{fig.name}-", metrics=metrics, band=fig.band,
                             formats=fig.formats, per_head=fig.per_head, by_size=fig.by_size, dpi=fig.dpi)
    width = fig.width or DOUBLE_COLUMN
    figures = []
    if fig.kind == "panel":
        figures.append((fig.name, plot_metrics(result, metrics, band=fig.band, width=width, title=fig.title)))
    elif fig.kind == "metric":
        figure = root_figure(plot_blocks(result, metrics[0], band=fig.band, title=fig.title))
        if fig.width:
            figure.set_size_inches(fig.width, figure.get_figheight())
        figures.append((fig.name, figure))
    elif fig.kind == "sizes":
        figures.append((fig.name, plot_size_grid(result, metrics, band=fig.band, width=width, title=fig.title)))
    elif fig.kind == "heads":
        figures += [(f"{fig.name}-{m}", plot_heads(result, m, width=width,
                                                   title=f"{fig.title}: {metric_label(m)}" if fig.title else None))
                    for m in metrics]
    else:  # pragma: no cover  (validated by the config parser)
        raise ValueError(f"not a statistics figure: {fig.kind}")
    written = []
    for stem, figure in figures:
        for ext in fig.formats:
            written.append(save_figure(figure, out_dir / f"{stem}.{ext}", dpi=fig.dpi))
        close(figure)
    return written


def render_maps_figure(fig: FigureEntry, data: MapsData, out_dir: Path) -> list[Path]:
    """Write a ``maps`` figure (PNG unless ``formats`` says otherwise); returns the written files."""
    from ..maps import MAP_KINDS
    from ..plot import plot_attention_maps
    from ..plot.style import RANDOM_INIT_BANNER, close, save_figure

    order = [m for m in (fig.models or list(data.maps)) if m in data.maps]
    labels = {m: data.labels.get(m, m) + (" (random)" if m in data.random else "") for m in order}
    random = [m for m in order if m in data.random]
    title = fig.title
    if random:
        title = f"{RANDOM_INIT_BANNER} ({', '.join(random)})" + (f"\n{title}" if title else "")
    figure = plot_attention_maps(data.crops or [], {m: data.maps[m] for m in order}, kinds=fig.kinds or MAP_KINDS,
                                 labels=labels, rows=fig.rows, overlay=fig.overlay, title=title, warning=bool(random))
    written = [save_figure(figure, out_dir / f"{fig.name}.{ext}", dpi=fig.dpi) for ext in fig.formats]
    close(figure)
    return written
