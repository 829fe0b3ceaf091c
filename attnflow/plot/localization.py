"""The paper's Fig. 8: ground-truth boxes (blue) and the boxes predicted from the [cls] attention map (red),
the Selective Aggregation map (green) and, when scored, the attention-rollout map (orange) on a few images."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from ..localize.result import Example
from ..localize.scoremaps import CLS_SOURCE, ROLLOUT_SOURCE
from .style import DOUBLE_COLUMN, RANDOM_INIT_BANNER, paper_style

GT_COLOR = "tab:blue"
SOURCE_COLORS: dict[str, str] = {CLS_SOURCE: "tab:red", ROLLOUT_SOURCE: "tab:orange"}
"""Box colour of each source; every head (Selective Aggregation) map is green."""


def source_color(source: str) -> str:
    return SOURCE_COLORS.get(source, "tab:green")


def _rect(box: np.ndarray, color: str, width: float) -> Rectangle:
    x0, y0, x1, y1 = (float(v) for v in box)
    # inclusive pixel boxes: the outline runs along the outer edges of the first and last pixels
    return Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False, edgecolor=color, linewidth=width)


def plot_localization_examples(examples: Sequence[Example], labels: dict[str, str], *, columns: int = 4,
                               random_init: bool = False, title: str | None = None) -> Figure:
    """Images with the ground truth (blue), the [cls]-map box (red) and the Selective Aggregation box (green).

    Args:
        examples: from :func:`attnflow.localize.localize` (``result.examples``).
        labels: source -> legend label.
        columns: images per row.
        random_init: stamp the random-weights banner.
        title: figure title.

    Returns:
        The figure (close it with :func:`attnflow.plot.style.close`).
    """
    n = len(examples)
    cols = max(1, min(columns, n))
    rows = max(1, math.ceil(n / cols))
    side = DOUBLE_COLUMN / cols
    with paper_style():
        fig = Figure(figsize=(DOUBLE_COLUMN, side * rows + 0.6), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False)
        for ax in axes.flat:
            ax.set_axis_off()
        for ax, ex in zip(axes.flat, examples):
            ax.imshow(ex.image, interpolation="nearest")
            for box in ex.gt:
                ax.add_patch(_rect(box, GT_COLOR, 1.2))
            for source, box in ex.boxes.items():
                ax.add_patch(_rect(box, source_color(source), 1.2))
            ax.set_title(ex.name, fontsize=5.5)
            for k, source in enumerate(ex.boxes):  # each box's IoU with the ground truth, in the box's colour
                ax.text(0.03, 0.97 - 0.1 * k, f"IoU {ex.ious[source]:.2f}", transform=ax.transAxes, va="top",
                        fontsize=5.5, color=source_color(source),
                        bbox={"facecolor": "white", "alpha": 0.75, "edgecolor": "none", "pad": 1.0})
        handles = [Line2D([], [], color=GT_COLOR, label="ground truth")]
        sources = list(examples[0].boxes) if examples else []
        handles += [Line2D([], [], color=source_color(s), label=labels.get(s, s)) for s in sources]
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles))
        heading = "\n".join(t for t in (RANDOM_INIT_BANNER if random_init else None, title) if t)
        if heading:
            fig.suptitle(heading, color="tab:red" if random_init else "black")
    return fig
