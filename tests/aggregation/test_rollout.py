"""Attention rollout (Abnar & Zuidema 2020) as a source: against products of (0.5 A + 0.5 I) matrices written out
by hand for a planted two-block stack, and against the published code (tests/brute_force.py:
``published_rollout``) on real tiny models, in the statistics, the maps, localization and the probe feature."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from attnflow.aggregation.capture import AggregationCapture, FixedAggregationEncoder
from attnflow.aggregation.rollout import RolloutStream, attention_rollout, rollout_vectors
from attnflow.aggregation.sources import AggregationError, parse_source, source_label
from attnflow.aggregation.statistics import Q_FLOOR
from attnflow.aggregation.vectors import aggregation_vectors
from attnflow.cli import main
from attnflow.data.images import ImageFolderDataset
from attnflow.data.transforms import eval_transform
from attnflow.encode import TokenEncoder
from attnflow.errors import AttnflowError
from attnflow.localize.scoremaps import quantize_scoremaps
from attnflow.maps import MapError, capture_maps
from attnflow.models.load import load_model
from attnflow.tap import AttentionTap
from brute_force import published_rollout
from conftest import tiny_model
from localize_brute import brute_hits, max_box_acc_v2
from probe_data import one_thread  # noqa: F401  (autouse fixture)
from brute_force import assert_matches_brute_statistics

# A planted stack of two blocks, two heads each, three tokens. Each head is a 0/1 attention pattern.
IDENTITY = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
CYCLE = [[0, 1, 0], [0, 0, 1], [1, 0, 0]]            # token i attends token i + 1
BACK = [[0, 0, 1], [1, 0, 0], [0, 1, 0]]             # token i attends token i - 1
TO_LAST = [[0, 0, 1], [0, 0, 1], [0, 0, 1]]          # every token attends token 2
X0, X1 = [IDENTITY, CYCLE], [BACK, TO_LAST]
# Written out by hand: R = 0.5 * mean over heads + 0.5 * I (rows already sum to 1)
R0 = [[3 / 4, 1 / 4, 0], [0, 3 / 4, 1 / 4], [1 / 4, 0, 3 / 4]]
R1 = [[1 / 2, 0, 1 / 2], [1 / 4, 1 / 2, 1 / 4], [0, 1 / 4, 3 / 4]]
# Image 0 runs X0 then X1: J = R1 @ R0, multiplied out by hand row by row, e.g. row 0:
# 1/2 * [3/4, 1/4, 0] + 1/2 * [1/4, 0, 3/4] = [1/2, 1/8, 3/8]
J_IMAGE0 = [[8 / 16, 2 / 16, 6 / 16], [4 / 16, 7 / 16, 5 / 16], [3 / 16, 3 / 16, 10 / 16]]
# Image 1 runs X1 then X0: J = R0 @ R1 (another matrix: the order matters), row 0:
# 3/4 * [1/2, 0, 1/2] + 1/4 * [1/4, 1/2, 1/4] = [7/16, 1/8, 7/16]
J_IMAGE1 = [[7 / 16, 2 / 16, 7 / 16], [3 / 16, 7 / 16, 6 / 16], [2 / 16, 3 / 16, 11 / 16]]

KW = dict(depth=2, embed_dim=32, num_heads=4, mlp_ratio=2.0)
ARCH = "vit_small_patch16_224.dino"
MODEL = ["--model", ARCH, "--random-init", "--img-size", "64",
         *[x for k, v in KW.items() for x in ("--model-kw", f"{k}={v}")]]


def planted_blocks() -> list[torch.Tensor]:
    """Block 0 and block 1 as ``[B=2, H=2, 3, 3]``: image 0 gets (X0, X1), image 1 (X1, X0)."""
    x0, x1 = torch.tensor(X0, dtype=torch.float32), torch.tensor(X1, dtype=torch.float32)
    return [torch.stack([x0, x1]), torch.stack([x1, x0])]


def layout(num_prefix: int, has_cls: bool, grid: tuple[int, int]) -> SimpleNamespace:
    return SimpleNamespace(num_prefix=num_prefix, has_cls=has_cls, grid=grid, patch_size=(16, 16))


def published_vectors(maps: list[torch.Tensor], num_prefix: int, has_cls: bool) -> np.ndarray:
    """The published joint attention's [cls] row (or the mean of the patch rows) over the patches, renormalised."""
    joint = published_rollout([m.double().numpy() for m in maps])                      # [B, N, N]
    rows = joint[:, 0, num_prefix:] if has_cls else joint[:, num_prefix:, num_prefix:].mean(axis=1)
    return rows / rows.sum(axis=1, keepdims=True)


def test_planted_stack_equals_the_product_written_out_by_hand():
    stream = RolloutStream(keep=0)
    for index, attn in enumerate(planted_blocks()):
        stream(index, attn)
    assert stream.seen == 2 and stream.product is not None and stream.product.dtype == torch.float64
    np.testing.assert_allclose(stream.product.numpy(), [J_IMAGE0, J_IMAGE1], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(stream.kept.numpy(), planted_blocks()[0].numpy())  # block 0's map, as given
    product = attention_rollout(planted_blocks())
    np.testing.assert_allclose(product.numpy(), [J_IMAGE0, J_IMAGE1], rtol=0, atol=1e-15)

    # [cls] + 2 patches: the [cls] row over the patches, renormalised: [1/8, 3/8] -> [1/4, 3/4]; [1/8, 7/16] -> ...
    got = rollout_vectors(product, layout(1, True, (1, 2)), dtype=torch.float64)
    np.testing.assert_allclose(got.numpy(), [[1 / 4, 3 / 4], [2 / 9, 7 / 9]], rtol=0, atol=1e-15)
    # no prefix, 3 patches: the mean of the three rows (the rollout of an average-pooled output)
    got = rollout_vectors(product, layout(0, False, (1, 3)), dtype=torch.float64)
    np.testing.assert_allclose(got.numpy(), [[15 / 48, 12 / 48, 21 / 48], [1 / 4, 1 / 4, 1 / 2]], rtol=0, atol=1e-15)
    # a register and no [cls]: the register is in the product (it carries flow between the blocks) but neither a
    # query row nor a column of the vector: rows 1 and 2, columns 1 and 2: [7+3, 5+10] / 32 -> [2/5, 3/5]
    got = rollout_vectors(product, layout(1, False, (1, 2)), dtype=torch.float64)
    np.testing.assert_allclose(got.numpy(), [[2 / 5, 3 / 5], [10 / 27, 17 / 27]], rtol=0, atol=1e-15)
    assert got.sum(dim=1).tolist() == pytest.approx([1.0, 1.0], abs=1e-15)
    # the published residual is (A + I) with each row divided by its sum: for a map whose rows sum to c (a float
    # softmax sums to 1 only up to rounding) that is (c A + I) / (c + 1); one block of twice X0, by hand:
    # (2 * [[1/2, 1/2, 0], [0, 1/2, 1/2], [1/2, 0, 1/2]] + I) / 3
    one = attention_rollout([2 * planted_blocks()[0]])[0]
    np.testing.assert_allclose(one.numpy(), [[2 / 3, 1 / 3, 0], [0, 2 / 3, 1 / 3], [1 / 3, 0, 2 / 3]], atol=1e-15)


def test_blocks_out_of_order_shapes_and_sources_are_refused():
    blocks = planted_blocks()
    with pytest.raises(AttnflowError, match="needs every block from block 0, in order"):
        RolloutStream()(1, blocks[1])
    stream = RolloutStream()
    stream(0, blocks[0])
    with pytest.raises(AttnflowError, match="same tokens in every block"):
        stream(1, torch.ones(2, 2, 4, 4) / 4)
    with pytest.raises(AggregationError, match=r"\[B, H, N, N\]"):
        RolloutStream()(0, blocks[0][0])
    with pytest.raises(AggregationError, match="does not match the token layout"):
        rollout_vectors(attention_rollout(blocks), layout(1, True, (2, 2)))
    with pytest.raises(AggregationError, match="needs every block's attention"):
        aggregation_vectors(blocks[1], layout(1, True, (1, 2)), "rollout")
    src = parse_source("rollout")
    assert src.kind == "rollout" and src.needs_every_block and not src.needs_cls
    assert source_label(src, "MAE") == "MAE attention rollout"
    with pytest.raises(AggregationError, match="did you mean rollout"):
        parse_source("rolout")


def test_real_models_match_the_published_code_in_capture_maps_and_feature(photos):
    images = torch.stack([torch.as_tensor(np.array(photos[k][:64, :64]), dtype=torch.float32).permute(2, 0, 1)
                          / 255 - 0.5 for k in sorted(photos)[:2]])
    with_cls = tiny_model(img_size=64, reg_tokens=2, depth=3)           # [cls] + 2 registers + 4x4 patches
    without = tiny_model(img_size=64, reg_tokens=1, class_token=False, global_pool="avg")
    for model, prefix, has_cls in ((with_cls, 3, True), (without, 1, False)):
        with AttentionTap(model) as tap, torch.no_grad():
            model(images)
            maps, lay = tap.maps, tap.layout
        assert (lay.num_prefix, lay.has_cls) == (prefix, has_cls)
        want = published_vectors(maps, prefix, has_cls)                                   # [2, 16]
        capture = AggregationCapture(model, rollout=True)
        captured = capture.capture(images)
        np.testing.assert_allclose(capture.vectors(captured, "rollout", dtype=torch.float64).numpy(), want,
                                   rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(captured.attn, maps[-1].float(), rtol=0, atol=0)  # the last block, as before
        for i, pm in enumerate(capture_maps(model, images, rollout=True)):
            np.testing.assert_allclose(pm.rollout.reshape(-1), want[i], rtol=1e-12, atol=1e-15)
        through_block1 = published_vectors(maps[:2], prefix, has_cls)  # --block 1: blocks 0 and 1 only
        pm = capture_maps(model, images, block=1, rollout=True)[0]
        np.testing.assert_allclose(pm.rollout.reshape(-1), through_block1[0], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(pm.central.reshape(-1), aggregation_vectors(maps[1], lay, "central")[0],
                                   rtol=1e-6)  # the other maps stay those of the chosen block
    with pytest.raises(MapError, match="rollout map was not computed"):
        capture_maps(with_cls, images)[0].get("rollout")
    # probe feature (Table 5 accuracy): sum_i w_i x_i with the published rollout vector
    encoder = FixedAggregationEncoder(with_cls, "rollout")
    tokens = TokenEncoder(with_cls)(images)[:, 1:]                                          # [2, 16, 32]
    with AttentionTap(with_cls) as tap, torch.no_grad():
        with_cls(images)
        want = published_vectors(tap.maps, 3, True)
    torch.testing.assert_close(encoder(images)[:, 0], torch.einsum("bp,bpd->bd", torch.tensor(want).float(), tokens),
                               rtol=1e-5, atol=1e-6)
    assert encoder.describe()["rollout"]["query"] == "[cls]"
    assert encoder.describe()["rollout"]["blocks"] == 3


def test_aggregate_rollout_rows_match_the_published_code(photo_folder, tmp_path, capsys):
    out = tmp_path / "agg"
    assert main(["aggregate", *MODEL, "--sources", "cls_mean,rollout", "--data", str(photo_folder),
                 "--out", str(out), "--batch-size", "3", "--no-progress"]) == 0
    assert "DINO attention rollout" in capsys.readouterr().out
    frame = pd.read_parquet(out / "aggregation.parquet")
    meta = json.loads((out / "aggregation.json").read_text())
    assert meta["sources"] == ["cls_mean", "rollout"]
    assert meta["rollout"] == {"definition": "Abnar & Zuidema 2020", "fusion": "mean",
                               "residual": "0.5 * A + 0.5 * I, rows renormalised", "blocks": 2, "query": "[cls]",
                               "prefix_tokens": "in the product, not in the vector", "precision": "float64"}
    model = load_model(ARCH, random_init=True, img_size=64, **KW)
    data = ImageFolderDataset(photo_folder, eval_transform(model, img_size=64))
    vectors: dict[str, list[list[float]]] = {"cls_mean": [], "rollout": []}
    for i in range(len(data)):  # one image per forward, every block stored, the published rollout in numpy
        with AttentionTap(model) as tap, torch.no_grad():
            model(data[i][0][None])
            a = tap.maps[-1][0].double().numpy()                                          # [H, N, N]
            vectors["rollout"].append(published_vectors(tap.maps, 1, True)[0].tolist())
        vectors["cls_mean"].append(list(a[:, 0, 1:].mean(axis=0)))
    _, kld = assert_matches_brute_statistics(frame, vectors, Q_FLOOR, abs_entropy=1e-9, rel_kld=1e-6, abs_kld=1e-9)
    assert kld[("rollout", "cls_mean")] > 0  # two different vectors (random weights: nearly uniform both)


def test_localize_rollout_map_matches_the_published_code(photo_folder, tmp_path, capsys):
    photos = sorted(photo_folder.glob("*.JPEG"))[:3]
    sizes = {p.name: Image.open(p).size for p in photos}
    boxes = {name: (w // 5, h // 6, 4 * w // 5 - 1, h - 1) for name, (w, h) in sizes.items()}
    (tmp_path / "boxes.csv").write_text("path,x1,y1,x2,y2\n" + "".join(
        f"{name},{','.join(map(str, b))}\n" for name, b in boxes.items()))
    out = tmp_path / "loc"
    assert main(["localize", *MODEL, "--rollout", "--data", str(photo_folder), "--boxes", str(tmp_path / "boxes.csv"),
                 "--out", str(out), "--examples", "0", "--no-progress"]) == 0
    assert "Attention rollout map" in capsys.readouterr().out
    frame = pd.read_parquet(out / "localization.parquet")
    meta = json.loads((out / "localization.json").read_text())
    assert meta["sources"] == ["cls_mean", "rollout"] and meta["rollout"]["query"] == "[cls]"

    model = load_model(ARCH, random_init=True, img_size=64, **KW)
    mean, std = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1), torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)
    hits = []
    for name, (w, h) in sizes.items():  # PIL resize, one image per forward, the published rollout, brute metric
        img = Image.open(photo_folder / name).convert("RGB").resize((64, 64), Image.BILINEAR)
        x = ((torch.from_numpy(np.asarray(img, np.float32) / 255).permute(2, 0, 1) - mean) / std)[None]
        with AttentionTap(model) as tap, torch.no_grad():
            model(x)
            grid = torch.tensor(published_vectors(tap.maps, 1, True)).reshape(1, 4, 4)
        b = boxes[name]
        gt = [(int(b[0] * 64 / w), int(b[1] * 64 / h), int(b[2] * 64 / w), int(b[3] * 64 / h))]
        hits.append(brute_hits(quantize_scoremaps(grid, (64, 64)).numpy()[0], gt))
    v2, per_iou = max_box_acc_v2(hits)
    rows = frame[frame["source"] == "rollout"]
    assert rows[rows["metric"] == "MaxBoxAccV2"]["value"].item() == pytest.approx(v2)
    np.testing.assert_allclose(rows[rows["metric"] == "MaxBoxAcc"]["value"], per_iou)


def test_a_model_without_cls_localizes_its_rollout_map_without_a_head(photo_folder, tmp_path):
    from attnflow.localize import localize, read_boxes
    from attnflow.localize.protocol import LocalizationError

    (tmp_path / "boxes.csv").write_text("path,x1,y1,x2,y2\n" + "".join(
        f"{p.name},10,10,200,200\n" for p in sorted(photo_folder.glob("*.JPEG"))))
    model = tiny_model(img_size=64, class_token=False, global_pool="avg")
    truth = read_boxes(str(tmp_path / "boxes.csv"))
    with pytest.raises(LocalizationError, match="rollout"):
        localize(model, photo_folder, truth, img_size=64, limit=2, progress=False)
    result = localize(model, photo_folder, truth, img_size=64, limit=2, rollout=True, progress=False)
    assert result.meta["sources"] == ["rollout"] and result.meta["rollout"]["query"] == "mean of the patch rows"
    assert result.labels == {"rollout": "Attention rollout map"}


def test_maps_command_draws_the_rollout_kind(photo_folder, tmp_path, capsys):
    out = tmp_path / "maps.png"
    assert main(["maps", *MODEL, "--images", str(photo_folder), "--limit", "1", "--kind", "cls_mean", "--kind",
                 "rollout", "--dpi", "50", "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    assert main(["maps", *MODEL, "--images", str(photo_folder), "--kind", "rollup", "--out", str(out)]) == 2
    assert "rollout" in capsys.readouterr().err  # the choices name it
