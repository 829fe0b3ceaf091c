"""attention_stats: streaming over batches == one pass, bad files skipped, resume == uninterrupted."""

import numpy as np
import pandas as pd
import pytest
import torch

from attnflow.vit import InputShapeError
from attnflow.stats import attention_stats
from attnflow.data.images import DataError, ImageFolderDataset
from attnflow.data.transforms import eval_transform
from attnflow.metrics import METRICS, attention_metrics, patch_distances
from attnflow.tap import AttentionTap
from conftest import tiny_model


def _one_pass_reference(model, images):
    """Per-image metrics from ONE forward over all images, then plain numpy mean/std."""
    with AttentionTap(model) as tap, torch.no_grad():
        model(images)
    d = patch_distances(tap.layout.grid, tap.layout.patch_size)
    rows = []
    for block, attn in enumerate(tap.maps):
        per_image = attention_metrics(attn, tap.layout.num_prefix, tap.layout.has_cls, d).double().numpy()
        for h in range(per_image.shape[1]):
            for m, name in enumerate(METRICS):
                v = per_image[:, h, m]
                rows.append((block, h, name, v.mean(), v.std(ddof=1), len(v)))
    return pd.DataFrame(rows, columns=["block", "head", "metric", "mean", "std", "count"])


def _check_equal(result, reference, rtol=1e-6):
    got = result.frame.sort_values(["block", "head", "metric"]).reset_index(drop=True)
    ref = reference.sort_values(["block", "head", "metric"]).reset_index(drop=True)
    np.testing.assert_array_equal(got["count"], ref["count"])
    np.testing.assert_allclose(got["mean"], ref["mean"], rtol=rtol, atol=1e-12)
    # per-image values are fp32: compare the spread relative to the size of the values
    assert (np.abs(got["std"] - ref["std"]) <= 1e-3 * ref["std"] + 1e-6 * ref["mean"].abs() + 1e-12).all()


def test_batches_equal_one_pass():
    model = tiny_model()
    images = torch.randn(11, 3, 64, 64)
    batches = [images[:4], (images[4:8], torch.zeros(4)), images[8:]]  # tensors and (images, labels)
    result = attention_stats(model, batches, device="cpu", progress=False)
    _check_equal(result, _one_pass_reference(model, images))
    assert result.meta["images_used"] == 11 and result.meta["n_patches"] == 16


@pytest.mark.parametrize("arch,kwargs,n_fast", [
    ("vit_small_patch16_224", {}, 2),
    ("deit_small_distilled_patch16_224", {}, 2),
    ("vit_small_patch14_reg4_dinov2", {"img_size": 56}, 2),
    ("beitv2_base_patch16_224", {}, 0),  # relative position bias: always the attn_drop route
])
def test_fast_qk_route_equals_attn_drop_route(arch, kwargs, n_fast):
    model = tiny_model(arch, **kwargs)
    size = kwargs.get("img_size", 64)
    images = [torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    fast = attention_stats(model, images, device="cpu", progress=False, fast_qk=True)
    slow = attention_stats(model, images, device="cpu", progress=False, fast_qk=False)
    assert fast.meta["fast_qk_blocks"] == n_fast and slow.meta["fast_qk_blocks"] == 0
    np.testing.assert_array_equal(fast.frame["count"], slow.frame["count"])
    np.testing.assert_allclose(fast.frame["mean"], slow.frame["mean"], rtol=1e-6, atol=1e-9)
    diff = np.abs(fast.frame["std"] - slow.frame["std"])
    assert (diff <= 1e-3 * slow.frame["std"] + 1e-6 * slow.frame["mean"].abs() + 1e-12).all()


def test_fast_qk_keeps_fused_attention_and_rejects_masks():
    from attnflow.tap import AttentionTap, QueryKey
    from attnflow.vit import UnsupportedModelError

    model = tiny_model()
    seen = []

    def callback(i, item):
        seen.append((i, type(item), model.blocks[i].attn.fused_attn))

    with AttentionTap(model, callback=callback, fast_qk=True), torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert seen == [(0, QueryKey, True), (1, QueryKey, True)]
    with AttentionTap(model, callback=callback, fast_qk=True), torch.no_grad():
        with pytest.raises(UnsupportedModelError, match="mask"):
            model.blocks[0].attn(torch.randn(1, 17, 32), attn_mask=torch.zeros(17, 17))


def test_compiled_statistics_equal_eager():
    model = tiny_model()
    images = [torch.randn(3, 3, 64, 64) for _ in range(2)]
    eager = attention_stats(model, images, device="cpu", progress=False, compile=False)
    compiled = attention_stats(model, images, device="cpu", progress=False, compile=True)
    np.testing.assert_allclose(compiled.frame["mean"], eager.frame["mean"], rtol=1e-5)


def test_folder_with_corrupt_and_empty_files(photo_folder, tmp_path):
    model = tiny_model()
    clean = attention_stats(model, photo_folder, img_size=64, batch_size=3, device="cpu",
                            workers=0, progress=False, decode="pil")  # the brute force below reads with PIL
    (photo_folder / "ILSVRC2012_val_00000098.JPEG").write_bytes(b"")
    (photo_folder / "ILSVRC2012_val_00000099.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (photo_folder / "notes.txt").write_text("not an image")  # ignored: not an image extension
    dirty = attention_stats(model, photo_folder, img_size=64, batch_size=3, device="cpu",
                            workers=2, progress=False, decode="pil")
    assert dirty.meta["images_used"] == clean.meta["images_used"]
    assert dirty.meta["images_skipped"] == 2
    reasons = {item["path"].rsplit("/", 1)[-1]: item["reason"] for item in dirty.meta["skipped"]}
    assert reasons["ILSVRC2012_val_00000098.JPEG"] == "empty file"
    assert "unreadable" in reasons["ILSVRC2012_val_00000099.JPEG"]
    np.testing.assert_allclose(dirty.frame["mean"], clean.frame["mean"], rtol=1e-6)
    # same numbers as a brute-force pass over the decoded photos
    ds = ImageFolderDataset(photo_folder, eval_transform(model, 64))
    images = torch.stack([s[0] for s in (ds[i] for i in range(len(ds))) if isinstance(s, tuple)])
    _check_equal(clean, _one_pass_reference(model, images), rtol=1e-6)


def test_no_cls_model_reports_missing_cls_metrics():
    model = tiny_model(class_token=False, global_pool="avg")
    result = attention_stats(model, [torch.randn(2, 3, 64, 64)], device="cpu", progress=False)
    cls = result.frame[result.frame.metric == "cls_patch_entropy"]
    assert cls["mean"].isna().all() and (cls["count"] == 0).all()
    assert result.frame[result.frame.metric == "patch_patch_entropy"]["mean"].notna().all()
    assert result.meta["has_cls"] is False


def test_clear_errors(tmp_path):
    model = tiny_model()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no image files"):
        attention_stats(model, empty, device="cpu", progress=False)
    with pytest.raises(InputShapeError, match="img_size"):
        attention_stats(model, [torch.randn(1, 3, 96, 96)], device="cpu", progress=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="no readable image"):
        attention_stats(model, tmp_path / "bad", img_size=64, device="cpu", workers=0, progress=False)
