"""CUB-200-2011 in its released layout, with the official train/test split and 0-based labels.

The release (``CUB_200_2011.tgz``) unpacks to ``CUB_200_2011/`` holding ``images.txt`` (``<id> <path>``),
``train_test_split.txt`` (``<id> <1 = train, 0 = test>``), ``image_class_labels.txt`` (``<id> <class id 1..200>``),
``classes.txt`` (``<class id> <folder>``) and ``images/<folder>/<file>.jpg``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .images import DataError
from .labeled import LabeledImageList

SPLITS: tuple[str, ...] = ("train", "test", "all")
REQUIRED_FILES: tuple[str, ...] = ("images.txt", "train_test_split.txt", "image_class_labels.txt")


def read_index(path: Path, problems: list[str] | None = None) -> dict[int, str]:
    """``id -> value`` of a CUB ``<id> <value>`` index file.

    Args:
        path: e.g. ``images.txt``.
        problems: if given, malformed lines are described here and skipped (for verification reports);
            otherwise the first one raises.

    Raises:
        DataError: a malformed line or a repeated id, when ``problems`` is ``None``.
    """
    pairs: dict[int, str] = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        message = None
        if len(parts) != 2 or not parts[0].isdigit():
            message = f"{path} line {line_no}: expected '<id> <value>', got {line[:80]!r}"
        elif int(parts[0]) in pairs:
            message = f"{path} line {line_no}: id {parts[0]} appears twice"
        if message is None:
            pairs[int(parts[0])] = parts[1].strip()
        elif problems is None:
            raise DataError(message)
        else:
            problems.append(message)
    return pairs


def find_cub_root(root: str | Path) -> Path:
    """``root`` if it holds ``images.txt``, else ``root/CUB_200_2011`` if that does.

    Raises:
        DataError: if neither is a CUB-200-2011 folder (the message names the missing files).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    if not (root / "images.txt").is_file() and (root / "CUB_200_2011" / "images.txt").is_file():
        root = root / "CUB_200_2011"
    missing = [f for f in REQUIRED_FILES if not (root / f).is_file()]
    if missing:
        raise DataError(f"{root}: not a CUB-200-2011 folder: missing {', '.join(missing)} (expected the released "
                        f"layout CUB_200_2011/{{images.txt, train_test_split.txt, image_class_labels.txt, images/}})")
    return root


class CUB200(LabeledImageList):
    """CUB-200-2011 images of one split.

    Args:
        root: the ``CUB_200_2011`` folder or the folder that contains it.
        split: ``"train"`` (5,994 images), ``"test"`` (5,794) or ``"all"``.
        transform: PIL image -> ``[3, H, W]`` tensor.
        limit: keep ``limit`` evenly spaced images.
        check_files: raise when images listed in ``images.txt`` are absent (else they load as ``BadImage``).

    Attributes:
        image_ids: the release's 1-based image id of each item.
        classes: class folder names (``"001.Black_footed_Albatross"``, ...); label ``k`` is class id ``k + 1``.

    ``dataset[i]`` is ``(image, label, i)`` with a 0-based label, or a :class:`BadImage`.
    """

    def __init__(self, root: str | Path, split: str = "train", transform: Callable | None = None,
                 limit: int | None = None, check_files: bool = True) -> None:
        if split not in SPLITS:
            raise DataError(f"CUB split must be one of {', '.join(SPLITS)}, got {split!r}")
        root = find_cub_root(root)
        images = read_index(root / "images.txt")
        is_train = read_index(root / "train_test_split.txt")
        class_of = read_index(root / "image_class_labels.txt")
        for name, table in (("train_test_split.txt", is_train), ("image_class_labels.txt", class_of)):
            absent = sorted(set(images) - set(table))
            if absent:
                raise DataError(f"{root / name}: no entry for {len(absent)} image ids of images.txt "
                                f"(first: {', '.join(map(str, absent[:5]))})")
        classes = self._classes(root, images, class_of)
        bad_flags = sorted(i for i in images if is_train[i] not in ("0", "1"))
        if bad_flags:
            raise DataError(f"{root / 'train_test_split.txt'}: flags must be 0 or 1 (ids {bad_flags[:5]})")
        ids = sorted(i for i in images if split == "all" or is_train[i] == ("1" if split == "train" else "0"))
        labels = []
        for i in ids:
            value = class_of[i]
            if not value.isdigit() or not 1 <= int(value) <= len(classes):
                raise DataError(f"{root / 'image_class_labels.txt'}: image {i} has class {value!r}, expected "
                                f"1..{len(classes)}")
            labels.append(int(value) - 1)
        paths = [root / "images" / images[i] for i in ids]
        if check_files:
            missing = [p for p in paths if not p.is_file()]
            if missing:
                raise DataError(f"{len(missing)} of {len(paths)} {split} images listed in images.txt are missing "
                                f"under {root / 'images'} (first: {missing[0].relative_to(root)})")
        super().__init__(paths, labels, classes, transform, limit=limit, root=root)
        self.split = split
        self.image_ids: list[int] = [ids[k] for k in self.keep]

    @staticmethod
    def _classes(root: Path, images: dict[int, str], class_of: dict[int, str]) -> list[str]:
        """Class folder names in class-id order: from ``classes.txt``, else from the images' folders."""
        if (root / "classes.txt").is_file():
            table = read_index(root / "classes.txt")
            if sorted(table) != list(range(1, len(table) + 1)):
                raise DataError(f"{root / 'classes.txt'}: class ids must be 1..{len(table)}")
            return [table[k] for k in range(1, len(table) + 1)]
        folders: dict[int, str] = {}
        for i, rel in images.items():
            if class_of.get(i, "").isdigit():
                folders.setdefault(int(class_of[i]), rel.split("/")[0])
        return [folders.get(k, f"class_{k:03d}") for k in range(1, max(folders, default=0) + 1)]
