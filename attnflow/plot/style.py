"""Metric display names, paper figure sizes and fonts, and :func:`save_figure`.

Sizes follow a two-column paper (CVPR/ICCV/NeurIPS-like): a single column is about 3.3 in wide, a full
page width about 6.9 in; fonts are 7-8 pt so that a figure placed at 100 % matches the caption text.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import matplotlib as mpl
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..atomic import write_atomically
from ..errors import AttnflowError
from ..limits import check_dpi

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

log = logging.getLogger(__name__)

SINGLE_COLUMN: float = 3.3
"""Width in inches of a figure that spans one column of a two-column paper."""

DOUBLE_COLUMN: float = 6.9
"""Width in inches of a figure that spans both columns."""

PAPER_METRICS: tuple[str, ...] = ("cls_self", "cls_patch_entropy", "patch_self", "patch_patch_entropy")
"""The four metrics of the paper's Sec. 4, in the order of Figs. 3-6 (and 10-13)."""

METRIC_LABELS: dict[str, str] = {
    "cls_self": "[cls]-[cls] attention",
    "cls_patch_entropy": "[cls]-patch entropy",
    "patch_self": "patch-patch attention (self, relative)",
    "patch_patch_entropy": "patch-patch entropy",
    "cls_patch_mass": "[cls]-patch attention mass",
    "patch_cls": "patch-[cls] attention",
    "attention_distance": "attention distance [px]",
}
"""Paper wording of each metric, used as panel title and y-axis label."""

PANEL_TITLES: dict[str, str] = {
    "patch_self": "patch-patch attention",
    "cls_patch_mass": "[cls]-patch mass",
}
"""Shorter names for panel titles where the full label does not fit (as in the paper's Table 3)."""

METRIC_TITLES: dict[str, str] = {
    "cls_self": "Fig. 3 / 10",
    "cls_patch_entropy": "Fig. 4 / 11",
    "patch_self": "Fig. 5 / 12",
    "patch_patch_entropy": "Fig. 6 / 13",
}
"""Which paper figure shows a metric (for captions and the README)."""

ENTROPY_METRICS: frozenset[str] = frozenset({"cls_patch_entropy", "patch_patch_entropy"})
"""Metrics bounded above by ln(N_patches); plots draw that bound as a dashed line."""

SAVE_FORMATS: tuple[str, ...] = ("pdf", "png", "svg", "eps")
"""File extensions :func:`save_figure` writes."""

FONT_SIZE: float = 7.0
"""Base font size (pt) of every figure."""

_RC: dict[RcKeyType, Any] = {
    "font.size": FONT_SIZE,
    "axes.titlesize": FONT_SIZE + 1,
    "axes.labelsize": FONT_SIZE,
    "xtick.labelsize": FONT_SIZE - 0.5,
    "ytick.labelsize": FONT_SIZE - 0.5,
    "legend.fontsize": FONT_SIZE - 0.5,
    "legend.title_fontsize": FONT_SIZE,
    "figure.titlesize": FONT_SIZE + 1,
    "axes.linewidth": 0.6,
    "grid.linewidth": 0.4,
    "lines.linewidth": 1.2,
    "lines.markersize": 3.0,
    "xtick.major.size": 2.5,
    "ytick.major.size": 2.5,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "xtick.major.pad": 2.0,
    "ytick.major.pad": 2.0,
    "axes.labelpad": 2.0,
    "axes.titlepad": 4.0,
    "legend.frameon": False,
    "legend.handlelength": 1.8,
    "legend.columnspacing": 1.2,
    "savefig.dpi": 300,
    "pdf.fonttype": 42,  # embed TrueType: text stays editable/searchable in the PDF
    "ps.fonttype": 42,
    "svg.fonttype": "none",
}


RANDOM_INIT_BANNER = "RANDOM-INIT WEIGHTS - numbers are meaningless"
"""Text stamped on every figure that shows a run made with random weights."""


class PlotError(AttnflowError, ValueError):
    """Data that cannot be plotted (unknown metric, no rows for a model, unknown file type)."""


def figure_label(index: int) -> int:
    """The number a figure shows for the 0-based block or head ``index``: ``index + 1``.

    The one rule: data count blocks and heads from 0 (result tables, CSV files, Python, options such as
    ``block`` and ``cls_head:H``); figures number them from 1, as the paper does (its "8-th ViT block" is
    block 7 in a table). Every figure label and tick of a block or head goes through this function.
    """
    return int(index) + 1


def metric_label(metric: str) -> str:
    """Display name of ``metric`` (the metric's own name for metrics the paper does not show)."""
    return METRIC_LABELS.get(metric, metric.replace("_", " "))


def panel_title(metric: str) -> str:
    """Short display name of ``metric`` for panel titles and grid row labels."""
    return PANEL_TITLES.get(metric, metric_label(metric))


def check_metrics(requested: list[str] | tuple[str, ...], available: list[str]) -> None:
    """Raise :class:`PlotError` naming close matches if a requested metric is not in the data."""
    for metric in requested:
        if metric not in available:
            close = difflib.get_close_matches(metric.lower().replace("-", "_"), available, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise PlotError(f"metric {metric!r} is not in the data (it has {', '.join(available)}){hint}")


@contextlib.contextmanager
def paper_style() -> Iterator[None]:
    """Context in which new figures get seaborn's white grid with paper-sized fonts and lines."""
    import seaborn as sns

    with mpl.rc_context(), sns.axes_style("whitegrid", {"grid.color": "0.9", "axes.edgecolor": "0.3"}):
        mpl.rcParams.update(_RC)
        yield


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 300) -> Path:
    """Write ``fig`` in the format named by the file extension (vector PDF/SVG/EPS or PNG).

    Parent folders are created; the file is written all or nothing (:mod:`attnflow.atomic`). PDFs carry no creation
    date, so re-rendering the same data gives the same bytes.

    Args:
        fig: the figure.
        path: output file; its extension picks the format (one of :data:`SAVE_FORMATS`).
        dpi: resolution of raster output (PNG) and of images embedded in vector output.

    Returns:
        The written path.

    Raises:
        PlotError: for an unknown extension.
        OptionError: a ``dpi`` outside ``1 ..`` :data:`attnflow.limits.MAX_DPI`.
    """
    check_dpi(dpi)
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in SAVE_FORMATS:
        raise PlotError(f"{path}: cannot tell the figure format from the extension "
                        f"(use one of {', '.join('.' + f for f in SAVE_FORMATS)})")
    metadata = {"CreationDate": None} if fmt == "pdf" else ({"Date": None} if fmt == "svg" else None)

    def write(temporary: Path) -> None:
        with mpl.rc_context({"svg.hashsalt": "attnflow"}):
            fig.savefig(temporary, format=fmt, dpi=dpi, bbox_inches="tight", pad_inches=0.02, metadata=metadata)
    write_atomically({path: write})  # a full disk leaves the previous figure, never a truncated one
    log.debug("wrote %s", path)
    return path


def root_figure(ax: Axes) -> Figure:
    """The top-level :class:`~matplotlib.figure.Figure` holding ``ax`` (through any sub-figures)."""
    return ax.figure.figure  # the .figure of a figure or sub-figure is the root (matplotlib 3.7 to 3.11)


def close(fig: Figure) -> None:
    """Release a figure's memory (for loops that render many figures)."""
    plt.close(fig)
