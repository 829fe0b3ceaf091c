"""`attnflow localize` end to end on a tiny random-init model and real photos, checked against per-image maps
from the plotting and probe code and the brute-force metric; error lines; two gloo processes == one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from attnflow.cli import main
from attnflow.localize.scoremaps import quantize_scoremaps
from attnflow.models.load import load_model
from attnflow.maps import capture_maps
from attnflow.probes.heads import ProbeHead
from attnflow.maps import aggregation_maps
from attnflow.probes.outputs import load_head, save_head
from attnflow.probes.specs import parse_head_spec
from localize_brute import brute_hits, max_box_acc_v2
from probe_data import one_thread, peaked_abmilp_file  # noqa: F401  (one_thread: autouse fixture)
from localize_data import ARCH, KW, MODEL, write_boxes

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the .dino tag's ImageNet normalisation


@pytest.fixture()
def head_file(tmp_path: Path) -> Path:
    return peaked_abmilp_file(tmp_path / "abmilp.pt", seed=3)


def reference(folder: Path, boxes: dict, head_path: Path) -> dict[str, list[np.ndarray]]:
    """Per-image hits: PIL resize, one image per forward, maps from plot.maps / probes.maps, brute-force metric."""
    model = load_model(ARCH, random_init=True, img_size=64, **KW)
    head = load_head(head_path)
    hits: dict[str, list[np.ndarray]] = {"cls_mean": [], "head:abmilp": []}
    for name, gts in boxes.items():
        try:
            img = Image.open(folder / name).convert("RGB")
        except OSError:
            continue
        w, h = img.size
        x = torch.from_numpy(np.asarray(img.resize((64, 64), Image.BILINEAR), np.float32) / 255).permute(2, 0, 1)
        x = ((x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1))[None]
        maps = {"cls_mean": torch.from_numpy(capture_maps(model, x)[0].cls_mean),
                "head:abmilp": aggregation_maps(model, head, x)[0]}
        gt = [(int(a * 64 / w), int(b * 64 / h), int(c * 64 / w), int(d * 64 / h)) for a, b, c, d in gts]
        for source, grid in maps.items():
            u8 = quantize_scoremaps(grid[None], (64, 64)).numpy()[0]
            hits[source].append(brute_hits(u8, gt))
    return hits


def test_localize_end_to_end_matches_brute_force(photo_folder, tmp_path, head_file, capsys):
    (photo_folder / "ILSVRC2012_val_00000099.JPEG").write_bytes(b"not a jpeg")
    boxes = write_boxes(photo_folder, tmp_path / "boxes.csv")
    out = tmp_path / "loc"
    assert main(["localize", *MODEL, "--head", str(head_file), "--data", str(photo_folder), "--boxes",
                 str(tmp_path / "boxes.csv"), "--out", str(out), "--batch-size", "1", "--examples", "3",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "[cls] attention map" in printed and "Selective Aggregation map" in printed
    assert "skipped 1 unreadable" in printed and "1 image(s) of the folder have no box" in printed

    frame = pd.read_parquet(out / "localization.parquet")
    pd.testing.assert_frame_equal(frame, pd.read_csv(out / "localization.csv"), check_dtype=False)
    meta = json.loads((out / "localization.json").read_text())
    n_photos = len(boxes) - 1
    assert meta["images_used"] == n_photos and meta["images_skipped"] == 1
    assert meta["images_without_boxes"] == 1 and meta["boxes"]["format"] == "csv"
    assert meta["sources"] == ["cls_mean", "head:abmilp"] and meta["random_init"] is True
    assert (out / "examples.pdf").stat().st_size > 0 and (out / "examples.png").stat().st_size > 0

    expected = reference(photo_folder, boxes, head_file)
    curve = pd.read_parquet(out / "curve.parquet")
    for source, per_image in expected.items():
        assert len(per_image) == n_photos
        v2, per_iou = max_box_acc_v2(per_image)
        rows = frame[frame["source"] == source]
        assert rows[rows["metric"] == "MaxBoxAccV2"]["value"].item() == pytest.approx(v2)
        acc = rows[rows["metric"] == "MaxBoxAcc"]
        assert acc["iou_threshold"].tolist() == [30, 50, 70]
        np.testing.assert_allclose(acc["value"], per_iou)
        total = sum(per_image)                                                     # [3, 100]
        hits = curve[curve["source"] == source].sort_values(["iou_threshold", "cam_threshold"])["hits"]
        np.testing.assert_array_equal(hits.to_numpy().reshape(3, 100), total)
        best = [round(int(np.argmax(row)) * 0.01, 6) for row in total]
        np.testing.assert_allclose(acc["best_cam_threshold"], best)


def test_without_head_only_the_cls_map(photo_folder, tmp_path):
    boxes = tmp_path / "LOC_val_solution.csv"
    boxes.write_text("ImageId,PredictionString\n" + "".join(
        f"{p.stem},n01440764 10 10 200 200 \n" for p in sorted(photo_folder.glob("*.JPEG"))))
    out = tmp_path / "loc"
    assert main(["localize", *MODEL, "--data", str(photo_folder), "--boxes", str(boxes), "--out", str(out),
                 "--limit", "3", "--examples", "0", "--no-progress"]) == 0
    frame = pd.read_parquet(out / "localization.parquet")
    assert set(frame["source"]) == {"cls_mean"} and frame["images"].unique().tolist() == [3]
    assert not (out / "examples.pdf").exists()


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_error_lines(photo_folder, tmp_path, capsys):
    base = ["localize", *MODEL, "--data", str(photo_folder), "--out", str(tmp_path / "o"), "--no-progress"]
    bad = tmp_path / "bad.csv"
    bad.write_text("path,x1,y1,x2,y2\nILSVRC2012_val_00000001.JPEG,10,10,5,40\n")
    assert main([*base, "--boxes", str(bad)]) == 2
    assert f"{bad}: line 2" in error_line(capsys)
    assert main([*base, "--boxes", str(tmp_path / "missing.csv")]) == 2
    assert "no such boxes file" in error_line(capsys)
    other = tmp_path / "other.csv"
    other.write_text("elsewhere/cat.jpg,1,1,5,5\n")
    assert main([*base, "--boxes", str(other)]) == 2
    assert "none of the" in error_line(capsys)
    good = tmp_path / "good.csv"
    good.write_text("ILSVRC2012_val_00000001.JPEG,1,1,50,50\n")
    no_cls = ["localize", "--model", "vit_small_patch16_224", "--random-init", "--img-size", "64",
              "--model-kw", "class_token=False", "--model-kw", "global_pool=avg",
              *[x for k, v in KW.items() for x in ("--model-kw", f"{k}={v}")],
              "--data", str(photo_folder), "--boxes", str(good), "--out", str(tmp_path / "o")]
    assert main(no_cls) == 2
    assert "no [cls] token" in error_line(capsys)
    assert main([*base, "--boxes", str(good), "--img-size", "72"]) == 2
    assert "multiple of 16" in error_line(capsys)
    foreign = save_head(tmp_path / "foreign.pt", ProbeHead(parse_head_spec("abmilp"), 32, 3, True),
                        meta={"model": "mae-vit-b16", "block": -1, "layernorm": False})
    assert main([*base, "--boxes", str(good), "--head", str(foreign)]) == 2
    assert f"{foreign} was trained on mae-vit-b16, not on {ARCH}" in error_line(capsys)
