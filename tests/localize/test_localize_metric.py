"""MaxBoxAccV2 against brute-force loops and hand-made score maps with known answers; score-map resizing
against OpenCV's cubic kernel by definition; streaming merge and all_reduce."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnflow.localize.metric import (BoxAccuracy, LocalizationError, best_ious, box_iou, cam_thresholds,
                                      resize_boxes)
from attnflow.localize.scoremaps import normalize_scoremaps, quantize_scoremaps, upsample_scoremaps
from localize_brute import brute_hits, cubic_resize, iou, max_box_acc_v2


def smooth_maps(n: int, grid: int = 4, size: int = 24, seed: int = 0) -> np.ndarray:
    """uint8 score maps as the pipeline makes them: a random patch grid, bicubic-resized, normalised."""
    g = torch.from_numpy(np.random.default_rng(seed).random((n, grid, grid)) ** 3)
    return quantize_scoremaps(g, (size, size)).numpy()


def test_box_iou_and_resize_by_hand():
    gt = np.array([[0, 0, 9, 9], [5, 5, 14, 14]])
    boxes = np.array([[0, 0, 9, 9], [0, 0, 4, 4], [20, 20, 21, 21], [0, 0, 0, 0]])
    expected = [[iou(b, g) for g in gt.tolist()] for b in boxes.tolist()]
    np.testing.assert_allclose(box_iou(boxes, gt), expected)
    assert box_iou(boxes, gt)[0, 1] == pytest.approx(25 / 175)             # 5x5 overlap of two 10x10 boxes
    # ILSVRC2012_val_00000001: 500x375, box (111, 108, 441, 193) -> 224x224 truncates 49.728, 64.512, ...
    np.testing.assert_array_equal(resize_boxes(np.array([[111, 108, 441, 193]]), (500, 375), (224, 224)),
                                  [[49, 64, 197, 115]])


def test_thresholds_are_wsolevaluations():
    t = cam_thresholds(0.01)
    assert len(t) == 100 and t[0] == 0 and t[-1] == pytest.approx(0.99)
    assert [int(v * 255) for v in t][:5] == [0, 2, 5, 7, 10]
    with pytest.raises(LocalizationError):
        cam_thresholds(1.5)


def test_hits_match_brute_force_loops():
    maps = smooth_maps(6)
    gts = [np.array([[3, 4, 15, 20]]), np.array([[0, 0, 23, 23]]), np.array([[2, 2, 6, 6], [12, 10, 22, 21]]),
           np.array([[10, 0, 23, 11]]), np.array([[5, 5, 5, 5]]), np.array([[0, 12, 11, 23], [14, 1, 20, 9]])]
    acc = BoxAccuracy()
    brute = []
    for u8, gt in zip(maps, gts):
        expected = brute_hits(u8, gt.tolist())
        np.testing.assert_array_equal(acc.hits_of(u8, gt), expected.astype(bool))
        acc.update(u8, gt)
        brute.append(expected)
    v2, per_iou = max_box_acc_v2(brute)
    summary = acc.compute()
    assert summary.images == 6
    np.testing.assert_allclose(summary.max_box_acc, per_iou)
    assert summary.max_box_acc_v2 == pytest.approx(v2)
    assert 0 < v2 < 100  # the maps are neither perfect nor useless


def test_other_iou_thresholds_and_interval_match_brute_force():
    maps = smooth_maps(3, seed=4)
    gt = np.array([[4, 4, 18, 16]])
    acc = BoxAccuracy((25, 60), cam_curve_interval=0.05)
    for u8 in maps:
        np.testing.assert_array_equal(acc.hits_of(u8, gt), brute_hits(u8, gt.tolist(), 0.05, (25, 60)))


def test_a_map_that_covers_the_box_scores_100():
    u8 = np.zeros((60, 80), np.uint8)
    u8[10:40, 20:70] = 255                               # columns 20..69, rows 10..39
    gt = np.array([[20, 10, 69, 39]])
    ious = best_ious(u8, gt, cam_thresholds())
    # wsolevaluation's box is one pixel larger on the far sides (x + w, y + h): 50x30 of 51x31 pixels
    np.testing.assert_allclose(ious, 50 * 30 / (51 * 31))
    acc = BoxAccuracy()
    acc.update(u8, gt)
    assert acc.compute().max_box_acc_v2 == 100.0


def test_uniform_maps():
    gt = np.array([[30, 20, 59, 49]])
    # constant: wsolevaluation's normalize_scoremap makes it all zeros -> no contour -> box [0, 0, 0, 0]
    # (0.5 survives bicubic resizing exactly; 0.3 picks up float rounding, which min-max normalisation blows
    # up into an arbitrary map, with OpenCV's INTER_CUBIC as well)
    const = quantize_scoremaps(torch.full((1, 4, 4), 0.5), (64, 64)).numpy()[0]
    assert const.max() == 0
    np.testing.assert_allclose(best_ious(const, gt, cam_thresholds()), 0.0)
    np.testing.assert_allclose(best_ious(const, np.array([[0, 0, 9, 9]]), cam_thresholds()), 1 / 100)
    # uniform but for one corner pixel: every threshold keeps the whole image, clipped to (W - 1, H - 1)
    flat = np.full((64, 64), 255, np.uint8)
    flat[63, 63] = 0
    whole = (0, 0, 63, 63)
    np.testing.assert_allclose(best_ious(flat, gt, cam_thresholds()), iou(whole, tuple(gt[0])))
    assert iou(whole, tuple(gt[0])) == pytest.approx(900 / 4096)


def test_multi_object_ground_truth_takes_the_best_box():
    u8 = np.zeros((40, 40), np.uint8)
    u8[2:12, 2:12] = 200                                  # one blob on the first object
    u8[25:38, 20:36] = 255                                # a brighter blob on the second
    gts = np.array([[2, 2, 11, 11], [20, 25, 35, 37]])
    ious = best_ious(u8, gts, cam_thresholds())
    t = cam_thresholds()
    first = iou((2, 2, 12, 12), (2, 2, 11, 11))
    second = iou((20, 25, 36, 38), (20, 25, 35, 37))
    # below 200/255 both blobs are boxes (the best one counts); above it only the brighter one remains
    np.testing.assert_allclose(ious, np.where((t * 255).astype(int) < 200, max(first, second), second))
    only_first = best_ious(u8, gts[:1], cam_thresholds())
    np.testing.assert_allclose(only_first[(t * 255).astype(int) < 200], first)
    np.testing.assert_allclose(only_first[(t * 255).astype(int) >= 200], iou((20, 25, 36, 38), (2, 2, 11, 11)))


def test_hole_contours_count_as_wsolevaluation_counts_them():
    u8 = np.zeros((50, 50), np.uint8)
    u8[5:45, 5:45] = 255
    u8[15:35, 15:35] = 0                                  # a ring: the object is the hole
    gt = np.array([[14, 14, 36, 36]])
    with_holes = best_ious(u8, gt, cam_thresholds())
    without = best_ious(u8, gt, cam_thresholds(), holes=False)
    # the hole (rows/cols 15..34) contour's box is one pixel wider on each side, plus wsolevaluation's + w
    np.testing.assert_allclose(with_holes, 1.0)
    np.testing.assert_allclose(without, iou((5, 5, 45, 45), (14, 14, 36, 36)))
    assert without[0] < 0.5  # only the hole's box localises the object at IoU 50


def test_upsampling_is_opencv_cubic_by_definition():
    g = np.random.default_rng(1).random((2, 4, 5))
    up = upsample_scoremaps(torch.from_numpy(g), (16, 20)).numpy()
    for k in range(2):
        np.testing.assert_allclose(up[k], cubic_resize(g[k], (16, 20)), atol=2e-6)


def test_normalize_and_quantize_by_hand():
    maps = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[2.0, 2.0], [2.0, 2.0]], [[0.0, float("nan")], [1.0, 2.0]]])
    norm = normalize_scoremaps(maps)
    np.testing.assert_allclose(norm[0].numpy(), [[0, 0.5], [0.25, 1]])
    assert norm[1].abs().sum() == 0 and norm[2].abs().sum() == 0   # constant / NaN -> zeros
    g = np.random.default_rng(2).random((3, 3)).astype(np.float32)
    u8 = quantize_scoremaps(torch.from_numpy(g)[None], (9, 9))[0].numpy()
    ref = upsample_scoremaps(torch.from_numpy(g)[None], (9, 9))[0].numpy()
    ref = ref - ref.min()
    ref = ref / ref.max()
    np.testing.assert_array_equal(u8, (ref * 255).astype(np.uint8))
    assert u8.max() == 255 and u8.min() == 0


def test_merge_equals_one_pass_and_state_round_trip():
    maps = smooth_maps(8, seed=2)
    gt = np.array([[4, 2, 20, 15]])
    whole, parts = BoxAccuracy(), [BoxAccuracy(), BoxAccuracy(), BoxAccuracy()]
    for i, u8 in enumerate(maps):
        whole.update(u8, gt)
        parts[i % 3].update(u8, gt)
    merged = parts[0].merge(parts[1]).merge(parts[2])
    np.testing.assert_array_equal(merged.hits, whole.hits)
    assert merged.count == whole.count == 8
    again = BoxAccuracy.from_state_dict(whole.state_dict())
    np.testing.assert_array_equal(again.hits, whole.hits)
    assert again.hits.dtype == np.int64
    with pytest.raises(LocalizationError, match="cannot merge"):
        whole.merge(BoxAccuracy((50,)))
    with pytest.raises(LocalizationError, match="no image"):
        BoxAccuracy().compute()
    with pytest.raises(LocalizationError, match="non-empty"):
        whole.update(maps[0], np.zeros((0, 4)))
    with pytest.raises(LocalizationError, match="uint8"):
        whole.update(maps[0].astype(np.float32), gt)


def test_all_reduce_in_a_one_process_gloo_group(tmp_path):
    import torch.distributed as dist

    maps = smooth_maps(3, seed=5)
    gt = np.array([[2, 2, 20, 20]])
    acc = BoxAccuracy()
    for u8 in maps:
        acc.update(u8, gt)
    before = acc.hits.copy()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        acc.all_reduce()
    finally:
        dist.destroy_process_group()
    np.testing.assert_array_equal(acc.hits, before)
    assert acc.count == 3 and acc.hits.dtype == np.int64
