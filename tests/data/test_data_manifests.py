"""The shipped manifests are self-consistent and agree with independent sources (timm's class lists, known facts)."""

from __future__ import annotations

import collections
import gzip
import hashlib
import json
import re
from pathlib import Path

import pytest
import timm

from attnflow.data.images import DataError
from attnflow.data.manifests import KINDS, UnknownManifestError, list_manifests, load_manifest

MANIFESTS = Path(__file__).parents[2] / "data_manifests"
TIMM_INFO = Path(timm.__file__).parent / "data" / "_info"


def timm_wnids() -> list[str]:
    return (TIMM_INFO / "imagenet_synsets.txt").read_text().split()


def test_every_manifest_loads_and_is_listed():
    names = list_manifests()
    assert names == sorted(p.stem for p in MANIFESTS.glob("*.json"))
    for name in names:
        manifest = load_manifest(name)
        assert manifest.name == name and manifest.kind in KINDS
        assert len(manifest.classes) == manifest.num_classes
        assert manifest.title and isinstance(manifest.data.get("unverified", []), list)


def test_imagenet_classes_are_timms_1000_sorted_wnids():
    for name in ("imagenet-val", "imagenet-train", "imagenet-1pct", "imagenet-10pct"):
        wnids = load_manifest(name).classes
        assert wnids == timm_wnids()
        assert len(set(wnids)) == 1000 and wnids == sorted(wnids)
        assert all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    names = load_manifest("imagenet-val").class_names
    assert names[0] == "tench, Tinca tinca" and names[999] == "toilet tissue, toilet paper, bathroom tissue"


def test_devkit_ids_are_a_permutation_with_known_anchors():
    devkit = load_manifest("imagenet-val").devkit_ids
    assert sorted(devkit) == list(range(1, 1001)) and sorted(devkit.values()) == timm_wnids()
    # The devkit's meta.mat order starts with kit fox; tench is 449, sea snake 490.
    assert (devkit[1], devkit[449], devkit[490]) == ("n02119789", "n01440764", "n01751748")


def test_val_names_and_labels():
    manifest = load_manifest("imagenet-val")
    names = manifest.file_names
    assert len(names) == 50000 == len(set(names))
    assert names[0] == "ILSVRC2012_val_00000001.JPEG" and names[-1] == "ILSVRC2012_val_00050000.JPEG"
    labels = manifest.val_labels
    assert collections.Counter(labels) == {w: 50 for w in timm_wnids()}
    # Known facts: image 1 is a sea snake (n01751748, label 65) and image 293 a tench (label 0).
    assert labels[0] == "n01751748" and timm_wnids().index(labels[0]) == 65
    assert labels[292] == "n01440764"
    raw = gzip.decompress((MANIFESTS / "imagenet_val_labels.txt.gz").read_bytes())
    assert hashlib.sha256(raw).hexdigest() == manifest.data["labels"]["sha256_uncompressed"]


def test_val_labels_agree_with_imagenet_real():
    """The original label is among the ReaL labels (timm's copy) for about 90% of the images that have any."""
    real = json.loads((TIMM_INFO / "imagenet_real_labels.json").read_text())
    index = {w: i for i, w in enumerate(timm_wnids())}
    labels = load_manifest("imagenet-val").val_labels
    rated = [(index[w], r) for w, r in zip(labels, real) if r]
    agree = sum(label in r for label, r in rated) / len(rated)
    assert len(rated) == 46837 and 0.89 < agree < 0.91


def test_imagenet_1pct_split_file():
    manifest = load_manifest("imagenet-1pct")
    lines = manifest.split_entries()
    raw = (MANIFESTS / "imagenet_1percent.txt").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == manifest.data["split_file"]["sha256"]
    assert len(lines) == 12811 == manifest.num_images == len(set(lines))
    pattern = re.compile(r"(n\d{8})_\d+\.JPEG")
    assert all(pattern.fullmatch(line) for line in lines)
    per_class = collections.Counter(line.split("_")[0] for line in lines)
    assert set(per_class) == set(timm_wnids())
    assert collections.Counter(per_class.values()) == {12: 189, 13: 811}
    assert manifest.data["images_per_class"] == {"12": 189, "13": 811}


def test_imagenet_10pct_is_described_but_not_shipped():
    manifest = load_manifest("imagenet-10pct")
    assert manifest.data["split_file"]["file"] is None and manifest.num_images == 128116
    assert 128 * 884 + 129 * 116 == manifest.num_images
    with pytest.raises(DataError, match="manifest imagenet-10pct ships no split file; give its path as split_file"):
        manifest.split_entries()


def test_imagenet_counts_and_archives():
    train = load_manifest("imagenet-train")
    assert train.num_images == 1281167
    archives = {a["name"]: a for a in load_manifest("imagenet-val").data["archives"]}
    assert archives["ILSVRC2012_img_val.tar"]["md5"] == "29b22e2961454d5413ddabcf34fc5622"
    import torchvision.datasets.imagenet as tv  # the md5s come from torchvision: check they still agree

    assert tv.ARCHIVE_META["val"] == ("ILSVRC2012_img_val.tar", archives["ILSVRC2012_img_val.tar"]["md5"])
    assert tv.ARCHIVE_META["train"][1] == train.data["archives"][0]["md5"]


def test_cub_manifest_counts_add_up():
    cub = load_manifest("cub-200-2011")
    assert cub.num_images == 11788 == cub.data["num_train"] + cub.data["num_test"]
    assert (cub.data["num_train"], cub.data["num_test"]) == (5994, 5794)
    folders = cub.classes
    assert len(folders) == 200 == len(set(folders))
    assert [f.split(".")[0] for f in folders] == [f"{k:03d}" for k in range(1, 201)]
    assert folders[0] == "001.Black_footed_Albatross" and folders[-1] == "200.Common_Yellowthroat"
    assert cub.data["archives"][0]["md5"] == "97eceeb196236b17998738112f37df78"


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UnknownManifestError) as err:
        load_manifest("imagenet_val")
    assert str(err.value).startswith("unknown dataset manifest 'imagenet_val'; did you mean imagenet-val")
    with pytest.raises(UnknownManifestError, match="available: cub-200-2011"):
        load_manifest("zzzz")


def test_invalid_manifest_files(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"name": "a", "kind": "imagenet-val", "num_images": 3}))
    with pytest.raises(DataError, match="missing key.*num_classes"):
        load_manifest(tmp_path / "a.json")
    (tmp_path / "b.json").write_text(json.dumps({"name": "b", "kind": "video", "num_images": 3, "num_classes": 1}))
    with pytest.raises(DataError, match="unknown kind 'video'"):
        load_manifest(tmp_path / "b.json")
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(DataError, match="not readable JSON"):
        load_manifest(tmp_path / "c.json")
    with pytest.raises(DataError, match="no such file"):
        load_manifest(tmp_path / "missing.json")


def test_env_folder_is_searched_first(tmp_path, monkeypatch):
    (tmp_path / "imagenet-val.json").write_text(json.dumps(
        {"name": "imagenet-val", "kind": "imagenet-val", "num_images": 2, "num_classes": 1,
         "classes": {"wnids": ["n01440764"]}}))
    monkeypatch.setenv("ATTNFLOW_MANIFESTS", str(tmp_path))
    assert load_manifest("imagenet-val").num_images == 2


def test_split_file_that_is_not_text_or_not_a_file_is_one_data_error(tmp_path):
    manifest = load_manifest("imagenet-10pct")
    binary = tmp_path / "photo.jpg"
    binary.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01")  # a JPEG header passed by mistake
    with pytest.raises(DataError, match="photo.jpg: not a text file"):
        manifest.split_entries(binary)
    with pytest.raises(DataError, match="is a folder"):
        manifest.split_entries(tmp_path)
