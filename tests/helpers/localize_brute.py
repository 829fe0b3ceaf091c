"""Brute-force references for the localization tests: flood fills, hand IoU, per-threshold loops.

Written from wsolevaluation's description (evaluation.py, BoxEvaluator with multi_contour_eval) and OpenCV's
contour semantics (8-connected foreground, 4-connected background, image padded with background), without
scipy or the attnflow code.
"""

from __future__ import annotations

from collections import deque

import numpy as np

EIGHT = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)]
FOUR = [(-1, 0), (1, 0), (0, -1), (0, 1)]


def flood(mask: list[list[bool]], value: bool, steps: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Connected components (lists of (row, col)) of the pixels equal to ``value``."""
    h, w = len(mask), len(mask[0])
    seen = [[False] * w for _ in range(h)]
    comps = []
    for r in range(h):
        for c in range(w):
            if mask[r][c] != value or seen[r][c]:
                continue
            comp, queue = [], deque([(r, c)])
            seen[r][c] = True
            while queue:
                y, x = queue.popleft()
                comp.append((y, x))
                for dy, dx in steps:
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and not seen[ny][nx] and mask[ny][nx] == value:
                        seen[ny][nx] = True
                        queue.append((ny, nx))
            comps.append(comp)
    return comps


def contour_boxes(mask, holes: bool = True) -> list[tuple[int, int, int, int]]:
    """cv2.findContours(RETR_TREE) + boundingRect boxes, as wsolevaluation turns them into (x0, y0, x1, y1)."""
    m = [[bool(v) for v in row] for row in np.asarray(mask).tolist()]
    h, w = len(m), len(m[0])
    boxes = []
    for comp in flood(m, True, EIGHT):
        rows, cols = [p[0] for p in comp], [p[1] for p in comp]
        x, y, bw, bh = min(cols), min(rows), max(cols) - min(cols) + 1, max(rows) - min(rows) + 1
        boxes.append((x, y, min(x + bw, w - 1), min(y + bh, h - 1)))
    if holes:
        for comp in flood(m, False, FOUR):
            rows, cols = [p[0] for p in comp], [p[1] for p in comp]
            if min(rows) == 0 or min(cols) == 0 or max(rows) == h - 1 or max(cols) == w - 1:
                continue  # background connected to the (padded) outside
            # the hole's contour runs over the foreground pixels around it: one pixel beyond the hole
            x, y = min(cols) - 1, min(rows) - 1
            bw, bh = max(cols) - min(cols) + 3, max(rows) - min(rows) + 3
            boxes.append((x, y, min(x + bw, w - 1), min(y + bh, h - 1)))
    return boxes or [(0, 0, 0, 0)]


def iou(a, b) -> float:
    """IoU of two inclusive pixel boxes, by counting pixels."""
    ax = set((x, y) for x in range(a[0], a[2] + 1) for y in range(a[1], a[3] + 1))
    bx = set((x, y) for x in range(b[0], b[2] + 1) for y in range(b[1], b[3] + 1))
    union = len(ax | bx)
    return len(ax & bx) / union if union else 0.0


def iou_formula(a, b) -> float:
    """The same IoU from the corner formula (for big boxes, where counting pixels is slow)."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    inter = iw * ih
    union = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter
    return inter / union if union > 0 else 0.0


def brute_hits(u8: np.ndarray, gts, interval: float = 0.01, ious=(30, 50, 70), holes: bool = True,
               count_pixels: bool = False) -> np.ndarray:
    """[D, T] hits of one uint8 score map: per threshold, per contour box, per ground-truth box, loops."""
    u8 = np.asarray(u8)
    top = int(u8.max())
    n = int(np.ceil(1 / interval - 1e-9))
    hits = np.zeros((len(ious), n), dtype=np.int64)
    measure = iou if count_pixels else iou_formula
    for k in range(n):
        cut = int(k * interval * top)
        mask = [[int(v) > cut for v in row] for row in u8.tolist()]
        best = 0.0
        for box in contour_boxes(mask, holes):
            for gt in gts:
                best = max(best, measure(box, tuple(int(v) for v in gt)))
        for d, thr in enumerate(ious):
            hits[d, k] = best >= thr / 100
    return hits


def max_box_acc_v2(hits_per_image: list[np.ndarray]) -> tuple[float, list[float]]:
    """MaxBoxAccV2 and MaxBoxAcc per IoU threshold from per-image hits."""
    total = sum(hits_per_image)
    per_iou = [max(row) * 100.0 / len(hits_per_image) for row in total.tolist()]
    return sum(per_iou) / len(per_iou), per_iou


def cubic_resize(grid: np.ndarray, size: tuple[int, int], a: float = -0.75) -> np.ndarray:
    """OpenCV INTER_CUBIC by its definition: Keys cubic convolution, half-pixel centres, replicated border."""
    def kernel(x: float) -> float:
        x = abs(x)
        if x <= 1:
            return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
        if x < 2:
            return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a
        return 0.0

    h, w = grid.shape
    out = np.zeros(size)
    for oy in range(size[0]):
        sy = (oy + 0.5) * h / size[0] - 0.5
        y0 = int(np.floor(sy))
        for ox in range(size[1]):
            sx = (ox + 0.5) * w / size[1] - 0.5
            x0 = int(np.floor(sx))
            total = 0.0
            for j in range(y0 - 1, y0 + 3):
                for i in range(x0 - 1, x0 + 3):
                    v = grid[min(max(j, 0), h - 1), min(max(i, 0), w - 1)]
                    total += v * kernel(sy - j) * kernel(sx - i)
            out[oy, ox] = total
    return out
