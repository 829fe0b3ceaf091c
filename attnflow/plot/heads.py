"""Per-head view: a block x head heatmap of one metric, for seeing which heads differ."""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..limits import check_figure_width
from .blocks import _figure_banner, _select_models
from .info import DataLike, as_result, entropy_bound, model_info
from .style import DOUBLE_COLUMN, ENTROPY_METRICS, PlotError, check_metrics, figure_label, metric_label, paper_style


def head_matrix(data: DataLike, model: str, metric: str) -> pd.DataFrame:
    """The metric of one model as a ``[blocks, heads]`` table (index and columns 0-based, NaN if missing)."""
    result = as_result(data)
    check_metrics([metric], result.metrics)
    _select_models(result, [model])
    sub = result.frame[(result.frame["model"] == model) & (result.frame["metric"] == metric)]
    return sub.pivot(index="block", columns="head", values="mean").sort_index().sort_index(axis=1)


def plot_head_heatmap(data: DataLike, model: str, metric: str, *, ax: Axes | None = None,
                      cmap: str = "viridis", vmin: float | None = None, vmax: float | None = None,
                      annot: bool = False, cbar: bool = True, title: str | None = None) -> Axes:
    """Block x head heatmap of one model's metric (rows: blocks top to bottom; columns: heads; both labelled by
    :func:`~attnflow.plot.style.figure_label`, 1..L and 1..H).

    Args:
        data: see :func:`attnflow.plot.plot_blocks`.
        model: model name (the ``model`` column).
        metric: metric name.
        ax: axes to draw into (a new single-column figure when ``None``).
        cmap: matplotlib colormap.
        vmin, vmax: colour range (default: the data's range; for entropy metrics ``vmax`` defaults to
            ln(N_patches) when the provenance knows N).
        annot: write each value into its cell.
        cbar: draw a colour bar labelled with the metric.
        title: axes title (default: the model's label).

    Returns:
        The axes (a ``QuadMesh`` whose array is the ``[blocks, heads]`` matrix; row 0 is block 0, labelled 1).
    """
    import seaborn as sns

    result = as_result(data)
    matrix = head_matrix(result, model, metric)
    if matrix.isna().all().all():
        raise PlotError(f"{model} has no values of {metric!r}")
    info = model_info(result, model)
    if vmax is None and metric in ENTROPY_METRICS and info.n_patches:
        vmax = max(entropy_bound(info.n_patches), float(np.nanmax(matrix.to_numpy())))
    if ax is None:
        with paper_style():
            _, ax = plt.subplots(figsize=(3.3, 2.8), layout="constrained")
    shown = matrix.rename(index=figure_label, columns=figure_label)
    sns.heatmap(shown, ax=ax, cmap=cmap, vmin=vmin, vmax=vmax, annot=annot, fmt=".2f", square=False,
                cbar=cbar, cbar_kws={"label": metric_label(metric)} if cbar else None,
                annot_kws={"fontsize": 5}, linewidths=0,
                xticklabels=max(1, -(-shown.shape[1] // 6)), yticklabels=max(1, -(-shown.shape[0] // 12)))
    ax.set_xlabel("head")
    ax.set_ylabel("block")
    ax.tick_params(axis="both", length=0)
    ax.set_yticklabels(ax.get_yticklabels(), rotation=0)
    ax.set_xticklabels(ax.get_xticklabels(), rotation=0)
    ax.set_title(info.label if title is None else title)
    return ax


def plot_heads(data: DataLike, metric: str, *, models: Sequence[str] | None = None, ncols: int | None = None,
               width: float = DOUBLE_COLUMN, cmap: str = "viridis", title: str | None = None) -> Figure:
    """One block x head heatmap per model for one metric, all on a shared colour scale.

    Args:
        data: see :func:`attnflow.plot.plot_blocks`.
        metric: metric name.
        models: models to draw (default: every model that has the metric).
        ncols: panels per row (default: up to 5).
        width: figure width in inches.
        cmap: colormap.
        title: figure title (default: the metric's name).

    Returns:
        The figure; the heatmap axes come first in ``fig.axes`` (one per model), then the colour bar.
    """
    check_figure_width(width, allow_none=False)
    result = as_result(data)
    check_metrics([metric], result.metrics)
    chosen = _select_models(result, models)
    sub = result.frame[(result.frame["metric"] == metric) & result.frame["mean"].notna()]
    chosen = [m for m in chosen if m in set(sub["model"])]
    if not chosen:
        raise PlotError(f"no selected model has values of {metric!r}")
    values = sub[sub["model"].isin(chosen)]["mean"].to_numpy()
    vmin, vmax = float(values.min()), float(values.max())
    if metric in ENTROPY_METRICS:
        bounds = [n for m in chosen if (n := model_info(result, m).n_patches)]
        if len(bounds) == len(chosen):
            vmax = max(vmax, max(entropy_bound(n) for n in bounds))
    ncols = ncols or min(len(chosen), 5)
    nrows = -(-len(chosen) // ncols)
    panel = width / ncols
    with paper_style():
        fig, axes = plt.subplots(nrows, ncols, figsize=(width, panel * 1.05 * nrows + 0.3), layout="constrained",
                                 squeeze=False)
        flat = axes.ravel()
        for k, (ax, model) in enumerate(zip(flat, chosen)):
            plot_head_heatmap(result, model, metric, ax=ax, cmap=cmap, vmin=vmin, vmax=vmax, cbar=False)
            if k % ncols:
                ax.set_ylabel("")
        for ax in flat[len(chosen):]:
            ax.remove()
        mappable = flat[0].collections[0]
        fig.colorbar(mappable, ax=list(flat[:len(chosen)]), label=metric_label(metric), shrink=0.9,
                     aspect=30)
        _figure_banner(fig, result, chosen, metric_label(metric) if title is None else title)
    return fig
