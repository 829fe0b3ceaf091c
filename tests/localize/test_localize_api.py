"""The localize API: example boxes are the boxes the metric credits, Fig. 8 draws them where they are, a model
without [cls] is scored through its head, curves of disjoint runs merge to the curve of one run."""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.patches import Rectangle

from attnflow.localize import localize, merge_curves, read_boxes
from attnflow.plot.localization import plot_localization_examples
from attnflow.localize.protocol import LocalizationError
from attnflow.models.load import load_model
from attnflow.probes.heads import ProbeHead
from attnflow.probes.specs import parse_head_spec
from localize_brute import contour_boxes, iou_formula
from probe_data import one_thread  # noqa: F401  (autouse fixture)
from localize_data import ARCH, KW, write_boxes


def test_examples_are_the_credited_boxes_and_the_figure_draws_them(photo_folder, tmp_path):
    write_boxes(photo_folder, tmp_path / "boxes.csv")
    model = load_model(ARCH, random_init=True, img_size=64, **KW)
    torch.manual_seed(0)
    head = ProbeHead(parse_head_spec("abmilp"), dim=32, num_classes=3, has_cls=True)
    result = localize(model, photo_folder, read_boxes(tmp_path / "boxes.csv"), head=head, img_size=64,
                      examples=3, progress=False)
    assert len(result.examples) == 3
    curve = result.curve
    for ex in result.examples:
        assert ex.image.shape == (64, 64, 3) and ex.image.dtype == np.uint8
        for source, box in ex.boxes.items():
            rows = curve[(curve["source"] == source) & (curve["iou_threshold"] == 50)]
            t = rows["cam_threshold"].to_numpy()[int(np.argmax(rows["hits"].to_numpy()))]
            u8 = ex.maps[source]
            candidates = contour_boxes(u8 > int(t * int(u8.max())))
            best = max(max(iou_formula(c, tuple(g)) for g in ex.gt.tolist()) for c in candidates)
            assert ex.ious[source] == pytest.approx(best)
            assert tuple(box.tolist()) in candidates
    fig = plot_localization_examples(result.examples, result.labels)
    ax = fig.axes[0]
    rects = [(p.get_edgecolor(), p.get_xy(), p.get_width(), p.get_height()) for p in ax.patches
             if isinstance(p, Rectangle)]
    ex = result.examples[0]
    gt = ex.gt[0]
    assert len(rects) == len(ex.gt) + 2
    from matplotlib.colors import to_rgba
    blue = [r for r in rects if r[0] == to_rgba("tab:blue")][0]
    assert blue[1] == (gt[0] - 0.5, gt[1] - 0.5) and blue[2] == gt[2] - gt[0] + 1 and blue[3] == gt[3] - gt[1] + 1
    assert {r[0] for r in rects} == {to_rgba("tab:blue"), to_rgba("tab:red"), to_rgba("tab:green")}
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["ground truth", "[cls] attention map",
                                                                  "Selective Aggregation map"]


def test_model_without_cls_uses_its_head(photo_folder, tmp_path):
    write_boxes(photo_folder, tmp_path / "boxes.csv")
    truth = read_boxes(tmp_path / "boxes.csv")
    model = load_model("vit_small_patch16_224", random_init=True, img_size=64, class_token=False,
                       global_pool="avg", **KW)
    with pytest.raises(LocalizationError, match="no \\[cls\\] token"):
        localize(model, photo_folder, truth, img_size=64, progress=False)
    head = ProbeHead(parse_head_spec("abmilp"), dim=32, num_classes=3, has_cls=False)
    result = localize(model, photo_folder, truth, head=head, img_size=64, progress=False)
    assert result.meta["sources"] == ["head:abmilp"] and list(result.max_box_acc_v2()) == ["head:abmilp"]


def test_curves_of_disjoint_runs_merge_exactly(photo_folder, tmp_path):
    write_boxes(photo_folder, tmp_path / "boxes.csv")
    lines = (tmp_path / "boxes.csv").read_text().splitlines()
    (tmp_path / "a.csv").write_text("\n".join(lines[:4]) + "\n")
    (tmp_path / "b.csv").write_text("\n".join(lines[:1] + lines[4:]) + "\n")
    model = load_model(ARCH, random_init=True, img_size=64, **KW)
    run = {name: localize(model, photo_folder, read_boxes(tmp_path / name), img_size=64, progress=False).curve
           for name in ("boxes.csv", "a.csv", "b.csv")}
    merged = merge_curves([run["a.csv"], run["b.csv"]])
    pd.testing.assert_frame_equal(merged.reset_index(drop=True), run["boxes.csv"].reset_index(drop=True),
                                  check_dtype=False)
    with pytest.raises(LocalizationError, match="share"):
        merge_curves([run["a.csv"], run["a.csv"][run["a.csv"]["iou_threshold"] != 70]])
