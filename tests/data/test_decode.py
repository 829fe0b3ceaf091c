"""The fast decode path (attnflow.data.decode): libjpeg-turbo + uint8 resize against PIL + timm's transform, its
statistics against the exact path's on real photos, bad files skipped alike, PIL fallbacks exact, the gpu mode's
batch logic (run on the CPU), the option's validation, and resumes that refuse another decode path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import attnflow
from attnflow.cli import main
from attnflow.data.decode import EncodedJpeg, TensorTransform, decode_of, fast_transform
from attnflow.data.images import Encoded, ImageBatch, collate_skip_bad, load_rgb, read_sample
from attnflow.data.transforms import eval_transform
from attnflow.localize.data import resize_transform
from attnflow.options import DECODES, LoopOptions, OptionError, decode_mode
from attnflow.runstate import StateMismatchError

from conftest import tiny_model

ENTROPY_TOLERANCE, RATIO_TOLERANCE = 1e-3, 1e-4
"""The issue's targets for the dataset means of the statistics, fast path against the exact path."""

LOOP = {"batch_size": 4, "workers": 0, "progress": False, "device": "cpu", "compile": False, "img_size": 64}


def _normalised(fast: TensorTransform, images: torch.Tensor) -> torch.Tensor:
    n = images.shape[0]
    batch = ImageBatch(images, torch.full((n,), -1), torch.arange(n), [])
    return fast.on_device(batch, torch.device("cpu")).images


def _levels(fast: TensorTransform, a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference of two normalised images in uint8 grey levels."""
    return float(((a - b).abs() * torch.tensor(fast.std).view(-1, 1, 1)).amax() * 255)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model(img_size=64)


@pytest.fixture(scope="module")
def exact(model):
    return eval_transform(model, 64)


@pytest.fixture(scope="module")
def fast(exact) -> TensorTransform:
    out = TensorTransform.of(exact)
    assert out is not None
    return out


def test_fast_pixels_are_within_two_grey_levels_of_pil_and_timm(photo_folder, exact, fast):
    for path in sorted(photo_folder.iterdir()):
        image = fast(path)
        assert image.dtype == torch.uint8 and image.shape == (3, 64, 64)
        assert _levels(fast, _normalised(fast, image[None])[0], exact(load_rgb(path))) <= 2.0 + 1e-4, path.name


def test_fast_statistics_agree_with_the_exact_path_on_real_photos(photo_folder, model):
    pil = attnflow.attention_stats(model, photo_folder, decode="pil", **LOOP)
    quick = attnflow.attention_stats(model, photo_folder, decode="fast", **LOOP)
    assert (pil.meta["decode"], quick.meta["decode"]) == ("pil", "fast")
    assert pil.meta["images_used"] == quick.meta["images_used"] >= 5
    a, b = pil.frame.set_index(["block", "head", "metric"]), quick.frame.set_index(["block", "head", "metric"])
    diff = (a["mean"] - b["mean"]).abs().groupby("metric").max()
    assert diff.max() > 0  # the resampling arithmetic differs: the test would otherwise prove nothing
    for metric, value in diff.items():
        if metric.endswith("entropy"):
            assert value < ENTROPY_TOLERANCE, (metric, value)
        elif metric == "attention_distance":  # in pixels
            assert value < 1e-3 * float(a["mean"].xs(metric, level="metric").abs().max()), (metric, value)
        else:
            assert value < RATIO_TOLERANCE, (metric, value)


def _bad_files(folder: Path, photo: np.ndarray) -> None:
    good = folder / "ILSVRC2012_val_00000001.JPEG"
    Image.fromarray(photo).save(good, quality=90)
    data = good.read_bytes()
    (folder / "a_truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "b_garbage.jpg").write_bytes(b"\xff\xd8\xff" + b"x" * 500)
    (folder / "c_empty.jpeg").write_bytes(b"")
    (folder / "d_not_an_image.JPEG").write_bytes(b"GIF89a broken")
    (folder / "e_broken_link.jpg").symlink_to(folder / "missing.jpg")
    Image.fromarray(photo[:2]).save(folder / "f_strip.jpg")  # 2 px high: an extreme aspect ratio


def test_bad_files_are_skipped_counted_and_listed_as_on_the_exact_path(tmp_path, photos, model):
    _bad_files(tmp_path, photos["astronaut"])
    pil = attnflow.attention_stats(model, tmp_path, decode="pil", **LOOP)
    quick = attnflow.attention_stats(model, tmp_path, decode="fast", **{**LOOP, "workers": 1})
    assert pil.meta["images_used"] == quick.meta["images_used"] == 1
    assert pil.meta["images_skipped"] == quick.meta["images_skipped"] == 6
    assert pil.meta["skipped"] == quick.meta["skipped"]  # same files, same order, same reasons


def _fallback_files(folder: Path, photo: np.ndarray) -> list[Path]:
    """Files the fast path hands to PIL: other formats and modes, a PNG named .jpg."""
    files = {"rgb.png": Image.fromarray(photo), "gray.png": Image.fromarray(photo).convert("L"),
             "cmyk.jpg": Image.fromarray(photo).convert("CMYK"), "png_named.jpg": Image.fromarray(photo),
             "palette.gif": Image.fromarray(photo).convert("P"), "rgb.webp": Image.fromarray(photo)}
    paths = []
    for name, image in files.items():
        image.save(folder / name, format="PNG" if name == "png_named.jpg" else None)
        paths.append(folder / name)
    sixteen = (photo[..., 0].astype(np.uint16) * 257)
    Image.fromarray(sixteen).save(folder / "sixteen.png")
    Image.fromarray(photo[..., 1].astype(np.float32) / 255.0).save(folder / "float.tiff")
    return [*paths, folder / "sixteen.png", folder / "float.tiff"]


def test_other_formats_and_modes_fall_back_to_pil_and_equal_the_exact_path(tmp_path, photos, exact, fast):
    for path in _fallback_files(tmp_path, photos["chelsea"]):
        got = _normalised(fast, fast(path)[None])[0]
        assert torch.equal(got, exact(load_rgb(path))), path.name


def test_grayscale_and_exif_jpegs_are_decoded_as_the_exact_path_reads_them(tmp_path, photos, exact, fast):
    photo = photos["rocket"]  # not square: a rotation would change what the crop sees
    Image.fromarray(photo).convert("L").save(tmp_path / "gray.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to display": not applied, as on the exact path
    Image.fromarray(photo).save(tmp_path / "exif.jpg", quality=90, exif=exif)
    for name in ("gray.jpg", "exif.jpg"):
        path = tmp_path / name
        assert np.array_equal(np.asarray(load_rgb(path)).shape, (*photo.shape[:2], 3))
        got = _normalised(fast, fast(path)[None])[0]
        assert _levels(fast, got, exact(load_rgb(path))) <= 2.0 + 1e-4, name
    gray = fast(tmp_path / "gray.jpg")
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_gpu_mode_keeps_jpegs_encoded_and_decodes_them_as_one_batch(tmp_path, photos, exact, fast):
    _bad_files(tmp_path, photos["coffee"])
    Image.fromarray(photos["coffee"]).save(tmp_path / "g_other.png")
    encoded = TensorTransform.of(exact, encoded=True)
    assert encoded is not None and decode_of(encoded) == "gpu" and decode_of(fast) == "fast"
    paths = sorted(p for p in tmp_path.iterdir())
    samples = [read_sample(p, -1, i, encoded) for i, p in enumerate(paths)]
    batch = collate_skip_bad(samples)
    assert isinstance(batch.images, Encoded) and len(batch.images) == 3  # the good JPEG, the truncated one, the PNG
    assert sum(isinstance(item, EncodedJpeg) for item in batch.images) == 2
    out = encoded.on_device(batch, torch.device("cpu"))  # the device's decode, run here on the CPU
    assert out.images.dtype == torch.float32 and out.images.shape == (2, 3, 64, 64)
    assert [paths[i].name for i in out.indices.tolist()] == ["ILSVRC2012_val_00000001.JPEG", "g_other.png"]
    exact_bad = {p: r for p, r in collate_skip_bad([read_sample(p, -1, i, exact) for i, p in enumerate(paths)]).bad}
    assert dict(out.bad) == exact_bad  # the truncated JPEG: PIL's reason, found on the device
    assert torch.equal(out.images[0], _normalised(fast, fast(paths[out.indices[0]])[None])[0])


def test_localization_transform_has_a_fast_form(model):
    square = fast_transform(resize_transform(model, 64), "fast")
    assert isinstance(square, TensorTransform) and square.size == (64, 64) and square.crop is None
    exact = resize_transform(model, 64)
    assert fast_transform(exact, "pil") is exact


def test_nearest_resizes_stay_on_the_exact_path(model, photo_folder):
    """torch's nearest resize samples another grid than PIL's (up to a source pixel apart): such a transform has no
    tensor form, so a nearest-neighbour localization reads every file exactly as the pil path does."""
    nearest = resize_transform(model, 64, "nearest")
    assert TensorTransform.of(nearest) is None and fast_transform(nearest, "fast") is nearest
    path = sorted(photo_folder.glob("*.JPEG"))[0]
    torch.testing.assert_close(fast_transform(nearest, "fast")(load_rgb(path)), nearest(load_rgb(path)))


def test_decode_option_is_validated_with_one_clear_line(photo_folder, tmp_path, capsys):
    assert LoopOptions(decode=" FAST ").decode == "fast" and DECODES == ("auto", "pil", "fast", "gpu")
    with pytest.raises(OptionError, match="decode must be one of auto, pil, fast, gpu; got 'jpeg'"):
        LoopOptions(decode="jpeg")
    assert decode_mode("auto", torch.device("cpu")) == "fast"
    with pytest.raises(OptionError, match="CUDA"):
        decode_mode("gpu", torch.device("cpu"))
    if torch.cuda.is_available():
        return
    code = main(["stats", "--model", "vit_small_patch16_224", "--random-init", "--device", "cpu", "--decode", "gpu",
                 "--data", str(photo_folder), "--out", str(tmp_path / "o.parquet")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "decode gpu" in err and len(err.splitlines()) == 1, err


def test_resume_refuses_another_decode_path(photo_folder, tmp_path, model):
    state = tmp_path / "run.state.pt"
    attnflow.attention_stats(model, photo_folder, decode="fast", state_path=state, keep_state=True, **LOOP)
    with pytest.raises(StateMismatchError, match=r"decode \(pil, fast, gpu.*\) fast \(now pil\)"):
        attnflow.attention_stats(model, photo_folder, decode="pil", state_path=state, resume=True, **LOOP)
    again = attnflow.attention_stats(model, photo_folder, decode="auto", state_path=state, resume=True, **LOOP)
    assert again.meta["resumed"] and again.meta["decode"] == "fast"
