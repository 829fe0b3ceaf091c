"""Per-block comparison plots (the paper's Figs. 3-6 and 10-13).

x = block (numbered from 1 by :func:`~attnflow.plot.style.figure_label`; the data's blocks are 0-based), y = a
metric averaged over heads, one line per model, an optional band for the spread over heads or over images, models
coloured by family, and the entropy bound ln(N_patches) as a dashed line.

Example::

    from attnflow.plot import plot_blocks, plot_metrics, save_figure
    ax = plot_blocks(result, "cls_patch_entropy", band="heads")
    save_figure(plot_metrics(result), "figures/fig3_6.pdf")
"""

from __future__ import annotations

import difflib
import logging
from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.artist import Artist

from ..limits import check_figure_width
from ..result import Result
from .info import SIZE_ORDER, DataLike, ModelInfo, as_result, entropy_bound, model_info, random_init_models
from .style import (DOUBLE_COLUMN, ENTROPY_METRICS, PAPER_METRICS, RANDOM_INIT_BANNER, SINGLE_COLUMN, PlotError,
                    check_metrics, figure_label, metric_label, panel_title, paper_style)

log = logging.getLogger(__name__)

BANDS: tuple[str, ...] = ("heads", "heads-std", "images", "none")
"""Band choices: min-max over heads, +-1 std over heads, +-1 std over images (mean over heads of the
per-head std), or no band."""

SHORT_YLABELS: dict[str, str] = {
    "cls_self": "attention",
    "cls_patch_entropy": "entropy [nats]",
    "patch_self": "relative self-attention",
    "patch_patch_entropy": "entropy [nats]",
    "cls_patch_mass": "attention mass",
    "patch_cls": "attention",
    "attention_distance": "distance [px]",
}
"""Y-axis labels of multi-panel figures, whose panel titles carry the metric name."""

_DASHES: tuple[str, ...] = ("-", "--", ":", "-.")
BOUND_STYLE: dict[str, Any] = dict(color="0.35", linestyle=(0, (4, 2)), linewidth=0.8, zorder=1)
"""Style of the ln(N_patches) bound line."""


def block_frame(result: Result, metric: str, band: str = "heads") -> pd.DataFrame:
    """Head-averaged metric per (model, block) with the band limits.

    Args:
        result: statistics.
        metric: metric name.
        band: one of :data:`BANDS`.

    Returns:
        Columns ``model, block`` (0-based), ``x`` (the block's :func:`figure_label`: its x position), ``value``
        (mean over heads of the per-head mean over images), ``lo``, ``hi`` (band limits, NaN for
        ``band="none"``). Blocks whose heads are all NaN (e.g. [cls] metrics of a model without [cls]) are
        dropped.
    """
    if band not in BANDS:
        raise PlotError(f"unknown band {band!r}; choose one of {', '.join(BANDS)}")
    sub = result.frame[result.frame["metric"] == metric].dropna(subset=["mean"])
    grouped = sub.groupby(["model", "block"], sort=False)
    out = grouped["mean"].agg(value="mean", lo_heads="min", hi_heads="max", sd_heads=lambda s: s.std(ddof=0))
    out["sd_images"] = grouped["std"].mean()
    out = out.reset_index()
    if band == "heads":
        out["lo"], out["hi"] = out["lo_heads"], out["hi_heads"]
    elif band == "heads-std":
        out["lo"], out["hi"] = out["value"] - out["sd_heads"], out["value"] + out["sd_heads"]
    elif band == "images":
        out["lo"], out["hi"] = out["value"] - out["sd_images"], out["value"] + out["sd_images"]
    else:
        out["lo"] = out["hi"] = np.nan
    out["x"] = out["block"].map(figure_label)
    return out.loc[:, ["model", "block", "x", "value", "lo", "hi"]].sort_values(["model", "block"], kind="stable")


def _select_models(result: Result, models: Sequence[str] | None) -> list[str]:
    available = result.models
    if models is None:
        return available
    for m in models:
        if m not in available:
            close = difflib.get_close_matches(m, available, n=3, cutoff=0.4)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise PlotError(f"model {m!r} is not in the data (it has {', '.join(available)}){hint}")
    return list(models)


def block_ticks(n_blocks: int, max_ticks: int = 12) -> list[int]:
    """Tick positions (figure labels, :func:`figure_label`) for ``n_blocks`` blocks: every block when they fit,
    else the first block and multiples of a step (1, 3, 6, 9, 12 for 12 blocks)."""
    first, last = figure_label(0), figure_label(n_blocks - 1)
    if n_blocks <= max_ticks:
        return list(range(first, last + 1))
    for step in (3, 4, 6, 8, 12, 16, 24, 32):
        ticks = [first] + [t for t in range(step, last + 1, step) if t > first]
        if len(ticks) <= max_ticks:
            return ticks
    return [first, last]


def _ax_width_in(ax: Axes) -> float:
    """Width of ``ax`` in inches; its position is a fraction of its figure or sub-figure."""
    fig = ax.figure
    fig_width = fig.get_figwidth() if isinstance(fig, Figure) else fig.bbox.width / fig.figure.dpi
    return ax.get_position().width * fig_width


def plot_blocks(data: DataLike, metric: str, *, ax: Axes | None = None, band: str = "heads",
                models: Sequence[str] | None = None, n_patches: int | None = None, label_by: str = "label",
                legend: bool | dict[str, Any] = True, ylabel: str | None = None,
                title: str | None = None, banner: bool = True) -> Axes:
    """One metric per block, one line per model (the paper's Figs. 3-6).

    Args:
        data: a :class:`Result`, a tidy DataFrame (columns of :data:`attnflow.result.COLUMNS`), result file
            path(s), or a list of results.
        metric: metric name, e.g. ``"cls_patch_entropy"``.
        ax: axes to draw into (a new single-column figure when ``None``).
        band: spread drawn around each line, one of :data:`BANDS`.
        models: models to draw, in this order (default: all, in order of appearance).
        n_patches: number of patch tokens for the entropy bound (default: each run's provenance).
        label_by: ``"label"`` (e.g. "MAE ViT-B/16") or ``"method"`` (e.g. "MAE") for the legend.
        legend: draw a legend below the axes (a dict: keyword arguments of ``Axes.legend``, e.g.
            ``{"loc": "lower left"}`` to place it inside).
        ylabel: y-axis label (default: the paper's name of the metric).
        title: axes title (default: none).
        banner: stamp "RANDOM-INIT WEIGHTS" across the axes when a drawn run had random weights.

    Returns:
        The axes. Each model is one ``Line2D`` labelled with its legend text and ``gid`` = model name; bands
        are ``PolyCollection`` s; the bound is a ``Line2D`` with ``gid="bound"``.

    Raises:
        PlotError: unknown metric, model or band, or a metric no selected model has.
    """
    result = as_result(data)
    check_metrics([metric], result.metrics)
    chosen = _select_models(result, models)
    frame = block_frame(result, metric, band)
    frame = frame[frame["model"].isin(chosen)]
    if frame.empty:
        raise PlotError(f"no model among {', '.join(chosen)} has values of {metric!r} "
                        "(a [cls] metric of models without [cls]?)")
    if ax is not None:
        _draw_blocks(ax, result, frame, metric, chosen, band=band, n_patches=n_patches, label_by=label_by,
                     legend=legend, ylabel=ylabel, title=title, banner=banner)
        return ax
    with paper_style():
        _, ax = plt.subplots(figsize=(SINGLE_COLUMN, 2.7 if legend else 2.2), layout="constrained")
        _draw_blocks(ax, result, frame, metric, chosen, band=band, n_patches=n_patches, label_by=label_by,
                     legend=legend, ylabel=ylabel, title=title, banner=banner)
    return ax


def _draw_blocks(ax: Axes, result: Result, frame: pd.DataFrame, metric: str, chosen: Sequence[str], *,
                 band: str, n_patches: int | None, label_by: str, legend: bool | dict[str, Any],
                 ylabel: str | None, title: str | None, banner: bool = True) -> None:
    infos: list[ModelInfo] = []
    used_colours: dict[str, int] = {}
    for model in chosen:
        rows = frame[frame["model"] == model]
        if rows.empty:
            log.info("%s has no values of %s; left out of the plot", model, metric)
            continue
        info = model_info(result, model)
        infos.append(info)
        nth = used_colours.get(info.color, 0)
        used_colours[info.color] = nth + 1
        label = info.method if label_by == "method" else info.label
        x, y = rows["x"].to_numpy(), rows["value"].to_numpy()
        ax.plot(x, y, color=info.color, marker=info.marker, linestyle=_DASHES[nth % len(_DASHES)],
                markersize=3.0 if len(x) <= 16 else 2.0, label=label, gid=model, zorder=3)
        if band != "none":
            ax.fill_between(x, rows["lo"].to_numpy(), rows["hi"].to_numpy(), color=info.color, alpha=0.15,
                            linewidth=0, zorder=2, gid=f"band:{model}")
    if metric in ENTROPY_METRICS:
        _draw_bounds(ax, [n_patches] if n_patches else [i.n_patches for i in infos])
    n_blocks = int(frame["block"].max()) + 1
    ax.set_xticks(block_ticks(n_blocks, max(4, int(_ax_width_in(ax) / 0.25))))
    ax.set_xlim(figure_label(0) - 0.5, figure_label(n_blocks - 1) + 0.5)
    ax.set_xlabel("block")
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_ylabel(metric_label(metric) if ylabel is None else ylabel)
    if banner and (random := random_init_models(result, [i.name for i in infos])):
        ax.text(0.5, 0.5, "RANDOM-INIT WEIGHTS\nnumbers are meaningless", transform=ax.transAxes, ha="center",
                va="center", color="#c00000", alpha=0.35, fontsize=9, fontweight="bold", zorder=0, gid="banner")
        log.warning("plotting runs with random weights: %s", ", ".join(random))
    if title:
        ax.set_title(title)
    if legend:
        n_entries = len(ax.get_legend_handles_labels()[1])
        below = {"loc": "upper center", "bbox_to_anchor": (0.5, -0.22), "ncol": 2 if n_entries > 3 else n_entries}
        ax.legend(**(below | (legend if isinstance(legend, dict) else {})))


def _draw_bounds(ax: Axes, n_patches: list[int | None]) -> None:
    known = sorted({n for n in n_patches if n})
    if not known:
        log.info("no n_patches in the runs' provenance; the entropy bound is not drawn (pass n_patches=)")
        return
    for n in known:
        ax.axhline(entropy_bound(n), **BOUND_STYLE, label=f"max. entropy ln({n})", gid="bound")


def _balanced_columns(n: int, max_cols: int) -> int:
    """Columns for ``n`` legend entries in as few rows as ``max_cols`` allow, the rows filled evenly."""
    rows = -(-n // max_cols)
    return -(-n // rows)


def _figure_legend(fig: Figure, axes: Sequence[Axes], ncol: int | None = None) -> None:
    """One legend below all panels, with each label once (models first, bounds last).

    Without ``ncol``, up to 6 columns with evenly filled rows, fewer when the legend would be wider than the
    figure (a tight bounding box would then widen the saved file past the paper's column width).
    """
    seen: dict[str, Artist] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    labels = sorted(seen, key=lambda s: s.startswith("max. entropy"))
    if not labels:
        return
    get_renderer = getattr(fig.canvas, "get_renderer", None)
    for max_cols in ([ncol] if ncol else range(min(len(labels), 6), 0, -1)):
        legend = fig.legend([seen[k] for k in labels], labels, loc="outside lower center",
                            ncol=_balanced_columns(len(labels), max_cols))
        if ncol or max_cols == 1 or get_renderer is None or \
                legend.get_window_extent(get_renderer()).width <= fig.bbox.width:
            return
        legend.remove()


def _figure_banner(fig: Figure, result: Result, models: Sequence[str] | None, title: str | None) -> None:
    """The figure title, led by a red random-weights warning when any drawn run had random weights."""
    random = random_init_models(result, models)
    if random:
        log.warning("plotting runs with random weights: %s", ", ".join(random))
        text = RANDOM_INIT_BANNER + (f"\n{title}" if title else "")
        fig.suptitle(text, color="#c00000", fontweight="bold")
    elif title:
        fig.suptitle(title)


def plot_metrics(data: DataLike, metrics: Sequence[str] | None = None, *, band: str = "heads",
                 models: Sequence[str] | None = None, n_patches: int | None = None, ncols: int | None = None,
                 width: float = DOUBLE_COLUMN, panel_height: float | None = None,
                 title: str | None = None) -> Figure:
    """One panel per metric (default: the paper's four present in the data) with a shared legend below.

    Args:
        data: see :func:`plot_blocks`.
        metrics: metrics, one panel each (default: :data:`PAPER_METRICS` that the data has).
        band, models, n_patches: as in :func:`plot_blocks`.
        ncols: panels per row (default: up to 4 at double-column width, 2 at single-column width).
        width: figure width in inches (:data:`DOUBLE_COLUMN` or :data:`SINGLE_COLUMN`).
        panel_height: height of one panel row in inches (default: from the panel width).
        title: figure title.

    Returns:
        The figure; ``fig.axes`` are the panels in metric order.
    """
    check_figure_width(width, allow_none=False)
    result = as_result(data)
    metrics = _default_metrics(result, metrics)
    ncols = ncols or min(len(metrics), 4 if width > 5 else 2)
    nrows = -(-len(metrics) // ncols)
    panel_w = width / ncols
    panel_height = panel_height or max(1.5, min(2.2, panel_w * 0.95))
    with paper_style():
        fig, axes = plt.subplots(nrows, ncols, figsize=(width, panel_height * nrows + 0.45),
                                 layout="constrained", squeeze=False)
        flat = axes.ravel()
        for ax, metric in zip(flat, metrics):
            plot_blocks(result, metric, ax=ax, band=band, models=models, n_patches=n_patches, legend=False,
                        ylabel=SHORT_YLABELS.get(metric, ""), title=panel_title(metric), banner=False)
        for ax in flat[len(metrics):]:
            ax.remove()
        _figure_legend(fig, list(flat[:len(metrics)]))
        _figure_banner(fig, result, models, title)
    return fig


def _default_metrics(result: Result, metrics: Sequence[str] | None) -> list[str]:
    if metrics is None:
        metrics = [m for m in PAPER_METRICS if m in result.metrics] or result.metrics
    metrics = list(metrics)
    if not metrics:
        raise PlotError("nothing to plot: the data has no metrics")
    check_metrics(metrics, result.metrics)
    return metrics


def model_sizes(result: Result, models: Sequence[str] | None = None) -> dict[str, str]:
    """Size (``"S"``, ``"B"``, ...) of each model, from its preset, provenance or name."""
    return {m: model_info(result, m).size for m in (models or result.models)}


def plot_size_grid(data: DataLike, metrics: Sequence[str] | None = None, *, sizes: Sequence[str] | None = None,
                   band: str = "heads", models: Sequence[str] | None = None, transpose: bool = False,
                   width: float = DOUBLE_COLUMN, panel_height: float | None = None,
                   title: str | None = None) -> Figure:
    """Grid over model sizes (the paper's Figs. 10-13): rows = metrics, columns = ViT-S/B/L.

    Lines are labelled by method, so a method has one legend entry and one colour across sizes.

    Args:
        data: see :func:`plot_blocks`.
        metrics: one row each (default: the paper's four present in the data).
        sizes: column order (default: every size in the data, smallest first).
        band, models: as in :func:`plot_blocks`.
        transpose: rows = sizes and columns = metrics instead.
        width: figure width in inches.
        panel_height: height of one panel in inches.
        title: figure title.

    Returns:
        The figure; ``fig.axes`` row by row.
    """
    check_figure_width(width, allow_none=False)
    result = as_result(data)
    metrics = _default_metrics(result, metrics)
    chosen = _select_models(result, models)
    size_of = model_sizes(result, chosen)
    present = sorted(set(size_of.values()), key=lambda s: SIZE_ORDER.index(s) if s in SIZE_ORDER else 99)
    sizes = list(sizes or present)
    missing = [s for s in sizes if s not in present]
    if missing:
        raise PlotError(f"no model of size {', '.join(missing)} in the data (sizes: {', '.join(present)})")
    cells = [(m, s) for m in metrics for s in sizes]
    nrows, ncols = (len(sizes), len(metrics)) if transpose else (len(metrics), len(sizes))
    panel_height = panel_height or max(1.3, min(1.8, width / ncols * 0.7))
    with paper_style():
        fig, axes = plt.subplots(nrows, ncols, figsize=(width, panel_height * nrows + 0.45),
                                 layout="constrained", squeeze=False, sharex="col" if transpose else False,
                                 sharey="col" if transpose else "row")
        for metric, size in cells:
            i, j = metrics.index(metric), sizes.index(size)
            ax = axes[j, i] if transpose else axes[i, j]
            in_size = [m for m in chosen if size_of[m] == size]
            has = set(result.frame.loc[(result.frame["metric"] == metric) & result.frame["mean"].notna(), "model"])
            if not any(m in has for m in in_size):
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.5")
                ax.tick_params(labelbottom=False, labelleft=False, length=0)  # its own 0..1 axis means nothing
                ax.grid(False)
            else:
                plot_blocks(result, metric, ax=ax, band=band, models=[m for m in in_size if m in has],
                            label_by="method", legend=False, ylabel="", banner=False)
            first_row, first_col = (j == 0, i == 0) if transpose else (i == 0, j == 0)
            if first_row:
                ax.set_title(panel_title(metric) if transpose else f"ViT-{size}")
            if first_col:
                ax.set_ylabel(f"ViT-{size}" if transpose else panel_title(metric))
            if (j if transpose else i) < nrows - 1:
                ax.set_xlabel("")
        _figure_legend(fig, list(axes.ravel()))
        _figure_banner(fig, result, chosen, title)
    return fig
