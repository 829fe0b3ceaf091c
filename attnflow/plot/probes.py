"""Probe accuracy per block: top-1 of [cls], average pooling and AbMILP heads trained on each block's tokens, drawn
as :mod:`attnflow.plot.blocks` draws the attention statistics (Figs. 3-6), and next to them.

The paper's Sec. 6 outlook asks whether Selective Aggregation of internal blocks helps; ``attnflow probe`` with
``blocks`` trains every head on every listed block (run tables with a 0-based ``block`` column), and these plots
show the answer against block, on the axes conventions of the attention figures: x = block numbered from 1
(:func:`~attnflow.plot.style.figure_label`), ticks from :func:`~attnflow.plot.blocks.block_ticks`.

Each point is a (model, block, head)'s validation top-1 at the lr its runs kept, averaged over seeds (the value
``attnflow table`` shows, :func:`attnflow.probes.summary.summarize` with ``by_block=True``); the band is +-1 std
over seeds. Lines are coloured by head (one colour per aggregation in every figure); several models get their own
dash pattern.

Example::

    from attnflow.plot import plot_blocks_with_probes, plot_probe_blocks, save_figure
    ax = plot_probe_blocks("runs/probe-blocks-mae")                      # one run directory
    fig = plot_blocks_with_probes("runs/paper/stats", "runs/probe-blocks-mae", metrics=["cls_patch_entropy"])
    save_figure(fig, "figures/blocks-probes.pdf")
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence, Union

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .blocks import (_DASHES, SHORT_YLABELS, _ax_width_in, _default_metrics, _figure_banner, _figure_legend,
                     block_ticks, plot_blocks)
from .info import DataLike, as_result, random_init_models
from .style import DOUBLE_COLUMN, RANDOM_INIT_BANNER, SINGLE_COLUMN, PlotError, figure_label, panel_title, paper_style

log = logging.getLogger(__name__)

PROBE_HEADS: tuple[str, ...] = ("cls", "avg", "abmilp")
"""The heads a per-block probe figure draws by default: [cls], average pooling and AbMILP (Selective
Aggregation)."""

HEAD_LABELS: dict[str, str] = {"cls": "[cls]", "avg": "avg. pooling", "abmilp": "AbMILP",
                               "abmilp+cls": "AbMILP + [cls]", "both": "[cls] + avg", "ap1": "attentive (1 head)",
                               "ap12": "attentive (12 heads)"}
"""Legend text of a head (other heads show their spec)."""

HEAD_STYLES: dict[str, tuple[str, str]] = {"cls": ("#000000", "v"), "avg": ("#00897b", "X"),
                                           "abmilp": ("#e6ab02", "*"), "abmilp+cls": ("#a6761d", "P"),
                                           "both": ("#666666", "<"), "ap1": ("#1b9e77", ">"),
                                           "ap12": ("#e7298a", "h")}
"""Colour and marker of a head; the same in every figure, and (for the default heads) neither a colour nor a
marker of the model families (:data:`~attnflow.plot.FAMILY_PALETTES`, :data:`~attnflow.plot.FAMILY_MARKERS`), so a
probe line never reads as a model's line in a figure that has both."""

_OTHER_STYLES: tuple[tuple[str, str], ...] = (("#17becf", "<"), ("#bcbd22", ">"), ("#e377c2", "h"))

ProbeData = Union[pd.DataFrame, str, Path, Sequence[Union[str, Path]]]
"""Probe runs: a run table (a DataFrame with ``model, task, block, head, lr, seed, epoch, top1``), or run
directories / result tables (read by :func:`attnflow.probes.outputs.read_run_tables`)."""

PROBE_YLABEL = "top-1 [%]"


def _probe_table(data: ProbeData) -> pd.DataFrame:
    if isinstance(data, pd.DataFrame):
        return data
    from ..probes.outputs import read_run_tables

    return read_run_tables([data] if isinstance(data, (str, Path)) else list(data))


def probe_block_frame(data: ProbeData, heads: Sequence[str] = PROBE_HEADS, *, value: str = "final"
                      ) -> pd.DataFrame:
    """Top-1 per (model, task, head, block): the data of :func:`plot_probe_blocks`.

    Args:
        data: probe runs (see :data:`ProbeData`).
        heads: head specs to keep, in this order (others are left out).
        value: ``"final"`` (top-1 at the last evaluated epoch) or ``"best"`` (the best epoch).

    Returns:
        Columns ``model, task, head, block`` (0-based), ``x`` (the block's :func:`figure_label`), ``value`` (mean
        over seeds of the top-1 at the kept lr), ``lo``, ``hi`` (``value`` -+ the std over seeds; NaN with one
        seed), ``n_seeds``, ``random_init``; blocks ascending within a line.

    Raises:
        PlotError: the runs record no block (written before runs recorded it), or none of ``heads`` is in them.
    """
    from ..probes.summary import summarize

    frame = _probe_table(data)
    if "block" not in frame.columns or frame["block"].isna().all() or (frame["block"] < 0).all():
        raise PlotError("the probe runs record no block (tables written before runs recorded one); rerun them")
    present = list(dict.fromkeys(frame["head"]))
    wanted = [h for h in heads if h in present]
    if not wanted:
        raise PlotError(f"none of the heads {', '.join(heads)} is in the probe runs (they have {', '.join(present)})")
    stats = summarize(frame[frame["block"] >= 0], value=value, heads=wanted, by_block=True)
    std = stats["std"].astype(float)
    out = stats.assign(x=stats["block"].map(figure_label), value=stats["mean"], lo=stats["mean"] - std,
                       hi=stats["mean"] + std)
    order = {h: i for i, h in enumerate(wanted)}
    out = out.assign(_rank=out["head"].map(order)).sort_values(["_rank", "block"], kind="stable")
    return out.loc[:, ["model", "task", "head", "block", "x", "value", "lo", "hi", "n_seeds", "random_init"]
                   ].reset_index(drop=True)


def _head_style(head: str, nth_other: int) -> tuple[str, str]:
    return HEAD_STYLES.get(head, _OTHER_STYLES[nth_other % len(_OTHER_STYLES)])


def plot_probe_blocks(data: ProbeData, *, ax: Axes | None = None, heads: Sequence[str] = PROBE_HEADS,
                      models: Sequence[str] | None = None, value: str = "final", band: str = "seeds",
                      n_blocks: int | None = None, legend: bool | dict[str, Any] = True, ylabel: str | None = None,
                      title: str | None = None, banner: bool = True) -> Axes:
    """Probe top-1 against block, one line per (model, head): [cls], avg and AbMILP by default.

    Args:
        data: probe runs (see :data:`ProbeData`), e.g. a run directory of ``attnflow probe`` with ``blocks``.
        ax: axes to draw into (a new single-column figure when ``None``).
        heads: heads to draw, in legend order (default :data:`PROBE_HEADS`; heads the runs lack are left out).
        models: models to draw, in this order (default: all, in order of appearance).
        value: ``"final"`` or ``"best"`` epoch (see :func:`probe_block_frame`).
        band: ``"seeds"`` (+-1 std over seeds, where there are several) or ``"none"``.
        n_blocks: the model's number of blocks, for the x range and ticks (default: the deepest drawn block + 1;
            pass the depth to line the axis up with a statistics panel of every block).
        legend: draw a legend below the axes (a dict: keyword arguments of ``Axes.legend``).
        ylabel: y-axis label (default ``"top-1 [%]"``).
        title: axes title.
        banner: stamp "RANDOM-INIT WEIGHTS" across the axes when a drawn run had random weights.

    Returns:
        The axes: each line a ``Line2D`` with ``gid`` = ``"MODEL:HEAD"`` (``"MODEL:TASK:HEAD"`` when the runs span
        several tasks) whose data are the blocks' figure labels and :func:`probe_block_frame`'s values; bands are
        ``PolyCollection`` s with ``gid`` = ``"band:" + the line's gid``.

    Raises:
        PlotError: no block in the runs, none of ``heads``, a model not in the runs, or an unknown band.
    """
    if band not in ("seeds", "none"):
        raise PlotError(f"unknown band {band!r}; choose seeds or none")
    frame = probe_block_frame(data, heads, value=value)
    present = list(dict.fromkeys(frame["model"]))
    missing = [m for m in models or () if m not in present]
    if missing:
        raise PlotError(f"model {missing[0]!r} is not in the probe runs (they have {', '.join(present)})")
    frame = frame[frame["model"].isin(models or present)]
    drawn = list(models or present)
    if ax is not None:
        _draw_probe_blocks(ax, frame, drawn, band, n_blocks)
        _label_axes(ax, frame, legend=legend, ylabel=ylabel, title=title, banner=banner)
        return ax
    with paper_style():
        _, ax = plt.subplots(figsize=(SINGLE_COLUMN, 2.7 if legend else 2.2), layout="constrained")
        _draw_probe_blocks(ax, frame, drawn, band, n_blocks)
        _label_axes(ax, frame, legend=legend, ylabel=ylabel, title=title, banner=banner)
    return ax


def _label_axes(ax: Axes, frame: pd.DataFrame, *, legend: bool | dict[str, Any], ylabel: str | None,
                title: str | None, banner: bool) -> None:
    """Y label, title, random-weights banner and legend below the axes, as :func:`~attnflow.plot.plot_blocks`."""
    ax.set_ylabel(PROBE_YLABEL if ylabel is None else ylabel)
    if title:
        ax.set_title(title)
    if banner and frame["random_init"].any():
        ax.text(0.5, 0.5, "RANDOM-INIT WEIGHTS\nnumbers are meaningless", transform=ax.transAxes, ha="center",
                va="center", color="#c00000", alpha=0.35, fontsize=9, fontweight="bold", zorder=0, gid="banner")
        log.warning("plotting probe runs with random weights")
    if legend:
        n_entries = len(ax.get_legend_handles_labels()[1])
        below = {"loc": "upper center", "bbox_to_anchor": (0.5, -0.22), "ncol": 2 if n_entries > 3 else n_entries}
        ax.legend(**(below | (legend if isinstance(legend, dict) else {})))


def _draw_probe_blocks(ax: Axes, frame: pd.DataFrame, models: list[str], band: str, n_blocks: int | None) -> None:
    """One line (and band) per (model, task, head) of ``frame``; x axis as :mod:`attnflow.plot.blocks` sets it."""
    tasks = list(dict.fromkeys(frame["task"]))
    series = [(m, t) for m in models for t in tasks if ((frame["model"] == m) & (frame["task"] == t)).any()]
    others = [h for h in dict.fromkeys(frame["head"]) if h not in HEAD_STYLES]
    for nth, (model, task) in enumerate(series):
        for head, rows in frame[(frame["model"] == model) & (frame["task"] == task)].groupby("head", sort=False):
            colour, marker = _head_style(str(head), others.index(head) if head in others else 0)
            name = HEAD_LABELS.get(str(head), str(head))
            where = (model if len(models) > 1 else "") + (f" ({task})" if len(tasks) > 1 else "")
            gid = f"{model}:{task}:{head}" if len(tasks) > 1 else f"{model}:{head}"
            x, y = rows["x"].to_numpy(), rows["value"].to_numpy()
            ax.plot(x, y, color=colour, marker=marker, linestyle=_DASHES[nth % len(_DASHES)],
                    markersize=3.0 if len(x) <= 16 else 2.0, label=f"{where.strip()}: {name}" if where else name,
                    gid=gid, zorder=3)
            if band == "seeds" and rows["lo"].notna().any():
                ax.fill_between(x, rows["lo"].to_numpy(), rows["hi"].to_numpy(), color=colour, alpha=0.15,
                                linewidth=0, zorder=2, gid=f"band:{gid}")
    depth = n_blocks or int(frame["block"].max()) + 1
    ax.set_xticks(block_ticks(depth, max(4, int(_ax_width_in(ax) / 0.25))))
    ax.set_xlim(figure_label(0) - 0.5, figure_label(depth - 1) + 0.5)
    ax.set_xlabel("block")
    ax.ticklabel_format(axis="y", useOffset=False)


def plot_blocks_with_probes(stats: DataLike, probes: ProbeData, metrics: Sequence[str] | None = None, *,
                            heads: Sequence[str] = PROBE_HEADS, band: str = "heads",
                            models: Sequence[str] | None = None, width: float = DOUBLE_COLUMN,
                            ncols: int | None = None, panel_height: float | None = None,
                            title: str | None = None) -> Figure:
    """The per-block attention statistics (one panel per metric, as :func:`~attnflow.plot.plot_metrics`) and, in
    the last panel, probe top-1 against block (:func:`plot_probe_blocks`), on the same block axis.

    Args:
        stats: attention statistics (see :func:`attnflow.plot.plot_blocks`).
        probes: probe runs (see :data:`ProbeData`).
        metrics: statistics panels (default: the paper's four that the data has); ``["cls_patch_entropy"]``
            gives a two-panel figure.
        heads: probe heads (default :data:`PROBE_HEADS`).
        band: band of the statistics panels (see :data:`attnflow.plot.BANDS`); the probe panel shows +-1 std
            over seeds.
        models: models to draw, in order (default: all of the statistics; the probe panel draws those of them
            that the probe runs have, or every probe model when none is named).
        width: figure width in inches.
        ncols: panels per row (default: every panel in one row, up to 5 at double-column width, 2 at single).
        panel_height: height of one panel row in inches.
        title: figure title.

    Returns:
        The figure; ``fig.axes`` are the statistics panels in metric order, then the probe panel.

    Raises:
        PlotError: as :func:`~attnflow.plot.plot_metrics` and :func:`plot_probe_blocks`.
    """
    result = as_result(stats)
    metrics = _default_metrics(result, metrics)
    n_panels = len(metrics) + 1
    ncols = ncols or min(n_panels, 5 if width > 5 else 2)
    nrows = -(-n_panels // ncols)
    panel_height = panel_height or max(1.5, min(2.2, width / ncols * 0.95))
    drawn = result.models if models is None else list(models)
    depth = int(result.frame.loc[result.frame["model"].isin(drawn), "block"].max()) + 1
    probe_frame = _probe_table(probes)
    in_probes = [m for m in drawn if m in set(probe_frame["model"])] if models is not None else None
    if models is not None and not in_probes:
        raise PlotError(f"none of the models {', '.join(drawn)} is in the probe runs "
                        f"(they have {', '.join(dict.fromkeys(probe_frame['model']))})")
    with paper_style():
        fig, axes = plt.subplots(nrows, ncols, figsize=(width, panel_height * nrows + 0.45), layout="constrained",
                                 squeeze=False)
        flat = list(axes.ravel())
        for ax, metric in zip(flat, metrics):
            plot_blocks(result, metric, ax=ax, band=band, models=models, legend=False,
                        ylabel=SHORT_YLABELS.get(metric, ""), title=panel_title(metric), banner=False)
        probe_ax = flat[len(metrics)]
        plot_probe_blocks(probe_frame, ax=probe_ax, heads=heads, models=in_probes, n_blocks=depth, legend=False,
                          title="probe accuracy", banner=False)
        for line in probe_ax.get_lines():  # the shared legend also lists the models: say these are probes
            line.set_label(f"{line.get_label()} probe")
        for ax in flat[n_panels:]:
            ax.remove()
        _figure_legend(fig, flat[:n_panels])
        _figure_banner(fig, result, models, title)
        probes_random = "random_init" in probe_frame.columns and bool(probe_frame["random_init"].any())
        if probes_random and not random_init_models(result, models):  # else the banner is there already
            fig.suptitle(RANDOM_INIT_BANNER + (f"\n{title}" if title else ""), color="#c00000", fontweight="bold")
    return fig
