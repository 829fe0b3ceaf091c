"""Mean KL divergence between the aggregation vectors of token aggregation approaches (paper Fig. 7)."""

from __future__ import annotations

import textwrap
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes

from ..aggregation.statistics import kld_matrix
from .style import RANDOM_INIT_BANNER, SINGLE_COLUMN, PlotError, paper_style


def plot_kld_heatmap(data: pd.DataFrame, *, labels: Mapping[str, str] | None = None,
                     sources: Sequence[str] | None = None, ax: Axes | None = None, cmap: str = "mako_r",
                     annot: bool = True, cbar: bool = True, title: str | None = None,
                     random_init: bool = False) -> Axes:
    """Heatmap of the mean ``KL(row || column)`` between approaches' aggregation vectors.

    Args:
        data: a statistics table (columns ``metric, source, target, mean``, e.g. from ``attnflow aggregate``)
            or a square matrix (index = p sources, columns = q sources).
        labels: display name of each source (default: the source names).
        sources: the order of rows and columns (default: the table's).
        ax: axes to draw into (a new figure when ``None``).
        cmap: colormap.
        annot: write each value (2 decimals) into its cell.
        cbar: draw a colour bar.
        title: axes title.
        random_init: the statistics come from random weights: the title says so, in red.

    Returns:
        The axes (its ``QuadMesh`` array is the ``[S, S]`` matrix in ``sources`` order).

    Raises:
        PlotError: no KLD rows, or a requested source without values.
    """
    import seaborn as sns

    if {"metric", "source", "target", "mean"} <= set(data.columns):
        rows = data[data["metric"] == "kld"]
        if rows.empty:
            raise PlotError("the table has no kld rows (metric == 'kld')")
        matrix = kld_matrix(rows)
        order = list(sources) if sources is not None else list(matrix.index)
    else:
        matrix = data
        order = list(sources) if sources is not None else list(matrix.index)
    missing = [s for s in order if s not in matrix.index or s not in matrix.columns]
    if missing:
        raise PlotError(f"no KLD values for source(s) {', '.join(missing)}; the table has "
                        f"{', '.join(map(str, matrix.index))}")
    matrix = matrix.reindex(index=order, columns=order).astype(float)
    names = [textwrap.fill((labels or {}).get(s, s), 24) for s in order]
    shown = pd.DataFrame(matrix.to_numpy(), index=names, columns=names)
    if ax is None:
        side = max(SINGLE_COLUMN, 0.9 * len(order) + 1.4)
        with paper_style():
            _, ax = plt.subplots(figsize=(side, 0.8 * side), layout="constrained")
    top = float(np.nanmax(shown.to_numpy()))
    sns.heatmap(shown, ax=ax, cmap=cmap, vmin=0.0, vmax=top or 1.0, annot=annot, fmt=".2f" if top >= 0.05 else ".1e",
                square=True, cbar=cbar, cbar_kws={"label": "mean KLD"} if cbar else None,
                annot_kws={"fontsize": 6}, linewidths=0.5, linecolor="white")
    ax.set_xlabel("q")
    ax.set_ylabel("p   (KL(p || q))")
    ax.tick_params(axis="both", length=0)
    ax.set_xticklabels(ax.get_xticklabels(), rotation=35, ha="right")
    ax.set_yticklabels(ax.get_yticklabels(), rotation=0)
    heading = "\n".join(t for t in (RANDOM_INIT_BANNER if random_init else None, title) if t)
    if heading:
        ax.set_title(heading, color="#c00000" if random_init else None, fontweight="bold" if random_init else None)
    return ax
