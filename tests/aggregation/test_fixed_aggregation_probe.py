"""Fixed-weight representations (paper Table 5's accuracy column): features equal the hand-weighted sum of
tokens, a reference model sees the same pixels, and `attnflow probe --aggregation` trains the cls head on them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from attnflow.cli import main
from attnflow.maps import patch_maps
from attnflow.aggregation.capture import fixed_aggregation_features
from attnflow.encode import TokenEncoder
from attnflow.aggregation.sources import AggregationError
from attnflow.data.transforms import normalization
from attnflow.aggregation.capture import FixedAggregationEncoder, check_reference
from attnflow.probes.outputs import load_head
from attnflow.tap import AttentionTap
from conftest import tiny_model
from probe_data import one_thread  # noqa: F401  (autouse fixture)

MAIN_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))   # ImageNet (vit_small_patch16_224.dino)
REF_NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))                 # vit_base_patch16_224.augreg_in21k


def photo_batch(photos, size: int = 64) -> torch.Tensor:
    """Raw RGB pixels in [0, 1], ``[4, 3, size, size]``."""
    return torch.stack([torch.as_tensor(np.array(Image.fromarray(photos[k]).resize((size, size))),
                                        dtype=torch.float32).permute(2, 0, 1) / 255 for k in sorted(photos)[:4]])


def normalise(raw: torch.Tensor, norm) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in norm)
    return (raw - mean) / std


def last_attention(model, images):
    with AttentionTap(model, blocks=[-1]) as tap, torch.no_grad():
        model(images)
        return tap.maps[0], tap.layout


@pytest.mark.parametrize("source", ["cls_mean", "cls_min_entropy", "central_sum"])
@pytest.mark.parametrize("block", [-1, 0])
def test_features_are_the_hand_weighted_sum_of_patch_tokens(photos, source, block):
    """The summed sources (the official scale of central / reference: is tested in test_official_code.py)."""
    model = tiny_model(img_size=64, reg_tokens=2)
    images = normalise(photo_batch(photos), MAIN_NORM)
    features, weights = fixed_aggregation_features(model, images, source, block=block, return_weights=True)
    tokens = TokenEncoder(model, block=block)(images)               # [4, 1 + 16, 32]: [cls] + patches
    attn, lay = last_attention(model, images)                       # weights always from the last block
    assert features.shape == (4, 32) and weights.shape == (4, 16)
    for i in range(4):
        w = getattr(patch_maps(attn[i], lay), source.removesuffix("_sum")).reshape(-1)
        np.testing.assert_allclose(weights[i].numpy(), w, rtol=1e-6, atol=1e-8)
        want = sum(float(w[j]) * tokens[i, 1 + j].double() for j in range(16))
        np.testing.assert_allclose(features[i].numpy(), want.numpy(), rtol=1e-5, atol=1e-5)


def test_reference_sees_the_same_pixels_in_its_own_normalisation(photos):
    model = tiny_model("vit_small_patch16_224.dino", img_size=64)
    reference = tiny_model("vit_base_patch16_224.augreg_in21k", img_size=64, seed=3, embed_dim=48)
    assert (normalization(model), normalization(reference)) == (MAIN_NORM, REF_NORM)
    raw = photo_batch(photos)
    features, weights = fixed_aggregation_features(model, normalise(raw, MAIN_NORM), "reference_sum:augreg",
                                                   reference=reference, return_weights=True)
    ref_attn, ref_lay = last_attention(reference, normalise(raw, REF_NORM))  # by hand: the reference's own mean/std
    tokens = TokenEncoder(model)(normalise(raw, MAIN_NORM))
    for i in range(4):
        w = patch_maps(ref_attn[i], ref_lay).cls_mean.reshape(-1)
        np.testing.assert_allclose(weights[i].numpy(), w, rtol=1e-5, atol=1e-7)
        want = sum(float(w[j]) * tokens[i, 1 + j].double() for j in range(16))
        np.testing.assert_allclose(features[i].numpy(), want.numpy(), rtol=1e-4, atol=1e-5)
    # fed the main model's normalisation unchanged, the reference would give other weights
    wrong_attn, _ = last_attention(reference, normalise(raw, MAIN_NORM))
    assert not np.allclose(weights[0].numpy(), patch_maps(wrong_attn[0], ref_lay).cls_mean.reshape(-1), atol=1e-6)


def test_reference_errors_are_one_line(photos):
    model = tiny_model(img_size=64)
    images = normalise(photo_batch(photos), MAIN_NORM)
    fine_grid = tiny_model(img_size=64, patch_size=8, seed=1)
    with pytest.raises(AggregationError, match="sees a 8x8 patch grid where the model sees 4x4"):
        check_reference(model, fine_grid, 64)
    with pytest.raises(AggregationError, match="8x8 patch grid"):  # caught per batch as well
        fixed_aggregation_features(model, images, "reference:x", reference=fine_grid)
    no_cls = tiny_model(img_size=64, class_token=False, global_pool="avg")
    with pytest.raises(AggregationError, match="has no \\[cls\\] token"):
        check_reference(model, no_cls)
    with pytest.raises(AggregationError, match="needs the reference model"):
        fixed_aggregation_features(model, images, "reference:dino-vit-b16")
    with pytest.raises(AggregationError, match="needs a \\[cls\\] token"):
        fixed_aggregation_features(no_cls, images, "cls_min_entropy")
    assert fixed_aggregation_features(no_cls, images, "central").shape == (4, 32)


def test_fingerprint_covers_source_and_reference_weights():
    model = tiny_model(img_size=64)
    ref_a = tiny_model(img_size=64, seed=1)
    ref_b = tiny_model(img_size=64, seed=2)
    prints = {FixedAggregationEncoder(model, s).fingerprint for s in ("cls_mean", "cls_min_entropy", "central")}
    prints |= {FixedAggregationEncoder(model, "reference:r", reference=r).fingerprint for r in (ref_a, ref_b)}
    prints.add(TokenEncoder(model).fingerprint)
    assert len(prints) == 6
    same = [FixedAggregationEncoder(model, "central").fingerprint for _ in range(2)]
    assert same[0] == same[1]


# ------------------------------------------------------------------------------------------ the probe
TINY = ["--model", "vit_small_patch16_224", "--random-init", "--img-size", "32", "--model-kw", "depth=2",
        "--model-kw", "embed_dim=32", "--model-kw", "num_heads=4", "--model-kw", "mlp_ratio=2.0"]


@pytest.fixture()
def folder_task(tmp_path: Path, photos) -> Path:
    """ROOT/train and ROOT/val class folders of real photos: 2 classes, 6 train and 4 val images."""
    root = tmp_path / "task"
    keys = sorted(photos)
    for split, n in (("train", 6), ("val", 4)):
        for i in range(n):
            path = root / split / f"class{i % 2}" / f"img{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(photos[keys[i % len(keys)]]).resize((40, 36)).save(path)
    return root


def probe(root: Path, out: Path, *extra: str) -> int:
    return main(["probe", *TINY, "--task", "folder", "--data", str(root), "--out", str(out), "--seeds", "1",
                 "--epochs", "2", "--batch-size", "4", "--micro-batch", "2", "--lr", "0.5", "--warmup-epochs", "0",
                 "--workers", "0", "--no-progress", *extra])


def test_probe_with_fixed_aggregation_trains_the_cls_head_on_one_token(folder_task, tmp_path, capsys):
    out = tmp_path / "run"
    assert probe(folder_task, out, "--aggregation", "cls_mean", "--cache") == 0
    table = pd.read_parquet(out / "results.parquet")
    assert set(table["head"]) == {"fixed:cls_mean"} and len(table) == 2
    meta = json.loads((out / "results.json").read_text())
    assert meta["aggregation"]["source"] == "cls_mean" and meta["config"]["aggregation"] == "cls_mean"
    manifest = json.loads((out / "cache" / "val" / "manifest.json").read_text())
    assert manifest["shape"][2] == 1  # [views, n, 1 token, D]: the cache holds the aggregated token
    head = load_head(out / "seed0" / "heads" / "cls.pt")
    assert head.meta["aggregation"] == "cls_mean"
    # the cached token is exactly the weighted sum (bf16 in the cache)
    from attnflow.models.load import load_model
    from attnflow.probes.protocols import resolve_config
    from attnflow.probes.tasks import load_task

    model = load_model("vit_small_patch16_224", random_init=True, img_size=32, depth=2, embed_dim=32, num_heads=4,
                       mlp_ratio=2.0)
    data = load_task(resolve_config("folder", img_size=32), folder_task, model)
    images = torch.stack([data.val[i][0] for i in range(4)])
    want = fixed_aggregation_features(model, images, "cls_mean")
    cached = torch.from_numpy(np.load(out / "cache" / "val" / "tokens.npy")).view(torch.bfloat16).float()[0, :, 0]
    np.testing.assert_allclose(cached.numpy(), want.numpy(), rtol=1e-2, atol=1e-2)
    # another source is another encoder: resuming this run with it is refused, a new --out works
    capsys.readouterr()
    assert probe(folder_task, out, "--aggregation", "central", "--cache", "--resume") == 2
    assert "differs in encoder" in capsys.readouterr().err
    assert probe(folder_task, tmp_path / "run2", "--aggregation", "central") == 0
    assert set(pd.read_parquet(tmp_path / "run2" / "results.parquet")["head"]) == {"fixed:central"}


def test_probe_aggregation_errors_are_one_line(folder_task, tmp_path, capsys):
    assert probe(folder_task, tmp_path / "a", "--aggregation", "cls_mean", "--heads", "cls,abmilp") == 2
    err = capsys.readouterr().err
    assert "only the cls head reads it, not abmilp" in err and len(err.strip().splitlines()) == 1
    assert probe(folder_task, tmp_path / "b", "--aggregation", "cls_maen") == 2
    assert "did you mean cls_mean" in capsys.readouterr().err
    assert probe(folder_task, tmp_path / "c", "--aggregation", "reference:vit_small_patch16_224",
                 "--reference-random-init", "--reference-model-kw", "patch_size=8", "--reference-model-kw", "depth=1",
                 "--reference-model-kw", "embed_dim=32", "--reference-model-kw", "num_heads=4") == 2
    assert "sees a 4x4 patch grid where vit_small_patch16_224 sees 2x2" in capsys.readouterr().err
    assert probe(folder_task, tmp_path / "d", "--reference-random-init") == 2
    assert "apply to --aggregation reference:<model-name> only" in capsys.readouterr().err
