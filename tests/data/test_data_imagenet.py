"""ImageNet validation/training layouts and the 1% subset, on tiny fake trees of real photos."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import timm
import torch
from PIL import Image

from attnflow.data.images import BadImage, DataError, collate_skip_bad
from attnflow.data.imagenet import imagenet_train, imagenet_val, read_val_ground_truth
from attnflow.data.subsets import imagenet_subset

WNIDS = (Path(timm.__file__).parent / "data" / "_info" / "imagenet_synsets.txt").read_text().split()
TENCH, SEA_SNAKE, KIT_FOX, TOILET_TISSUE = "n01440764", "n01751748", "n02119789", "n15075141"


def label(wnid: str) -> int:
    return WNIDS.index(wnid)  # brute force: position in timm's sorted list


def val_name(i: int) -> str:
    return f"ILSVRC2012_val_{i:08d}.JPEG"


@pytest.fixture(scope="module")
def jpegs(photos: dict[str, np.ndarray]) -> list[bytes]:
    out = []
    for key in sorted(photos):
        buf = io.BytesIO()
        Image.fromarray(photos[key]).resize((24, 20)).save(buf, format="JPEG")
        out.append(buf.getvalue())
    return out


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.resize((16, 16)), dtype=np.float32)).permute(2, 0, 1) / 255


def test_flat_val_uses_shipped_labels(tmp_path, jpegs):
    for i in (1, 293, 50000):
        write(tmp_path / val_name(i), jpegs[0])
    ds = imagenet_val(tmp_path)
    assert [p.name for p in ds.paths] == [val_name(1), val_name(293), val_name(50000)]
    # Known facts: image 1 is a sea snake, image 293 a tench; image 50000 is n02437616 (the last line of the
    # official label list).
    assert ds.labels == [label(SEA_SNAKE), label(TENCH), label("n02437616")] == [65, 0, WNIDS.index("n02437616")]
    assert len(ds.classes) == 1000


def test_flat_val_with_kaggle_csv(tmp_path, jpegs):
    root = tmp_path / "ILSVRC" / "Data" / "CLS-LOC" / "val"
    for i in (1, 2, 3):
        write(root / val_name(i), jpegs[i])
    csv_path = tmp_path / "LOC_val_solution.csv"
    csv_path.write_text("ImageId,PredictionString\n"
                        f"ILSVRC2012_val_00000003,{KIT_FOX} 1 2 3 4 {KIT_FOX} 5 6 7 8\n"
                        f"ILSVRC2012_val_00000001,{TOILET_TISSUE} 10 20 30 40\n"
                        f"ILSVRC2012_val_00000002,{TENCH} 1 1 9 9\n")
    ds = imagenet_val(tmp_path, labels=csv_path)  # the Kaggle root: descends into ILSVRC/Data/CLS-LOC/val
    assert ds.root == root
    assert ds.labels == [999, 0, label(KIT_FOX)]
    image, lab, index = ds[2]
    assert isinstance(image, Image.Image) and (lab, index) == (label(KIT_FOX), 2)


def test_devkit_ground_truth_with_and_without_meta_mat(tmp_path, jpegs):
    for i in (1, 2, 3):
        write(tmp_path / "val" / val_name(i), jpegs[0])
    data = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    gt = data / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("490\n449\n1\n")
    # Without meta.mat: the manifest's devkit table (490 = sea snake, 449 = tench, 1 = kit fox).
    assert imagenet_val(tmp_path / "val", labels=gt).labels == [label(SEA_SNAKE), label(TENCH), label(KIT_FOX)]
    # With a meta.mat next to the file, its mapping is used (here a deliberately different one).
    gt.write_text("2\n3\n1\n")
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    rows = [(1, TOILET_TISSUE, "toilet tissue", 0), (1001, "n00001740", "entity", 3), (2, KIT_FOX, "kit fox", 0),
            (3, TENCH, "tench", 0)]
    synsets = np.zeros((len(rows), 1), dtype=dtype)
    for k, row in enumerate(rows):
        synsets[k, 0] = row
    scipy.io.savemat(str(data / "meta.mat"), {"synsets": synsets})
    assert imagenet_val(tmp_path / "val", labels=gt).labels == [label(KIT_FOX), label(TENCH), label(TOILET_TISSUE)]


def test_other_ground_truth_formats(tmp_path):
    caffe = tmp_path / "val.txt"
    caffe.write_text(f"{val_name(1)} 65\n{val_name(2)} 999\n")
    assert read_val_ground_truth(caffe) == {"ILSVRC2012_val_00000001": SEA_SNAKE,
                                            "ILSVRC2012_val_00000002": TOILET_TISSUE}
    one_per_line = tmp_path / "synset_labels.txt"
    one_per_line.write_text(f"{TENCH}\n{KIT_FOX}\n")
    assert read_val_ground_truth(one_per_line) == {"ILSVRC2012_val_00000001": TENCH,
                                                   "ILSVRC2012_val_00000002": KIT_FOX}
    meta_bin = tmp_path / "meta.bin"
    torch.save(({TENCH: ("tench",)}, [KIT_FOX, TENCH]), meta_bin)
    assert read_val_ground_truth(meta_bin) == {"ILSVRC2012_val_00000001": KIT_FOX,
                                               "ILSVRC2012_val_00000002": TENCH}
    bad = tmp_path / "bad.txt"
    bad.write_text("n99999999\n")
    with pytest.raises(DataError, match="not ImageNet-1k wnids"):
        read_val_ground_truth(bad)
    with pytest.raises(DataError, match="LOC_val_solution"):
        (tmp_path / "x.csv").write_text("a,b\n1,2\n")
        read_val_ground_truth(tmp_path / "x.csv")


def test_class_folder_val_and_bad_images(tmp_path, jpegs, caplog):
    write(tmp_path / TENCH / val_name(293), jpegs[0])
    write(tmp_path / TENCH / val_name(7), b"")  # empty; and image 7 is not a tench: a warning says so
    write(tmp_path / SEA_SNAKE / val_name(1), jpegs[1][:200])  # truncated
    write(tmp_path / "misc" / "x.JPEG", jpegs[2])  # not a wnid: ignored with a warning
    with caplog.at_level(logging.WARNING):
        ds = imagenet_val(tmp_path, transform=to_tensor)
    assert [p.relative_to(tmp_path).as_posix() for p in ds.paths] == [
        f"{TENCH}/{val_name(7)}", f"{TENCH}/{val_name(293)}", f"{SEA_SNAKE}/{val_name(1)}"]
    assert ds.labels == [0, 0, 65]
    assert "1 folders that are not ImageNet-1k wnids" in caplog.text
    assert "1 validation images sit in a class folder that disagrees" in caplog.text
    batch = collate_skip_bad([ds[i] for i in range(3)])
    assert batch.images.shape == (1, 3, 16, 16) and batch.labels.tolist() == [0] and batch.indices.tolist() == [1]
    assert [reason.split(":")[0] for _, reason in batch.bad] == ["empty file", "unreadable image"]


def test_val_errors(tmp_path, jpegs):
    with pytest.raises(DataError, match="no such folder"):
        imagenet_val(tmp_path / "nope")
    with pytest.raises(DataError, match="no ImageNet validation images"):
        imagenet_val(tmp_path)
    write(tmp_path / val_name(1), jpegs[0])
    write(tmp_path / val_name(2), jpegs[0])
    csv_path = tmp_path / "LOC_val_solution.csv"
    csv_path.write_text(f"ImageId,PredictionString\nILSVRC2012_val_00000001,{TENCH} 1 2 3 4\n")
    with pytest.raises(DataError, match=f"1 images under .* have no label .* \\(first: {val_name(2)}\\)"):
        imagenet_val(tmp_path, labels=csv_path)


def test_imagenet_train_canonical_labels_and_limit(tmp_path, jpegs):
    root = tmp_path / "imagenet" / "train"
    write(root / TENCH / f"{TENCH}_1.JPEG", jpegs[0])
    write(root / TENCH / f"{TENCH}_2.JPEG", jpegs[1])
    write(root / TOILET_TISSUE / f"{TOILET_TISSUE}_5.JPEG", b"")
    ds = imagenet_train(tmp_path / "imagenet", transform=to_tensor)  # descends into train/
    assert len(ds.classes) == 1000 and ds.targets == [0, 0, 999]
    image, lab, index = ds[1]
    assert image.shape == (3, 16, 16) and (lab, index) == (0, 1)
    assert ds[2] == BadImage(str(root / TOILET_TISSUE / f"{TOILET_TISSUE}_5.JPEG"), "empty file")
    assert imagenet_train(root, limit=2).targets == [0, 999]  # evenly spaced: first and last
    write(root / "not_a_class" / "a.JPEG", jpegs[0])
    with pytest.raises(DataError, match="1 folders are not ImageNet-1k wnids"):
        imagenet_train(root)


def test_subset_maps_lines_to_train_paths(tmp_path, jpegs):
    split = tmp_path / "split.txt"
    split.write_text(f"{TOILET_TISSUE}_5.JPEG\n\n{TENCH}_10026.JPEG\n{KIT_FOX}_3.JPEG\n")
    root = tmp_path / "train"
    for name in (f"{TOILET_TISSUE}_5.JPEG", f"{TENCH}_10026.JPEG", f"{KIT_FOX}_3.JPEG"):
        write(root / name.split("_")[0] / name, jpegs[0])
    ds = imagenet_subset(root, split)
    assert ds.paths == [root / TOILET_TISSUE / f"{TOILET_TISSUE}_5.JPEG", root / TENCH / f"{TENCH}_10026.JPEG",
                        root / KIT_FOX / f"{KIT_FOX}_3.JPEG"]
    assert ds.labels == [999, 0, label(KIT_FOX)]
    (root / KIT_FOX / f"{KIT_FOX}_3.JPEG").unlink()
    with pytest.raises(DataError, match=f"1 of 3 files listed in {split} are missing under {root} "
                                        f"\\(first: {KIT_FOX}/{KIT_FOX}_3.JPEG\\)"):
        imagenet_subset(root, split)
    split.write_text("tench_1.JPEG\n")
    with pytest.raises(DataError, match="entry 1: 'tench_1.JPEG' does not start with an ImageNet-1k wnid"):
        imagenet_subset(root, split)


def test_shipped_1pct_split(tmp_path):
    (tmp_path / TENCH).mkdir()
    with pytest.raises(DataError, match="12811 of 12811 files listed in manifest imagenet-1pct are missing"):
        imagenet_subset(tmp_path, "1pct")
    with pytest.raises(DataError, match="ships no split file; give its path as split_file"):
        imagenet_subset(tmp_path, "10pct")


def test_macos_dot_underscore_files_are_not_images(tmp_path, jpegs):
    apple_double = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        "
    val = tmp_path / "val"
    write(val / TENCH / val_name(293), jpegs[0])
    write(val / TENCH / ("._" + val_name(293)), apple_double)
    assert [p.name for p in imagenet_val(val).paths] == [val_name(293)]
    train = tmp_path / "train"
    write(train / TENCH / f"{TENCH}_1.JPEG", jpegs[0])
    write(train / TENCH / f"._{TENCH}_1.JPEG", apple_double)
    write(train / TENCH / ".thumbs" / f"{TENCH}_2.JPEG", jpegs[1])
    ds = imagenet_train(train)
    assert [Path(p).name for p, _ in ds.samples] == [f"{TENCH}_1.JPEG"] and ds.targets == [0]


def test_an_unreadable_class_folder_of_imagenet_train_is_refused(tmp_path, jpegs, monkeypatch):
    """torchvision's ImageFolder walk would leave it out without a word. (Tested with a patched listing: this
    suite may run as root, whom chmod does not stop.)"""
    import os

    root = tmp_path / "train"
    write(root / TENCH / f"{TENCH}_1.JPEG", jpegs[0])
    write(root / TOILET_TISSUE / f"{TOILET_TISSUE}_5.JPEG", jpegs[1])
    locked, real = root / TOILET_TISSUE, os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(locked))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError, match=f"{TOILET_TISSUE}: cannot read the folder .Permission denied., so its "
                                        "images would be left out uncounted"):
        imagenet_train(root)
