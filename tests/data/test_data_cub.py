"""CUB200 on a tiny fake release tree: labels (0-based), splits and errors exactly as the index files say."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attnflow.data.cub import CUB200
from attnflow.data.images import BadImage, DataError

CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
# (image id, relative path, is_train, class id) as they would appear in the release's index files; ids are not
# in folder order on purpose.
ROWS = [
    (1, "001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg", 1, 1),
    (2, "001.Black_footed_Albatross/Black_Footed_Albatross_0009_34.jpg", 0, 1),
    (3, "003.Sooty_Albatross/Sooty_Albatross_0038_1065.jpg", 1, 3),
    (4, "002.Laysan_Albatross/Laysan_Albatross_0002_1027.jpg", 1, 2),
    (5, "002.Laysan_Albatross/Laysan_Albatross_0003_1033.jpg", 0, 2),
    (6, "003.Sooty_Albatross/Sooty_Albatross_0031_1066.jpg", 0, 3),
    (7, "001.Black_footed_Albatross/Black_Footed_Albatross_0002_55.jpg", 1, 1),
]


@pytest.fixture()
def cub(tmp_path: Path, photos: dict[str, np.ndarray]) -> Path:
    root = tmp_path / "CUB_200_2011"
    keys = sorted(photos)
    for k, (_, rel, _, _) in enumerate(ROWS):
        path = root / "images" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(photos[keys[k % len(keys)]]).resize((20, 16)).save(buf, format="JPEG")
        path.write_bytes(buf.getvalue())
    (root / "images.txt").write_text("".join(f"{i} {rel}\n" for i, rel, _, _ in ROWS))
    (root / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, t, _ in ROWS))
    (root / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, _, c in ROWS))
    (root / "classes.txt").write_text("".join(f"{k} {name}\n" for k, name in enumerate(CLASSES, start=1)))
    return root


def test_train_split_labels_are_class_id_minus_one(cub):
    ds = CUB200(cub, split="train")
    assert ds.image_ids == [1, 3, 4, 7]
    assert ds.labels == [0, 2, 1, 0]
    assert [p.relative_to(cub / "images").as_posix() for p in ds.paths] == [ROWS[0][1], ROWS[2][1], ROWS[3][1],
                                                                            ROWS[6][1]]
    assert ds.classes == CLASSES and len(ds) == 4


def test_test_and_all_splits(cub):
    test = CUB200(cub, split="test")
    assert test.image_ids == [2, 5, 6] and test.labels == [0, 1, 2]
    everything = CUB200(cub, split="all")
    assert everything.image_ids == [1, 2, 3, 4, 5, 6, 7] and everything.labels == [0, 0, 2, 1, 1, 2, 0]


def test_items_transform_limit_and_parent_root(cub):
    ds = CUB200(cub.parent, split="train", transform=lambda img: np.asarray(img).shape, limit=2)
    assert ds.image_ids == [1, 7]  # evenly spaced over the 4 training images: first and last
    assert ds[1] == ((16, 20, 3), 0, 1)
    (cub / "images" / ROWS[6][1]).write_bytes(b"")
    assert ds[1] == BadImage(str(cub / "images" / ROWS[6][1]), "empty file")


def test_errors(cub):
    with pytest.raises(DataError, match="split must be one of train, test, all"):
        CUB200(cub, split="val")
    (cub / "images" / ROWS[3][1]).unlink()
    with pytest.raises(DataError, match=f"1 of 4 train images listed in images.txt are missing .* "
                                        f"\\(first: images/{ROWS[3][1]}\\)"):
        CUB200(cub, split="train")
    assert CUB200(cub, split="test").image_ids == [2, 5, 6]  # the test split is unaffected
    (cub / "image_class_labels.txt").write_text("1 1\n2 1\n3 9\n4 2\n5 2\n6 3\n7 1\n")
    with pytest.raises(DataError, match="image 3 has class '9', expected 1..3"):
        CUB200(cub, split="all", check_files=False)
    (cub / "image_class_labels.txt").write_text("1 1\n")
    with pytest.raises(DataError, match="no entry for 6 image ids of images.txt \\(first: 2, 3, 4, 5, 6\\)"):
        CUB200(cub)
    (cub / "train_test_split.txt").unlink()
    with pytest.raises(DataError, match="not a CUB-200-2011 folder: missing train_test_split.txt"):
        CUB200(cub)


def test_malformed_index_line(cub):
    (cub / "images.txt").write_text("1 a.jpg\nfoo\n")
    with pytest.raises(DataError, match="images.txt line 2: expected '<id> <value>'"):
        CUB200(cub)


def test_classes_from_folders_without_classes_txt(cub):
    (cub / "classes.txt").unlink()
    assert CUB200(cub).classes == CLASSES
