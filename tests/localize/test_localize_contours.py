"""Contour boxes without OpenCV: equal to cv2.findContours(RETR_TREE) + boundingRect, as wsolevaluation uses them.

Checked three ways: boxes OpenCV 4.10 and 5.0 returned for fixed masks (recorded here), a flood-fill brute force
on random masks, and, where ``cv2`` is installed, OpenCV itself on random masks.
"""

from __future__ import annotations

import numpy as np
import pytest

from attnflow.localize.contours import mask_boxes, threshold_boxes
from localize_brute import contour_boxes


def golden_masks() -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[0:20, 0:24]
    d2 = (yy - 9) ** 2 + (xx - 11) ** 2
    ring = (d2 <= 49) & (d2 > 9)
    island = ring | (d2 <= 1)
    waves = np.sin(xx / 2.3) * np.cos(yy / 1.7) + 0.3 * np.sin((xx + yy) / 3.1) > 0.25
    frame = (xx % 6 == 0) | (yy % 7 == 0)
    return {"ring": ring, "island": island, "waves": waves, "frame": frame}


# sorted (x, y, min(x + w, W - 1), min(y + h, H - 1)) of cv2.boundingRect over cv2.findContours(mask * 255,
# RETR_TREE, CHAIN_APPROX_SIMPLE), recorded with opencv-python-headless 4.10.0.84 and 5.0.0.93 (identical)
OPENCV_BOXES = {
    "ring": [(4, 2, 19, 17), (7, 5, 16, 14)],
    "island": [(4, 2, 19, 17), (7, 5, 16, 14), (10, 8, 13, 11)],
    "waves": [(0, 4, 1, 7), (1, 0, 8, 3), (1, 9, 7, 13), (2, 14, 14, 19), (9, 4, 21, 13), (16, 0, 23, 7),
              (23, 15, 23, 19)],
    "frame": [(0, 0, 7, 8), (0, 0, 23, 19), (0, 7, 7, 15), (6, 0, 13, 8), (6, 7, 13, 15), (12, 0, 19, 8),
              (12, 7, 19, 15)],
}


def boxes_of(mask: np.ndarray, **kw) -> list[tuple[int, ...]]:
    return sorted(map(tuple, mask_boxes(np.asarray(mask, dtype=bool), **kw).tolist()))


@pytest.mark.parametrize("name", sorted(OPENCV_BOXES))
def test_boxes_equal_what_opencv_returned(name):
    assert boxes_of(golden_masks()[name]) == OPENCV_BOXES[name]


def test_hand_drawn_cases():
    m = np.zeros((8, 10), bool)
    assert boxes_of(m) == [(0, 0, 0, 0)]                      # no contour: wsolevaluation's [0, 0, 0, 0]
    m[2:5, 3:7] = True                                       # rows 2..4, cols 3..6
    assert boxes_of(m) == [(3, 2, 7, 5)]                      # far corner one past the last pixel
    m[:] = False
    m[5:8, 6:10] = True                                      # touches the right and bottom border
    assert boxes_of(m) == [(6, 5, 9, 7)]                      # clipped to (W - 1, H - 1)
    m[:] = False
    m[1, 1] = m[2, 2] = True                                 # diagonal neighbours: one 8-connected component
    assert boxes_of(m) == [(1, 1, 3, 3)]
    m[:] = False
    m[1:6, 1:6] = True
    m[3, 3] = False                                          # a one-pixel hole: its contour is the ring around it
    assert boxes_of(m) == [(1, 1, 6, 6), (2, 2, 5, 5)]
    assert boxes_of(m, holes=False) == [(1, 1, 6, 6)]
    m[:] = False
    m[0:4, 0:4] = True
    m[1, 1] = m[2, 2] = False                                # diagonal background: two 4-connected holes
    assert boxes_of(m) == [(0, 0, 3, 3), (0, 0, 4, 4), (1, 1, 4, 4)]
    m[:] = False
    m[0:5, 0:5] = True
    m[1:4, 0] = False                                        # background reaching the border is no hole
    assert boxes_of(m) == [(0, 0, 5, 5)]


@pytest.mark.parametrize("seed", range(4))
def test_random_masks_match_flood_fill(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        h, w = rng.integers(1, 18, size=2)
        mask = rng.random((h, w)) < rng.uniform(0.1, 0.9)
        assert boxes_of(mask) == sorted(contour_boxes(mask)), mask.astype(int)
        assert boxes_of(mask, holes=False) == sorted(contour_boxes(mask, holes=False))


def test_threshold_boxes_equal_one_mask_at_a_time():
    rng = np.random.default_rng(3)
    smooth = np.kron(rng.integers(0, 256, (6, 6)), np.ones((5, 5))).astype(np.uint8)       # plateaus
    noisy = rng.integers(0, 256, (30, 30)).astype(np.uint8)
    cuts = np.array([0, 10, 10, 100, 200, 254, 255])
    for scoremap in (smooth, noisy):
        fast = threshold_boxes(scoremap, cuts)
        for cut, boxes in zip(cuts, fast):
            assert sorted(map(tuple, boxes.tolist())) == sorted(contour_boxes(scoremap > cut))


def test_opencv_itself_when_installed():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(7)
    for trial in range(300):
        h, w = (int(v) for v in rng.integers(1, 40, size=2))
        if trial % 2:
            mask = rng.random((h, w)) < 0.5
        else:
            small = rng.random((h // 4 + 2, w // 4 + 2)).astype(np.float32)
            mask = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC) > 0.5
        contours = cv2.findContours(mask.astype(np.uint8) * 255, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
        expected = sorted((x, y, min(x + bw, w - 1), min(y + bh, h - 1))
                          for x, y, bw, bh in map(cv2.boundingRect, contours)) or [(0, 0, 0, 0)]
        assert boxes_of(mask) == expected
