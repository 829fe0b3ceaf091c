"""Boxes from a thresholded score map, as ``cv2.findContours(RETR_TREE)`` + ``cv2.boundingRect`` give them.

wsolevaluation (Choe et al., CVPR 2020) thresholds the uint8 score map, takes *every* contour OpenCV finds in
the binary mask (``RETR_TREE``: outer borders of the 8-connected foreground components **and** the borders of
their holes) and turns each contour into the box ``(x, y, x + w, y + h)`` of ``cv2.boundingRect``, with the
far corner clipped to ``(W - 1, H - 1)``. This module computes the same boxes with :mod:`scipy.ndimage`:

* an outer contour traces the border of an 8-connected foreground component, so its bounding rectangle is the
  component's bounding box: columns ``c0..c1`` give ``x = c0``, ``w = c1 - c0 + 1``;
* a hole contour traces the foreground pixels around a hole, a 4-connected background component that does
  not reach the image border (OpenCV pads the image with background, so background touching the border is
  outside, not a hole). Its rectangle is the hole's bounding box grown by one pixel on each side.

Nested structure (islands inside holes) needs nothing special: every foreground component and every hole
contributes one box, whatever its depth in OpenCV's hierarchy. The boxes are checked against OpenCV 4.10 and
5.0 in ``tests/test_localize_contours.py`` (skipped without ``cv2``; attnflow does not depend on OpenCV).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_EIGHT = np.ones((3, 3), dtype=bool)
_FOUR = ndimage.generate_binary_structure(2, 1)

NO_CONTOUR_BOX = np.zeros((1, 4), dtype=np.int64)
"""The box wsolevaluation uses when a mask has no foreground: ``[0, 0, 0, 0]`` (one pixel at the origin)."""


def mask_boxes(mask: np.ndarray, *, holes: bool = True) -> np.ndarray:
    """The box of every contour OpenCV's ``RETR_TREE`` would find in a binary mask.

    Only the foreground's bounding box (plus a one-pixel margin) is labelled, which makes high thresholds of a
    peaked score map cheap; the result does not depend on it.

    Args:
        mask: ``[H, W]`` boolean foreground.
        holes: also return the boxes of hole contours (OpenCV's ``RETR_TREE`` does; ``RETR_EXTERNAL`` would
            not).

    Returns:
        ``[K, 4]`` int64 boxes ``(x0, y0, x1, y1)`` with ``x1 = min(x0 + w, W - 1)``, ``y1 = min(y0 + h, H - 1)``
        (wsolevaluation's convention: the far corner is one past the last pixel, except at the image border);
        :data:`NO_CONTOUR_BOX` when the mask is empty.
    """
    window = _foreground_window(np.asarray(mask.any(axis=1)), np.asarray(mask.any(axis=0)))
    if window is None:
        return NO_CONTOUR_BOX.copy()
    return _window_boxes(mask[window], window, mask.shape, holes)


def _foreground_window(rows: np.ndarray, cols: np.ndarray) -> tuple[slice, slice] | None:
    """The foreground's bounding box plus one background pixel on each side (within the image), from the
    rows and columns that hold foreground; ``None`` when there is none. Background on the window's border
    is then outside every contour."""
    r = np.flatnonzero(rows)
    if r.size == 0:
        return None
    c = np.flatnonzero(cols)
    return (slice(max(int(r[0]) - 1, 0), min(int(r[-1]) + 2, rows.size)),
            slice(max(int(c[0]) - 1, 0), min(int(c[-1]) + 2, cols.size)))


def _window_boxes(crop: np.ndarray, window: tuple[slice, slice], shape: tuple[int, ...], holes: bool) -> np.ndarray:
    height, width = shape
    r0, c0 = window[0].start, window[1].start
    labels, _ = ndimage.label(crop, structure=_EIGHT)
    rects = [(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in ndimage.find_objects(labels)]
    if holes:
        rects += _hole_rects(crop)
    boxes = np.asarray(rects, dtype=np.int64) + np.array([c0, r0, c0, r0])    # [K, 4] x, y, x + w, y + h
    boxes[:, 2] = np.minimum(boxes[:, 2], width - 1)
    boxes[:, 3] = np.minimum(boxes[:, 3], height - 1)
    return boxes


def _hole_rects(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """``(x, y, x + w, y + h)`` of each hole contour: the hole's bounding box grown by one pixel.

    A hole is a 4-connected background component that does not touch the border of ``mask``."""
    labels, n = ndimage.label(~mask, structure=_FOUR)
    if n == 0:
        return []
    border = np.zeros(n + 1, dtype=bool)
    for edge in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
        border[edge] = True
    rects = []
    for label, s in enumerate(ndimage.find_objects(labels), start=1):
        if s is not None and not border[label]:
            rects.append((s[1].start - 1, s[0].start - 1, s[1].stop + 1, s[0].stop + 1))
    return rects


def threshold_boxes(scoremap: np.ndarray, thresholds: np.ndarray, *, holes: bool = True) -> list[np.ndarray]:
    """:func:`mask_boxes` of ``scoremap > t`` for every ``t`` in ``thresholds`` (OpenCV's ``THRESH_BINARY``).

    Faster than one :func:`mask_boxes` call per threshold: each mask is built and labelled only inside its
    foreground window (found from per-row and per-column maxima), and a threshold whose mask equals the
    previous one's (no score between them) reuses its boxes.

    Args:
        scoremap: ``[H, W]`` score map (wsolevaluation: uint8 ``0..255``).
        thresholds: ``[T]`` thresholds in the score map's units (wsolevaluation: ``int(t * max)``).
        holes: include hole contours (see :func:`mask_boxes`).

    Returns:
        ``T`` arrays ``[K_t, 4]`` of int64 boxes ``(x0, y0, x1, y1)``.
    """
    row_max, col_max = scoremap.max(axis=1), scoremap.max(axis=0)
    values = np.sort(scoremap, axis=None)
    above = values.size - np.searchsorted(values, thresholds, side="right")      # [T] pixels > t
    out: list[np.ndarray] = []
    last_count, last_boxes = -1, NO_CONTOUR_BOX
    for t, count in zip(thresholds, above):
        if count != last_count:  # masks are nested: the same pixel count means the same mask
            window = _foreground_window(row_max > t, col_max > t)
            last_boxes = (NO_CONTOUR_BOX.copy() if window is None
                          else _window_boxes(scoremap[window] > t, window, scoremap.shape, holes))
            last_count = int(count)
        out.append(last_boxes)
    return out
