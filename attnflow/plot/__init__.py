"""Plotting layer: per-block comparisons (Figs. 3-6, 10-13) and probe accuracy per block next to them, per-head
heatmaps, per-image maps (Fig. 9). It only draws: the maps it draws are computed by :mod:`attnflow.maps`.

Every plot function takes a :class:`attnflow.result.Result`, a tidy DataFrame or result file paths, returns a
``matplotlib`` ``Axes`` (single plots, ``ax=`` accepted) or ``Figure`` (multi-panel), and never shows or saves
by itself: call :func:`save_figure` (PDF/SVG/EPS vector or PNG, by extension).
"""

from .blocks import BANDS, block_frame, block_ticks, model_sizes, plot_blocks, plot_metrics, plot_size_grid
from .heads import head_matrix, plot_head_heatmap, plot_heads
from .info import FAMILY_MARKERS, FAMILY_PALETTES, ModelInfo, as_result, color_for, entropy_bound, model_info
from .mapfig import draw_map, plot_attention_maps, plot_head_maps
from .localization import plot_localization_examples
from .probes import PROBE_HEADS, plot_blocks_with_probes, plot_probe_blocks, probe_block_frame
from .mapfig import upsample
from .report import block_figures
from .style import (DOUBLE_COLUMN, ENTROPY_METRICS, METRIC_LABELS, PAPER_METRICS, SINGLE_COLUMN, PlotError,
                    metric_label, paper_style, save_figure)

__all__ = [
    "BANDS", "DOUBLE_COLUMN", "ENTROPY_METRICS", "FAMILY_MARKERS", "FAMILY_PALETTES", "METRIC_LABELS", "ModelInfo",
    "PAPER_METRICS", "PROBE_HEADS", "PlotError", "SINGLE_COLUMN", "as_result", "block_figures", "block_frame",
    "block_ticks", "color_for", "draw_map", "entropy_bound", "head_matrix", "metric_label", "model_info",
    "model_sizes", "paper_style", "plot_attention_maps", "plot_blocks", "plot_blocks_with_probes",
    "plot_head_heatmap", "plot_head_maps", "plot_heads", "plot_localization_examples", "plot_metrics",
    "plot_probe_blocks", "plot_size_grid", "probe_block_frame", "save_figure", "upsample",
]
