"""Plotting layer: per-block comparisons (Figs. 3-6, 10-13), per-head heatmaps, per-image maps (Fig. 9).

Every plot function takes a :class:`attnflow.result.Result`, a tidy DataFrame or result file paths, returns a
``matplotlib`` ``Axes`` (single plots, ``ax=`` accepted) or ``Figure`` (multi-panel), and never shows or saves
by itself: call :func:`save_figure` (PDF/SVG/EPS vector or PNG, by extension).
"""

from .blocks import BANDS, block_frame, block_ticks, model_sizes, plot_blocks, plot_metrics, plot_size_grid
from .heads import head_matrix, plot_head_heatmap, plot_heads
from .info import FAMILY_MARKERS, FAMILY_PALETTES, ModelInfo, as_result, color_for, entropy_bound, model_info
from .mapfig import draw_map, plot_attention_maps, plot_head_maps
from .maps import (KIND_LABELS, MAP_KINDS, PatchMaps, capture_maps, denormalize, entropy, last_block_index,
                   model_maps, patch_maps, upsample)
from .report import block_figures, maps_figure
from .style import (DOUBLE_COLUMN, ENTROPY_METRICS, METRIC_LABELS, PAPER_METRICS, SINGLE_COLUMN, PlotError,
                    metric_label, paper_style, save_figure)

__all__ = [
    "BANDS", "DOUBLE_COLUMN", "ENTROPY_METRICS", "FAMILY_MARKERS", "FAMILY_PALETTES", "KIND_LABELS",
    "MAP_KINDS", "METRIC_LABELS", "ModelInfo", "PAPER_METRICS", "PatchMaps", "PlotError", "SINGLE_COLUMN",
    "as_result", "block_figures", "block_frame", "block_ticks", "capture_maps", "color_for", "denormalize", "draw_map",
    "entropy", "entropy_bound", "head_matrix", "last_block_index", "maps_figure", "metric_label", "model_info",
    "model_maps", "model_sizes", "paper_style", "patch_maps", "plot_attention_maps", "plot_blocks", "plot_head_heatmap",
    "plot_head_maps", "plot_heads", "plot_metrics", "plot_size_grid", "save_figure", "upsample",
]
