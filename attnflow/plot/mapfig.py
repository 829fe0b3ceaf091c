"""Drawing per-image attention maps (the paper's Fig. 9): overlays on the image or side by side.

Each map is shown on its own scale from 0 to its maximum, so a uniform map looks flat (not noise stretched to
full contrast) and a peaked one shows its peak; the entropy of the shown distribution is written in the
panel corner (the maximum is ln(N_patches)).
"""

from __future__ import annotations

import textwrap
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.text import Text

import torch
import torch.nn.functional as F

from ..limits import check_figure_width
from ..maps import MAP_KINDS, PatchMaps
from ..metrics import row_entropy
from .style import DOUBLE_COLUMN, PlotError, figure_label, paper_style


def _as_image(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise PlotError(f"an image must be [H, W, 3] (got shape {img.shape})")
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8) if img.max() <= 1.0 else img.astype(np.uint8)
    return img[..., :3]


def draw_map(image: np.ndarray | None, grid_map: np.ndarray, *, ax: Axes | None = None, overlay: bool = True,
             alpha: float = 0.6, cmap: str = "inferno", vmax: float | None = None,
             mark: tuple[int, int] | None = None, show_entropy: bool = True) -> Axes:
    """Draw one patch-grid map, upsampled over ``image`` (``overlay=True``) or as its patch grid.

    Args:
        image: ``[H, W, 3]`` image the model saw (uint8, or float in [0, 1]); may be ``None`` when not
            overlaying.
        grid_map: ``[gh, gw]`` non-negative map.
        ax: axes (a new one when ``None``).
        overlay: blend the bilinearly upsampled map over the greyed image; else draw the grid alone.
        alpha: opacity of the overlay.
        cmap: colormap.
        vmax: top of the colour range (default: the map's maximum; the bottom is 0).
        mark: ``(row, col)`` of a patch to outline (e.g. the central query patch).
        show_entropy: write the map's entropy in the corner.

    Returns:
        The axes; its last ``AxesImage`` holds the drawn map (upsampled ``[H, W]`` when overlaid).
    """
    if ax is None:
        with paper_style():
            _, ax = plt.subplots(figsize=(1.6, 1.6), layout="constrained")
    grid_map = np.asarray(grid_map, np.float64)
    gh, gw = grid_map.shape
    vmax = float(grid_map.max()) if vmax is None else vmax
    if overlay:
        if image is None:
            raise PlotError("an overlay needs the image")
        img = _as_image(image)
        h, w = img.shape[:2]
        grey = img.mean(axis=2, keepdims=True).repeat(3, axis=2) / 255.0
        ax.imshow(0.35 + 0.65 * grey, extent=(0, w, h, 0))
        ax.imshow(upsample(grid_map, (h, w)), cmap=cmap, vmin=0.0, vmax=vmax, alpha=alpha, extent=(0, w, h, 0),
                  interpolation="nearest")
        ph, pw = h / gh, w / gw
    else:
        ax.imshow(grid_map, cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest", extent=(0, gw, gh, 0))
        ph = pw = 1.0
    if mark is not None:
        r, c = mark
        ax.add_patch(Rectangle((c * pw, r * ph), pw, ph, fill=False, edgecolor="cyan", linewidth=0.8))
    if show_entropy:
        entropy = float(row_entropy(torch.as_tensor(grid_map, dtype=torch.float64).ravel()))
        ax.text(0.03, 0.04, f"H={entropy:.2f}", transform=ax.transAxes, fontsize=5.5,
                color="white", va="bottom", ha="left",
                bbox=dict(boxstyle="round,pad=0.15", facecolor="black", alpha=0.55, linewidth=0))
    ax.set_axis_off()
    return ax


def upsample(grid_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a ``[gh, gw]`` map to ``size = (H, W)`` pixels (each patch covers its pixels)."""
    t = torch.as_tensor(np.asarray(grid_map, np.float64))[None, None]
    return F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)[0, 0].numpy()


SHORT_KIND_LABELS: dict[str, str] = {
    "cls_mean": "[cls], mean\nover heads",
    "cls_min_entropy": "[cls], lowest-\nentropy head",
    "central": "central\npatch",
    "rollout": "attention\nrollout",
}


COMPACT_KIND_LABELS: dict[str, str] = {
    "cls_mean": "[cls]\nmean",
    "cls_min_entropy": "[cls]\nmin. H",
    "central": "central\npatch",
    "rollout": "roll-\nout",
}
"""Column headers for panels too narrow for :data:`SHORT_KIND_LABELS` (many models at paper width)."""

MIN_HEADER_PT: float = 4.5
"""Smallest font size headers shrink to before they switch to compact labels (or the title wraps)."""


def _kind_title(kind: str, compact: bool = False) -> str:
    """Short two-line column header of a map kind."""
    if kind.startswith("cls_head:"):
        return f"[cls],\nhead {figure_label(int(kind.split(':', 1)[1]))}"
    return (COMPACT_KIND_LABELS if compact else SHORT_KIND_LABELS).get(kind, kind)


def _draw_cell(ax: Axes, image: np.ndarray, pm: PatchMaps, kind: str, *, overlay: bool, cmap: str,
               show_entropy: bool) -> None:
    """One panel of :func:`plot_attention_maps`: the ``kind`` map of one image (or "no [cls]" where it has none)."""
    grid = pm.get(kind)
    if grid is None:
        ax.text(0.5, 0.5, "no [cls]", ha="center", va="center", transform=ax.transAxes, color="0.4")
        ax.set_axis_off()
        return
    draw_map(image, grid, ax=ax, overlay=overlay, cmap=cmap, show_entropy=show_entropy,
             mark=pm.central_patch if kind == "central" else None)
    if kind == "cls_min_entropy":
        assert pm.min_entropy_head is not None  # set with the [cls] maps, which this one is
        _corner_note(ax, f"head {figure_label(pm.min_entropy_head)}")


def plot_attention_maps(images: Sequence[np.ndarray], maps: Mapping[str, Sequence[PatchMaps]], *,
                        kinds: Sequence[str] = MAP_KINDS, labels: Mapping[str, str] | None = None,
                        rows: str = "images", overlay: bool = True, cmap: str = "inferno",
                        width: float = DOUBLE_COLUMN, max_cell: float = 1.3, show_entropy: bool = True,
                        title: str | None = None, warning: bool = False) -> Figure:
    """Several models' maps on several images in one figure (the paper's Fig. 9).

    With ``rows="images"`` each row is an image: the input first, then one column per (model, kind). With
    ``rows="models"`` the grid is transposed (the input in the first row, one row per (model, kind)).
    Models without [cls] show "no [cls]" in their [cls] panels.

    Args:
        images: ``[H, W, 3]`` images as the models saw them (the crop), one per row/column.
        maps: model name -> its :class:`PatchMaps`, one per image (same order as ``images``).
        kinds: map kinds per model (:data:`~attnflow.maps.KINDS`: ``rollout`` only when the maps hold it, or
            ``"cls_head:<h>"`` with a 0-based head ``h``, headed
            by its :func:`~attnflow.plot.style.figure_label`).
        labels: model name -> display label (default: the name).
        rows: ``"images"`` or ``"models"``.
        overlay: overlay the maps on the image (else show the patch grids beside the input).
        cmap: colormap.
        width: largest figure width in inches.
        max_cell: largest side of one panel in inches (few panels do not blow up to the full width).
        show_entropy: write each map's entropy in its corner.
        title: figure title.
        warning: draw the title as a red, bold warning (e.g. the random-weights banner).

    Returns:
        The figure.
    """
    check_figure_width(width, allow_none=False)
    if rows not in ("images", "models"):
        raise PlotError(f"rows must be 'images' or 'models', got {rows!r}")
    for model, per_image in maps.items():
        if len(per_image) != len(images):
            raise PlotError(f"{model}: {len(per_image)} maps for {len(images)} images")
    labels = dict(labels or {})
    columns = [(m, k) for m in maps for k in kinds]
    n_img, n_col = len(images), len(columns) + 1
    nr, nc = (n_img, n_col) if rows == "images" else (n_col, n_img)
    gap = 0.04
    cell = min(width / (nc + gap * (nc - 1)), max_cell)
    with paper_style():
        fig, axes = plt.subplots(nr, nc, figsize=(cell * (nc + gap * (nc - 1)), cell * (nr + gap * (nr - 1))),
                                 squeeze=False,
                                 gridspec_kw=dict(wspace=gap, hspace=gap, left=0, right=1, bottom=0, top=1))
        headers: list[tuple[Text, str]] = []  # (text, map kind) of each column header
        for i, image in enumerate(images):
            ax = axes[i, 0] if rows == "images" else axes[0, i]
            ax.imshow(_as_image(image))
            ax.set_axis_off()
            if i == 0:
                headers.append((_set_header(ax, "input", rows), "input"))
            for j, (model, kind) in enumerate(columns, start=1):
                ax = axes[i, j] if rows == "images" else axes[j, i]
                _draw_cell(ax, image, maps[model][i], kind, overlay=overlay, cmap=cmap, show_entropy=show_entropy)
                if i == 0:
                    headers.append((_set_header(ax, _kind_title(kind), rows), kind))
        groups: list[tuple[Text, float]] = []
        for model in maps:
            group = [j for j, (m, _) in enumerate(columns, start=1) if m == model]
            first, last = (axes[0, group[0]], axes[0, group[-1]]) if rows == "images" else \
                (axes[group[0], 0], axes[group[-1], 0])
            groups.append(_group_header(fig, first, last, labels.get(model, model), rows))
        suptitle = None
        if title:
            top = 1.0 + (0.55 if rows == "images" else 0.05) / fig.get_figheight()
            style = {"color": "#c00000", "fontweight": "bold"} if warning else {}
            suptitle = fig.suptitle(title, y=top, va="bottom", **style)
        _fit_headers(fig, headers, groups, suptitle, cell_px=cell * (1 + gap) * fig.dpi)
    return fig


def _text_length(text: Text, renderer) -> float:
    """Extent in pixels of ``text`` along its direction (height for vertical text)."""
    box = text.get_window_extent(renderer)
    return box.height if round(text.get_rotation()) % 180 == 90 else box.width


def _shrink_to_fit(items: Sequence[tuple[Text, float]], renderer, min_size: float) -> bool:
    """Give ``items`` one common font size, the largest (down to ``min_size``) at which each text fits its room
    (pixels); returns whether they fit."""
    if not items:
        return True
    size = max(float(t.get_fontsize()) for t, _ in items)  # points: Text keeps its size as a number
    while True:
        for t, _ in items:
            t.set_fontsize(size)
        if all(_text_length(t, renderer) <= room for t, room in items):
            return True
        if size <= min_size:
            return False
        size = max(min_size, size - 0.25)


def _fit_headers(fig: Figure, headers: Sequence[tuple[Text, str]], groups: Sequence[tuple[Text, float]],
                 suptitle: Text | None, cell_px: float) -> None:
    """Keep neighbouring headers from overlapping when many narrow panels share a paper-width figure.

    Column headers shrink together (then switch to :data:`COMPACT_KIND_LABELS`), model headers shrink together,
    and a title wider than the figure shrinks, then wraps.
    """
    get_renderer = getattr(fig.canvas, "get_renderer", None)
    if get_renderer is None:  # a backend without a renderer to measure text: leave the sizes as they are
        return
    renderer = get_renderer()
    room = cell_px - 2.0
    if not _shrink_to_fit([(t, room) for t, _ in headers], renderer, MIN_HEADER_PT):
        for t, kind in headers:
            t.set_text(_kind_title(kind, compact=True) if kind != "input" else kind)
            t.set_fontsize(6)
        _shrink_to_fit([(t, room) for t, _ in headers], renderer, MIN_HEADER_PT)
    if not _shrink_to_fit(groups, renderer, MIN_HEADER_PT):
        for t, span in groups:
            t.set_text(textwrap.fill(t.get_text(), max(8, int(len(t.get_text()) * span / _text_length(t, renderer)))))
    if suptitle is not None:
        width = fig.get_figwidth() * fig.dpi
        if not _shrink_to_fit([(suptitle, width)], renderer, 6.0):
            chars = int(len(suptitle.get_text()) * width / _text_length(suptitle, renderer))
            suptitle.set_text("\n".join(textwrap.fill(line, max(20, chars))
                                        for line in suptitle.get_text().split("\n")))


def _corner_note(ax: Axes, text: str) -> None:
    ax.text(0.03, 0.96, text, transform=ax.transAxes, fontsize=5.5, color="white", va="top", ha="left",
            bbox=dict(boxstyle="round,pad=0.15", facecolor="black", alpha=0.55, linewidth=0))


def _set_header(ax: Axes, text: str, rows: str) -> Text:
    """Header of one panel: above it (rows = images) or left of it (rows = models)."""
    if rows == "images":
        return ax.set_title(text, fontsize=6, pad=2, linespacing=1.1)
    return ax.text(-0.04, 0.5, text, transform=ax.transAxes, rotation=90, ha="right", va="center", fontsize=6,
                   linespacing=1.1)


def _group_header(fig: Figure, first: Axes, last: Axes, text: str, rows: str) -> tuple[Text, float]:
    """A model's name centred over (or left of) the panels of its map kinds, with a rule under it.

    Returns:
        The text and the length in pixels of the rule it must fit.
    """
    a, b = first.get_position(), last.get_position()
    if rows == "images":
        y = a.y1 + 0.33 / fig.get_figheight()
        header = fig.text((a.x0 + b.x1) / 2, y, text, ha="center", va="bottom", fontsize=7, fontweight="bold")
        fig.add_artist(plt.Line2D([a.x0 + 0.01, b.x1 - 0.01], [y - 0.02 / fig.get_figheight()] * 2,
                                  color="0.3", linewidth=0.6))
        return header, (b.x1 - a.x0 - 0.02) * fig.get_figwidth() * fig.dpi
    x = a.x0 - 0.32 / fig.get_figwidth()
    header = fig.text(x, (a.y1 + b.y0) / 2, text, ha="right", va="center", rotation=90, fontsize=7,
                      fontweight="bold")
    fig.add_artist(plt.Line2D([x + 0.02 / fig.get_figwidth()] * 2, [b.y0 + 0.01, a.y1 - 0.01],
                              color="0.3", linewidth=0.6))
    return header, (a.y1 - b.y0 - 0.02) * fig.get_figheight() * fig.dpi


def plot_head_maps(image: np.ndarray, maps: PatchMaps, *, ncols: int = 6, overlay: bool = True,
                   cmap: str = "inferno", width: float = DOUBLE_COLUMN, title: str | None = None) -> Figure:
    """Every head's [cls] -> patch attention of one image; the lowest-entropy head is framed in red.

    Args:
        image: ``[H, W, 3]`` image the model saw.
        maps: its :class:`PatchMaps` (must have [cls]).
        ncols: panels per row.
        overlay: overlay on the image or draw the grids.
        cmap: colormap.
        width: figure width in inches.
        title: figure title.

    Returns:
        The figure (one axes per head, in head order, then unused axes removed).
    """
    check_figure_width(width, allow_none=False)
    cls_heads = maps.cls_heads
    if not maps.has_cls or cls_heads is None:
        raise PlotError("per-head [cls] maps need a model with a [cls] token")
    n_heads = len(cls_heads)
    ncols = min(ncols, n_heads)
    nrows = -(-n_heads // ncols)
    cell = width / ncols
    with paper_style():
        fig, axes = plt.subplots(nrows, ncols, figsize=(width, (cell + 0.15) * nrows), squeeze=False,
                                 gridspec_kw=dict(wspace=0.04, hspace=0.18))
        flat = axes.ravel()
        for h in range(n_heads):
            ax = flat[h]
            draw_map(image, cls_heads[h], ax=ax, overlay=overlay, cmap=cmap)
            best = h == maps.min_entropy_head
            ax.set_title(f"head {figure_label(h)}" + (" (lowest H)" if best else ""), fontsize=6, pad=2,
                         color="#c00000" if best else "black")
            if best:
                ax.set_axis_on()
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_edgecolor("#c00000")
                    spine.set_linewidth(1.5)
        for ax in flat[n_heads:]:
            ax.remove()
        if title:
            fig.suptitle(title, y=1.0, va="bottom")
    return fig
