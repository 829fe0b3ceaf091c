"""Image folders as a first-time user has them: odd modes, links, hidden macOS files, class folders, --limit."""

import os

import numpy as np
import pytest
from PIL import Image

from attnflow.cli import main
from attnflow.data.images import BadImage, DataError, ImageFolderDataset, evenly_spaced, find_images, load_rgb

TINY = ["--model", "vit_small_patch16_224", "--random-init", "--model-kw", "depth=2", "--img-size", "32",
        "--workers", "0", "--no-progress"]


def _save(path, photo, mode="RGB", size=(48, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo).resize(size).convert(mode).save(path)
    return path


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path, photos):
    gray8 = np.asarray(Image.fromarray(photos["astronaut"]).convert("L"))
    gray16 = gray8.astype(np.uint16) * 257  # 0..255 -> 0..65535, the same picture at 16 bits
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    rgb = np.asarray(load_rgb(tmp_path / "g16.png"))
    assert rgb.shape == gray8.shape + (3,)
    for c in range(3):  # every channel is the 8-bit picture, not 255 wherever the 16-bit value exceeds 255
        assert np.array_equal(rgb[..., c], gray8)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "1", "CMYK"])
def test_other_modes_become_rgb(tmp_path, photos, mode):
    path = _save(tmp_path / ("x.jpg" if mode == "CMYK" else "x.png"), photos["chelsea"], mode)
    img = load_rgb(path)
    assert img.mode == "RGB" and img.size == (48, 40)


def test_symlinked_class_folders_and_files_are_found(tmp_path, photos):
    store = tmp_path / "store"
    _save(store / "cat" / "a.jpg", photos["chelsea"])
    _save(store / "cat" / "b.jpg", photos["coffee"])
    data = tmp_path / "data"
    _save(data / "astro" / "c.jpg", photos["astronaut"])
    os.symlink(store / "cat", data / "cat")                     # a subset made of linked class folders
    os.symlink(store / "cat" / "a.jpg", data / "astro" / "d.jpg")  # a linked file
    os.symlink(data, data / "astro" / "loop")                    # a link cycle must not hang the walk
    found = [p.relative_to(data).as_posix() for p in find_images(data)]
    assert found == ["astro/c.jpg", "astro/d.jpg", "cat/a.jpg", "cat/b.jpg"]
    ds = ImageFolderDataset(data)
    assert ds.classes == ["astro", "cat"] and ds.labels == [0, 0, 1, 1]


def test_broken_link_is_skipped_and_reported_not_lost(tmp_path, photos):
    _save(tmp_path / "d" / "good.jpg", photos["rocket"])
    os.symlink(tmp_path / "gone.jpg", tmp_path / "d" / "broken.jpg")
    ds = ImageFolderDataset(tmp_path / "d")
    assert [p.name for p in ds.paths] == ["broken.jpg", "good.jpg"]
    bad = ds[0]
    assert isinstance(bad, BadImage) and "broken link" in bad.reason and "gone.jpg" in bad.reason


def test_hidden_files_and_folders_are_ignored(tmp_path, photos):
    data = tmp_path / "data"
    _save(data / "dog" / "a.jpg", photos["chelsea"])
    _save(data / "owl" / "b.jpg", photos["coffee"])
    (data / "dog" / "._a.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")  # macOS AppleDouble
    (data / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    _save(data / ".ipynb_checkpoints" / "c-checkpoint.jpg", photos["rocket"])  # not a class
    _save(data / "owl" / ".thumbs" / "t.jpg", photos["rocket"])
    ds = ImageFolderDataset(data)
    assert [p.relative_to(data).as_posix() for p in ds.paths] == ["dog/a.jpg", "owl/b.jpg"]
    assert ds.classes == ["dog", "owl"] and ds.labels == [0, 1]


def test_limit_keeps_the_labels_of_the_whole_folder(tmp_path, photos):
    data = tmp_path / "data"
    for cls, n in (("a", 1), ("b", 1), ("c", 6)):
        for i in range(n):
            _save(data / cls / f"{i}.png", photos["astronaut"], size=(8, 8))
    full = ImageFolderDataset(data)
    assert full.classes == ["a", "b", "c"] and full.labels == [0, 1, 2, 2, 2, 2, 2, 2]
    sub = ImageFolderDataset(data, limit=2)  # evenly spaced over 8 images: the first (a) and the last (c)
    assert [p.relative_to(data).as_posix() for p in sub.paths] == ["a/0.png", "c/5.png"]
    assert sub.classes == ["a", "b", "c"] and sub.labels == [0, 2]


def test_stats_on_an_odd_folder_counts_every_image(tmp_path, photos, capsys):
    data = tmp_path / "mine"
    good = [_save(data / "x" / "gray.png", photos["astronaut"], "L"),
            _save(data / "x" / "UPPER.JPG", photos["chelsea"]),
            _save(data / "x" / "pal.PNG", photos["coffee"], "P"),
            _save(data / "y" / "tiny.webp", photos["rocket"], size=(10, 10)),
            _save(data / "y" / "wide.bmp", photos["rocket"], size=(400, 12)),
            _save(data / "y" / "rgba.tif", photos["rocket"], "RGBA")]
    os.symlink(good[1], data / "y" / "link.jpg")
    os.symlink(tmp_path / "nowhere.jpg", data / "y" / "dead.jpg")
    (data / "y" / "zero.jpg").write_bytes(b"")
    (data / "y" / "text.jpeg").write_text("not an image")
    (data / "y" / "._UPPER.JPG").write_bytes(b"\x00\x05\x16\x07")
    (data / "y" / "folder.jpg").mkdir()
    out = tmp_path / "runs" / "mine"
    assert main(["stats", *TINY, "--batch-size", "2", "--data", str(data), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "over 7 images" in text and "skipped 3 unreadable file(s)" in text
    for name in ("dead.jpg: broken link", "zero.jpg: empty file", "text.jpeg: unreadable image"):
        assert name in text


@pytest.mark.parametrize("option,value", [("--batch-size", "0"), ("--checkpoint-every", "0"), ("--limit", "0"),
                                          ("--img-size", "0"), ("--limit", "-2"), ("--workers", "-1"),
                                          ("--crop-pct", "0"), ("--crop-pct", "1.5")])
def test_non_positive_numbers_give_one_line(photo_folder, tmp_path, capsys, option, value):
    args = [a for a in TINY if a not in ("--img-size", "32")] + ([] if option == "--img-size" else ["--img-size", "32"])
    with pytest.raises(SystemExit) as exit_info:
        main(["stats", *args, option, value, "--data", str(photo_folder), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and option in err and "Traceback" not in err
    assert not (tmp_path / "o.parquet").exists()


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"checkpoint_every": 0}])
def test_attention_stats_rejects_non_positive_sizes(photo_folder, kwargs):
    from attnflow.stats import attention_stats
    from attnflow.errors import AttnflowError
    from conftest import tiny_model

    with pytest.raises(AttnflowError, match=next(iter(kwargs))):
        attention_stats(tiny_model(img_size=32), photo_folder, img_size=32, workers=0, progress=False, **kwargs)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_oversized_image_is_skipped_not_fatal(tmp_path, photos, monkeypatch):
    _save(tmp_path / "d" / "a_small.png", photos["rocket"], size=(40, 40))    # 1,600 px
    _save(tmp_path / "d" / "b_huge.png", photos["rocket"], size=(100, 100))   # 10,000 px: over 2 x the limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses images over twice this many pixels
    ds = ImageFolderDataset(tmp_path / "d")
    assert not isinstance(ds[0], BadImage)
    bad = ds[1]
    assert isinstance(bad, BadImage) and bad.path.endswith("b_huge.png") and "MAX_IMAGE_PIXELS" in bad.reason


def test_missing_data_fails_before_loading_the_model(tmp_path, capsys, monkeypatch):
    import attnflow.models.load

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before --data was checked")

    monkeypatch.setattr(attnflow.models.load, "load_model", must_not_load)
    code = main(["stats", *TINY, "--data", str(tmp_path / "typo"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.endswith("typo: no such file or folder") and len(err.splitlines()) == 1


def test_unwritable_out_fails_before_the_run(photo_folder, tmp_path, capsys, monkeypatch):
    import attnflow.models.load

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded although --out cannot be written")

    monkeypatch.setattr(attnflow.models.load, "load_model", must_not_load)
    (tmp_path / "runs").write_text("a file where the output folder should be")
    code = main(["stats", *TINY, "--data", str(photo_folder), "--out", str(tmp_path / "runs" / "mae.parquet")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "cannot create the folder" in err and len(err.splitlines()) == 1


def test_evenly_spaced_refuses_a_non_positive_limit_in_the_option_word():
    assert evenly_spaced(5, 2) == [0, 4] and evenly_spaced(3, None) == [0, 1, 2]
    with pytest.raises(DataError, match="^limit must be positive, got 0$"):
        evenly_spaced(10, 0)


# --- float images, GIFs, unreadable folders, extreme aspect ratios -----------------------------------------------

def test_float_image_in_unit_range_is_scaled_not_black(tmp_path, photos):
    gray8 = np.asarray(Image.fromarray(photos["astronaut"]).convert("L"))
    Image.fromarray((gray8 / 255.0).astype(np.float32), mode="F").save(tmp_path / "unit.tif")
    assert Image.open(tmp_path / "unit.tif").mode == "F"
    rgb = np.asarray(load_rgb(tmp_path / "unit.tif"))
    assert rgb.shape == gray8.shape + (3,) and np.array_equal(rgb[..., 1], gray8)  # PIL alone: 0 and 1, black
    Image.fromarray(gray8.astype(np.float32) + 0.4, mode="F").save(tmp_path / "bytes.tif")  # 0..255 floats
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "bytes.tif"))[..., 0], gray8)
    nan = np.full((8, 8), np.nan, np.float32)
    Image.fromarray(nan, mode="F").save(tmp_path / "nan.tif")
    bad = ImageFolderDataset(tmp_path)[1]  # bytes.tif, nan.tif, unit.tif
    assert isinstance(bad, BadImage) and bad.path.endswith("nan.tif") and "NaN" in bad.reason


def test_a_gif_is_read_as_its_first_frame(tmp_path, photos):
    frames = [Image.new("RGB", (40, 30), color) for color in ((200, 20, 20), (20, 20, 200))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    _save(tmp_path / "b.png", photos["chelsea"])
    dataset = ImageFolderDataset(tmp_path)
    assert [p.name for p in dataset.paths] == ["anim.gif", "b.png"]
    image, _, _ = dataset[0]
    assert image.size == (40, 30) and np.asarray(image)[0, 0].tolist() == [200, 20, 20]


def test_an_unreadable_sub_folder_is_refused_in_one_line(photo_folder, tmp_path, capsys, monkeypatch):
    """(Tested with a patched listing: this suite may run as root, whom chmod does not stop.)"""
    locked = photo_folder / "locked"
    _save(locked / "hidden_from_the_run.png", np.zeros((8, 8, 3), np.uint8))
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(locked))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError, match="cannot read the folder .Permission denied., so its images would be left"):
        find_images(photo_folder)
    code = main(["stats", *TINY, "--data", str(photo_folder), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and f"{locked}: cannot read the folder" in err and len(err.splitlines()) == 1, err


def _strip(path, width, height):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(path)
    return path


def test_an_extreme_aspect_ratio_is_skipped_before_the_resize(tmp_path, photos):
    """The rule (attnflow.limits.MAX_RESIZE_FACTOR): the resized image may hold at most 64x the crop's pixels.
    A 1 x 3,000 strip at a 32 px crop would be resized to 36 x 108,000 px: 3,797x."""
    from attnflow.data.images import ImageSizeError, load_images, read_sample
    from attnflow.data.transforms import BoundedResize, eval_resize, eval_transform
    from attnflow.localize.data import resize_transform
    from attnflow.probes.imagedata import train_transform
    from conftest import tiny_model

    model = tiny_model(img_size=32)
    transform = eval_transform(model, 32, crop_pct=0.875)
    strip = _strip(tmp_path / "d" / "b_strip.png", 1, 3000)
    wide = _strip(tmp_path / "d" / "c_wide.png", 1400, 30)  # 46.7:1 -> 36 x 1680 px, 59x the crop: kept
    _save(tmp_path / "d" / "a.png", photos["rocket"])
    with pytest.raises(ImageSizeError, match="1x3000 px would be resized to 36x108000 before the 32x32 crop"):
        transform(Image.open(strip))
    bad = read_sample(strip, 0, 1, transform)
    assert isinstance(bad, BadImage) and "extreme aspect ratio" in bad.reason
    assert read_sample(wide, 0, 2, transform)[0].shape == (3, 32, 32)
    # the maps read a folder with the same rule, before any model is loaded, and take the next image instead
    paths, images = load_images(tmp_path / "d", 2, check=eval_resize(32, 0.875).check)
    assert [p.name for p in paths] == ["a.png", "c_wide.png"]
    # every transform attnflow builds bounds its resize; resizing to a fixed square never refuses an image
    square = resize_transform(model, 32)
    assert any(isinstance(t, BoundedResize) for t in square.transforms)
    assert square(Image.open(strip)).shape == train_transform(model, 32)(Image.open(strip)).shape == (3, 32, 32)
