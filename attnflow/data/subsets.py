"""ImageNet training subsets given by split files, e.g. the standard 1% and 10% splits of SimCLR.

A split file lists one training file per line (``n01440764_10026.JPEG``); the image is
``TRAIN_ROOT/n01440764/n01440764_10026.JPEG`` and its label the wnid's sorted index. The 1% split ships in
``data_manifests/imagenet_1percent.txt`` (manifest ``imagenet-1pct``); the 10% split must be given as a file.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Callable

from .images import DataError
from .labeled import LabeledImageList
from .manifests import Manifest, load_manifest
from .verify import locate_root

ALIASES: dict[str, str] = {"1pct": "imagenet-1pct", "1percent": "imagenet-1pct", "1%": "imagenet-1pct",
                           "10pct": "imagenet-10pct", "10percent": "imagenet-10pct", "10%": "imagenet-10pct"}
"""Short names accepted for the subset manifests."""


def read_split(split_file: str | Path | Manifest) -> tuple[list[str], str]:
    """The entries of a split and a description of where they came from.

    Args:
        split_file: a path to a split file, a subset manifest name (``"imagenet-1pct"``, ``"1pct"``) or object.

    Raises:
        DataError: for a name that is neither a file nor a subset manifest, or a manifest without a shipped file.
    """
    if isinstance(split_file, Manifest):
        return split_file.split_entries(), f"manifest {split_file.name}"
    path = Path(split_file)
    if path.is_file():
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()], str(path)
    manifest = load_manifest(ALIASES.get(str(split_file), str(split_file)))
    if manifest.kind != "imagenet-subset":
        raise DataError(f"{split_file}: not a split file or a subset manifest (kind {manifest.kind})")
    return manifest.split_entries(), f"manifest {manifest.name}"


def imagenet_subset(train_root: str | Path, split_file: str | Path | Manifest = "imagenet-1pct",
                    transform: Callable | None = None, *, limit: int | None = None,
                    classes_manifest: str | Manifest = "imagenet-train") -> LabeledImageList:
    """The training images named by a split file.

    Args:
        train_root: the ImageNet training folder (1000 wnid folders; an ImageNet root with ``train/`` works too).
        split_file: a split file path, or a subset manifest name (default: the shipped 1% split).
        transform: PIL image -> ``[3, H, W]`` tensor.
        limit: keep ``limit`` evenly spaced images.
        classes_manifest: manifest giving the 1000 wnids in label order.

    Returns:
        A :class:`LabeledImageList`; items are ``(image, label, index)`` or :class:`BadImage`.

    Raises:
        DataError: for a line that names no ImageNet-1k class, or when listed files are missing (the message
            says how many and names the first).
    """
    train_root = Path(train_root)
    if not train_root.is_dir():
        raise DataError(f"{train_root}: no such folder")
    train_root, _ = locate_root("imagenet-subset", train_root)
    entries, source = read_split(split_file)
    wnids = (classes_manifest if isinstance(classes_manifest, Manifest) else load_manifest(classes_manifest)).classes
    index = {w: i for i, w in enumerate(wnids)}
    paths, labels = [], []
    for line_no, entry in enumerate(entries, start=1):
        name = PurePosixPath(entry).name
        wnid = name.split("_", 1)[0]
        if wnid not in index:
            raise DataError(f"{source} entry {line_no}: {entry!r} does not start with an ImageNet-1k wnid")
        paths.append(train_root / wnid / name)
        labels.append(index[wnid])
    missing = [p for p in paths if not p.is_file()]
    if missing:
        first = ", ".join(str(p.relative_to(train_root)) for p in missing[:3])
        raise DataError(f"{len(missing)} of {len(paths)} files listed in {source} are missing under {train_root} "
                        f"(first: {first})")
    return LabeledImageList(paths, labels, wnids, transform, limit=limit, root=train_root)
