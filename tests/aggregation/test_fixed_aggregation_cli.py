"""`attnflow aggregate` end to end on tiny random-init models and real photos (one corrupt file), checked
against per-image maps, a head's own scores and brute-force entropy / KL loops."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.collections import QuadMesh

from attnflow.cli import main
from attnflow.data.images import ImageFolderDataset
from attnflow.data.transforms import eval_transform
from attnflow.models.load import load_model
from attnflow.maps import patch_maps
from attnflow.plot.kld import plot_kld_heatmap
from attnflow.encode import TokenEncoder
from attnflow.aggregation.statistics import Q_FLOOR
from attnflow.probes.heads import ProbeHead
from attnflow.probes.outputs import save_head
from attnflow.probes.specs import parse_head_spec
from attnflow.tap import AttentionTap
from probe_data import one_thread, peaked_abmilp_file  # noqa: F401  (one_thread: autouse fixture)
from brute_force import assert_matches_brute_statistics

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
KW = dict(depth=2, embed_dim=32, num_heads=4, mlp_ratio=2.0)
MAIN = ["--model", "vit_small_patch16_224.dino", "--random-init", "--img-size", "64",
        *[x for k, v in KW.items() for x in ("--model-kw", f"{k}={v}")]]
REF_KW = dict(depth=1, embed_dim=48, num_heads=3)
REF = ["--reference", "vit_base_patch16_224.augreg_in21k", "--reference-random-init",
       *[x for k, v in REF_KW.items() for x in ("--reference-model-kw", f"{k}={v}")]]


@pytest.fixture()
def head_file(tmp_path: Path) -> Path:
    return peaked_abmilp_file(tmp_path / "abmilp.pt", seed=5)


def test_aggregate_end_to_end_matches_brute_force(photo_folder, tmp_path, head_file, capsys):
    (photo_folder / "ILSVRC2012_val_00000099.JPEG").write_bytes(b"not a jpeg")
    out = tmp_path / "agg"
    assert main(["aggregate", *MAIN, *REF, "--head", str(head_file), "--data", str(photo_folder), "--out", str(out),
                 "--batch-size", "3", "--no-progress", "--decode", "pil"]) == 0  # the brute force reads with PIL
    printed = capsys.readouterr().out
    assert "Average DINO [cls] token attention" in printed and "AbMILP" in printed and "skipped 1" in printed
    frame = pd.read_parquet(out / "aggregation.parquet")
    pd.testing.assert_frame_equal(frame, pd.read_csv(out / "aggregation.csv", keep_default_na=False),
                                  check_dtype=False)
    meta = json.loads((out / "aggregation.json").read_text())
    sources = ["cls_mean", "cls_min_entropy", "central", "reference:vit_base_patch16_224.augreg_in21k",
               "head:abmilp"]
    assert meta["sources"] == sources and meta["images_skipped"] == 1 and meta["n_patches"] == 16
    assert meta["labels"]["cls_mean"] == "Average DINO [cls] token attention"  # the .dino tag's method
    assert meta["reference"]["renormalized"] is True  # ImageNet mean/std -> the reference's 0.5/0.5
    assert (out / "kld.pdf").stat().st_size > 0 and (out / "kld.png").stat().st_size > 0

    # brute force: each model run on its own, one image at a time, every vector from patch_maps / the head
    model = load_model("vit_small_patch16_224.dino", random_init=True, img_size=64, **KW)
    ref = load_model("vit_base_patch16_224.augreg_in21k", random_init=True, img_size=64, **REF_KW)
    from attnflow.probes.outputs import load_head

    head = load_head(head_file)
    main_data = ImageFolderDataset(photo_folder, eval_transform(model, img_size=64))
    vectors: dict[str, list[list[float]]] = {s: [] for s in sources}
    for i in range(len(main_data)):
        item = main_data[i]
        if not isinstance(item, tuple):
            continue
        x = item[0][None]
        with AttentionTap(model, blocks=[-1]) as tap, torch.no_grad():
            model(x)
            maps = patch_maps(tap.maps[0][0], tap.layout)
        for s in sources[:3]:
            vectors[s].append(getattr(maps, s).reshape(-1).tolist())
        pixels = x * IMAGENET_STD + IMAGENET_MEAN  # the crop's pixels, normalised by hand for the reference
        with AttentionTap(ref, blocks=[-1]) as tap, torch.no_grad():
            ref((pixels - 0.5) / 0.5)
            vectors[sources[3]].append(patch_maps(tap.maps[0][0], tap.layout).cls_mean.reshape(-1).tolist())
        tokens = TokenEncoder(model)(x)
        vectors["head:abmilp"].append(head.scores(tokens)[0, 1:].tolist())
    assert len(vectors["cls_mean"]) == 7 == meta["images_used"]
    ent, _ = assert_matches_brute_statistics(frame, vectors, Q_FLOOR, abs_entropy=2e-6, rel_kld=1e-3, abs_kld=2e-6)
    assert ent["head:abmilp"] < math.log(16) - 0.1  # the peaked head is far from uniform


def test_heatmap_draws_the_matrix_in_source_order():
    rows = [{"metric": "kld", "source": s, "target": t, "mean": float(10 * i + j)}
            for i, s in enumerate("abc") for j, t in enumerate("abc")]
    frame = pd.DataFrame(rows + [{"metric": "entropy", "source": "a", "target": "", "mean": 9.0}])
    ax = plot_kld_heatmap(frame, labels={"a": "Average MAE [cls] token attention"}, sources=["c", "a", "b"])
    mesh = next(c for c in ax.collections if isinstance(c, QuadMesh))
    np.testing.assert_array_equal(np.asarray(mesh.get_array()).reshape(3, 3),
                                  [[22, 20, 21], [2, 0, 1], [12, 10, 11]])
    assert [t.get_text().replace("\n", " ") for t in ax.get_yticklabels()] == [
        "c", "Average MAE [cls] token attention", "b"]


def test_aggregate_error_lines(photo_folder, tmp_path, capsys):
    def run(*extra: str) -> str:
        assert main(["aggregate", *MAIN, "--data", str(photo_folder), "--out", str(tmp_path / "o"), "--no-progress",
                     *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    assert "did you mean cls_mean" in run("--sources", "cls_mean,cls_maen")
    assert "sees a 8x8 patch grid where vit_small_patch16_224.dino sees 4x4" in run(
        "--reference", "vit_small_patch16_224", "--reference-random-init", "--reference-model-kw", "patch_size=8",
        "--reference-model-kw", "depth=1", "--reference-model-kw", "embed_dim=32",
        "--reference-model-kw", "num_heads=4")
    wide = save_head(tmp_path / "wide.pt", ProbeHead(parse_head_spec("abmilp"), 48, 3, True))
    assert "trained on tokens of width 48" in run("--head", str(wide))
    foreign = save_head(tmp_path / "foreign.pt", ProbeHead(parse_head_spec("abmilp"), 32, 3, True),
                        meta={"model": "mae-vit-b16", "block": -1, "layernorm": False})
    assert "foreign.pt was trained on mae-vit-b16, not on vit_small_patch16_224.dino" in run("--head", str(foreign))
    cls_head = save_head(tmp_path / "cls.pt", ProbeHead(parse_head_spec("cls"), 32, 3, True))
    assert "is a 'cls' head" in run("--head", str(cls_head))
    assert "needs a reference model" in run("--sources", "central,reference:dino-vit-b16")
    # a reference: source must name the model given as --reference (it was computed with that one, mislabelled)
    assert "reference:dino-vit-b16 names dino-vit-b16 but the reference is" in run(
        *REF, "--sources", "central,reference:dino-vit-b16")
    assert "need --reference MODEL" in run("--reference-random-init")
    assert "softmax in low precision" in run("--amp", "bf16", "--device", "cpu")
    assert "no such file or folder" in main_missing(tmp_path, capsys)
    # a source that needs --reference or --head is refused before any model is loaded (here: a missing file)
    missing = ["--checkpoint", str(tmp_path / "not-downloaded.pth")]
    assert "add --reference dino-vit-b16" in run(*missing, "--sources", "reference:dino-vit-b16")
    assert "needs a trained head: add --head PATH" in run(*missing, "--sources", "head:abmilp")


def main_missing(tmp_path: Path, capsys) -> str:
    assert main(["aggregate", *MAIN, "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    return capsys.readouterr().err


def test_reference_source_must_name_the_reference_model(photo_folder):
    from attnflow.aggregation.sources import AggregationError
    from attnflow.aggregation.analysis import aggregation_statistics

    model = load_model("vit_small_patch16_224.dino", random_init=True, img_size=64, **KW)
    reference = load_model("vit_small_patch16_224.dino", random_init=True, img_size=64, **KW)
    with pytest.raises(AggregationError, match="names dino-vit-b16 but the reference is dino-vit-s16"):
        aggregation_statistics(model, photo_folder, reference=reference, reference_name="dino-vit-s16",
                               sources=["reference:dino-vit-b16"], progress=False)


def test_a_head_of_the_same_model_under_its_preset_name_is_accepted():
    from attnflow.aggregation.capture import AggregationCapture
    from attnflow.probes.backbone import check_head

    capture = AggregationCapture(load_model("vit_small_patch16_224.dino", random_init=True, img_size=64, **KW))
    head = ProbeHead(parse_head_spec("abmilp"), 32, 3, True)
    for name in ("dino-vit-s16", "vit_small_patch16_224.dino"):  # the preset and its timm hub tag: one model
        head.meta = {"model": name}
        check_head(head, capture.encoder)


def test_a_head_of_other_weights_of_the_same_model_is_warned_about(caplog):
    from attnflow.aggregation.capture import AggregationCapture
    from attnflow.probes.backbone import backbone_record, check_head

    model = load_model("vit_small_patch16_224.dino", random_init=True, img_size=64, **KW)
    capture = AggregationCapture(model)
    head = ProbeHead(parse_head_spec("abmilp"), 32, 3, True)
    same = backbone_record(model)
    assert same["img_size"] == [64, 64] and same["random_init"] is True and len(same["weights"]) == 16
    trained = {"random_init": False, "sha256": "b" * 64, "checkpoint_key": None}  # fields of the ModelRecord
    cases = [(same, {}, None),
             (same, trained, "random weights"),
             ({**same, "random_init": False, "checkpoint_sha256": "a" * 64}, trained,
              "the checkpoint with sha256 aaaaaaaaaaaa"),
             ({**same, "random_init": False, "checkpoint_sha256": "b" * 64, "weights": "0" * 16, "img_size": [32, 32]},
              trained, None),  # the same file; a fingerprint taken at another input size is not compared
             ({**same, "random_init": False, "checkpoint_sha256": "b" * 64, "checkpoint_key": "teacher"}, trained,
              "the checkpoint key teacher"),
             ({**same, "weights": "0" * 16}, {}, "weights with fingerprint 0000000000000000"),
             ({}, trained, None)]  # a head saved before weights were recorded
    base = model.attnflow_info
    for head_meta, info, expected in cases:
        head.meta = {"model": "dino-vit-s16", **head_meta}
        model.attnflow_info = dataclasses.replace(base, **info)
        caplog.clear()
        check_head(head, capture.encoder, "h.pt")
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        if expected is None:
            assert not warned, (head_meta, info, warned)
        else:
            assert len(warned) == 1 and f"h.pt was trained on {expected} of dino-vit-s16" in warned[0], warned
