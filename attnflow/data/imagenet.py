"""ImageNet-1k as it is found on disk: the validation set in either layout and the training set.

Labels are always the standard 0..999 indices of the sorted wnids (``n01440764`` = 0, tench), the order of
torchvision, timm and every public ImageNet-1k checkpoint, even when some class folders are absent.

Validation layouts:

* class folders ``ROOT/<wnid>/ILSVRC2012_val_XXXXXXXX.JPEG`` (torchvision, ``valprep.sh``): labels from folders;
* flat ``ROOT/ILSVRC2012_val_XXXXXXXX.JPEG`` (the tar, Kaggle's ``ILSVRC/Data/CLS-LOC/val``): labels from the
  shipped manifest (``data_manifests/imagenet_val_labels.txt.gz``) or from a ground-truth file: Kaggle's
  ``LOC_val_solution.csv``, the devkit's ``ILSVRC2012_validation_ground_truth.txt`` (devkit ids, mapped with
  ``meta.mat`` when it is next to the file, else with the manifest's devkit-id table), torchvision's
  ``meta.bin``, a file with one wnid per line, or ``<file name> <sorted index>`` lines (caffe ``val.txt``).
"""

from __future__ import annotations

import csv
import functools
import logging
import os
from pathlib import Path
from typing import Callable

from torchvision.datasets import ImageFolder

from .images import DataError, evenly_spaced, is_hidden, is_image_file, read_sample, unreadable_folder
from .labeled import LabeledImageList
from .manifests import Manifest, load_manifest
from .verify import WNID_DIR, locate_root

log = logging.getLogger(__name__)

VAL_PREFIX = "ILSVRC2012_val_"


def imagenet_wnids(manifest: str | Manifest = "imagenet-val") -> list[str]:
    """The 1000 ImageNet-1k wnids in label order (sorted)."""
    return (manifest if isinstance(manifest, Manifest) else load_manifest(manifest)).classes


def imagenet_class_names(manifest: str | Manifest = "imagenet-val") -> list[str]:
    """The 1000 class names in label order, e.g. ``"tench, Tinca tinca"``."""
    return (manifest if isinstance(manifest, Manifest) else load_manifest(manifest)).class_names


def read_meta_mat(path: str | Path) -> dict[int, str]:
    """Devkit ``ILSVRC2012_ID -> wnid`` for the 1000 leaf synsets of the devkit's ``data/meta.mat``."""
    import scipy.io  # scipy comes with scikit-image; imported here because only the devkit path needs it

    synsets = scipy.io.loadmat(str(path), squeeze_me=True)["synsets"]
    ids, wnids, children = synsets["ILSVRC2012_ID"], synsets["WNID"], synsets["num_children"]
    return {int(i): str(w) for i, w, n in zip(ids, wnids, children) if int(n) == 0}


def _devkit_map(gt_path: Path, manifest: Manifest, meta_mat: str | Path | None) -> dict[int, str]:
    shipped = manifest.devkit_ids
    candidates = [Path(meta_mat)] if meta_mat else [gt_path.parent / "meta.mat"]
    for candidate in candidates:
        if candidate.is_file():
            mapping = read_meta_mat(candidate)
            if shipped is not None and mapping != shipped:
                log.warning("%s disagrees with the manifest's devkit-id table; using %s", candidate, candidate)
            return mapping
    if meta_mat:
        raise DataError(f"{meta_mat}: no such file")
    if shipped is None:
        raise DataError(f"{gt_path}: devkit ids need data/meta.mat next to the file (the manifest has no "
                        f"devkit-id table)")
    return shipped


def read_val_ground_truth(path: str | Path, *, meta_mat: str | Path | None = None,
                          manifest: str | Manifest = "imagenet-val") -> dict[str, str]:
    """Labels of the validation images from a ground-truth file.

    Args:
        path: ``LOC_val_solution.csv``, ``ILSVRC2012_validation_ground_truth.txt``, torchvision's ``meta.bin``,
            a file with one wnid per line (line i = image i), or ``<file name> <sorted index>`` lines.
        meta_mat: the devkit's ``meta.mat`` (default: next to ``path`` if there, else the manifest's table).
        manifest: the manifest giving the class list and the devkit-id table.

    Returns:
        ``image stem -> wnid``, e.g. ``{"ILSVRC2012_val_00000001": "n01751748", ...}``.

    Raises:
        DataError: if the file is missing, has an unknown format or names unknown classes.
    """
    path = Path(path)
    manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    if not path.is_file():
        raise DataError(f"{path}: no such ground-truth file")
    wnids = manifest.classes
    stem = f"{VAL_PREFIX}{{:08d}}"
    if path.name == "meta.bin":
        import torch

        _, val_wnids = torch.load(path, weights_only=True)
        labels = {stem.format(i): str(w) for i, w in enumerate(val_wnids, start=1)}
    elif path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
                raise DataError(f"{path}: expected the columns ImageId,PredictionString of LOC_val_solution.csv")
            labels = {row["ImageId"]: row["PredictionString"].split()[0] for row in reader
                      if row["PredictionString"].strip()}
    else:
        rows = [line.split() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not rows:
            raise DataError(f"{path}: empty ground-truth file")
        if all(len(r) == 1 and r[0].isdigit() for r in rows):
            devkit = _devkit_map(path, manifest, meta_mat)
            bad = sorted({int(r[0]) for r in rows} - set(devkit))
            if bad:
                raise DataError(f"{path}: devkit ids outside 1..{len(devkit)}: {bad[:5]}")
            labels = {stem.format(i): devkit[int(r[0])] for i, r in enumerate(rows, start=1)}
        elif all(len(r) == 1 for r in rows):
            labels = {stem.format(i): r[0] for i, r in enumerate(rows, start=1)}
        elif all(len(r) == 2 for r in rows):
            labels = {}
            for name, value in rows:
                key = Path(name.split("@")[-1]).stem
                labels[key] = wnids[int(value)] if value.isdigit() and int(value) < len(wnids) else value
        else:
            raise DataError(f"{path}: unknown ground-truth format (see attnflow.data.imagenet for the formats)")
    unknown = sorted({w for w in labels.values() if w not in set(wnids)})
    if unknown:
        raise DataError(f"{path}: {len(unknown)} labels are not ImageNet-1k wnids (first: {', '.join(unknown[:3])})")
    return labels


def _shipped_labels(manifest: Manifest) -> dict[str, str]:
    labels = manifest.val_labels
    if labels is None:
        raise DataError(f"manifest {manifest.name} has no validation labels; pass labels=FILE")
    return {Path(name).stem: w for name, w in zip(manifest.file_names, labels)}


def _images_in(folder: Path) -> list[Path]:
    with os.scandir(folder) as entries:
        return sorted(Path(e.path) for e in entries
                      if e.is_file() and is_image_file(Path(e.name)) and not is_hidden(e.name))


def imagenet_val(root: str | Path, transform: Callable | None = None, labels: str | Path | None = None, *,
                 limit: int | None = None, meta_mat: str | Path | None = None,
                 manifest: str | Manifest = "imagenet-val") -> LabeledImageList:
    """The ImageNet-1k validation set in either on-disk layout.

    Args:
        root: the folder of the images (class folders or flat); an ImageNet root with ``val/`` or a Kaggle root
            with ``ILSVRC/Data/CLS-LOC/val`` also works.
        transform: PIL image -> ``[3, H, W]`` tensor.
        labels: flat layout only: a ground-truth file (see :func:`read_val_ground_truth`); default: the
            labels shipped in the manifest. With class folders the folder is the label.
        limit: keep ``limit`` evenly spaced images.
        meta_mat: the devkit's ``meta.mat`` for a devkit ground-truth file.
        manifest: manifest name or object (tests pass tiny ones).

    Returns:
        A :class:`LabeledImageList` whose items are ``(image, label, index)`` or :class:`BadImage`.

    Raises:
        DataError: for a folder without validation images or images without a label.
    """
    manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    root, _ = locate_root("imagenet-val", root)
    wnids = manifest.classes
    index = {w: i for i, w in enumerate(wnids)}
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and p.name in index)
    if class_dirs:
        paths, targets = [], []
        for folder in class_dirs:
            found = _images_in(folder)
            paths += found
            targets += [index[folder.name]] * len(found)
        others = [p.name for p in root.iterdir() if p.is_dir() and p.name not in index and not p.name.startswith(".")]
        if others:
            log.warning("%s: ignoring %d folders that are not ImageNet-1k wnids (%s)", root, len(others),
                        ", ".join(sorted(others)[:3]))
        if labels is not None:
            log.warning("%s has class folders: the folders give the labels, %s is not used", root, labels)
        _warn_disagreement(manifest, paths, [wnids[t] for t in targets])
    else:
        paths = [p for p in _images_in(root) if p.name.startswith(VAL_PREFIX)]
        if not paths:
            raise DataError(f"{root}: no ImageNet validation images (flat {VAL_PREFIX}*.JPEG files or wnid class "
                            f"folders)")
        truth = read_val_ground_truth(labels, meta_mat=meta_mat, manifest=manifest) if labels is not None \
            else _shipped_labels(manifest)
        unlabeled = [p.name for p in paths if p.stem not in truth]
        if unlabeled:
            raise DataError(f"{len(unlabeled)} images under {root} have no label in "
                            f"{labels or 'the manifest'} (first: {', '.join(unlabeled[:3])})")
        targets = [index[truth[p.stem]] for p in paths]
    return LabeledImageList(paths, targets, wnids, transform, limit=limit, root=root)


def _warn_disagreement(manifest: Manifest, paths: list[Path], folder_wnids: list[str]) -> None:
    """Log how many images of a class-folder layout sit in a folder the official labels disagree with."""
    if manifest.val_labels is None:
        return
    truth = _shipped_labels(manifest)
    wrong = [p for p, w in zip(paths, folder_wnids) if p.stem in truth and truth[p.stem] != w]
    if wrong:
        log.warning("%d validation images sit in a class folder that disagrees with the official labels "
                    "(first: %s); run `attnflow data verify %s`", len(wrong), wrong[0], manifest.name)


def _visible_image(path: str, root: Path) -> bool:
    """``ImageFolder``'s file filter: an image extension, and no hidden file or folder (macOS ``._*.JPEG``,
    ``.thumbs/``) on its way from ``root``."""
    return is_image_file(Path(path)) and not any(is_hidden(part) for part in Path(path).relative_to(root).parts)


class ImageNetTrain(ImageFolder):
    """The ImageNet-1k training set (torchvision ``ImageFolder``) with canonical labels and bad-image skipping.

    Args:
        root: folder of the 1000 wnid class folders (an ImageNet root with ``train/`` also works).
        transform: PIL image -> ``[3, H, W]`` tensor.
        limit: keep ``limit`` evenly spaced images.
        manifest: manifest giving the class list.

    ``dataset[i]`` is ``(image, label, i)`` or a :class:`BadImage`; ``classes`` always lists all 1000 wnids.
    """

    samples: list[tuple[str, int]]  # (path, class index), as ImageFolder builds it

    def __init__(self, root: str | Path, transform: Callable | None = None, limit: int | None = None,
                 manifest: str | Manifest = "imagenet-train") -> None:
        self._wnids = imagenet_wnids(manifest)
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: no such folder")
        root, _ = locate_root("imagenet-train", root)
        try:
            super().__init__(str(root), transform=transform, is_valid_file=functools.partial(_visible_image, root=root))
        except FileNotFoundError as err:
            raise DataError(f"{root}: {err}") from err
        keep = evenly_spaced(len(self.samples), limit)
        self.n_found = len(self.samples)
        self.samples = [self.samples[i] for i in keep]
        self.imgs = self.samples
        self.targets = [t for _, t in self.samples]

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        """All 1000 wnids as classes; ``class_to_idx`` for the wnid folders present, with canonical indices."""
        index = {w: i for i, w in enumerate(self._wnids)}
        with os.scandir(directory) as entries:
            dirs = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
        unknown = [d for d in dirs if d not in index]
        if unknown:
            raise DataError(f"{directory}: {len(unknown)} folders are not ImageNet-1k wnids "
                            f"(first: {', '.join(unknown[:3])})")
        if not dirs:
            raise DataError(f"{directory}: no wnid class folders (n01440764/, ...)")
        missing = len(self._wnids) - len(dirs)
        if missing:
            log.warning("%s: %d of %d class folders are absent", directory, missing, len(self._wnids))
        for d in dirs:  # ImageFolder's own walk would leave an unreadable folder out without a word
            try:
                with os.scandir(os.path.join(directory, d)):
                    pass
            except OSError as err:
                raise unreadable_folder(err, directory) from None
        return list(self._wnids), {d: index[d] for d in dirs if WNID_DIR.match(d)}

    def __getitem__(self, index: int):  # -> tuple[Tensor, int, int] | BadImage
        path, target = self.samples[index]
        return read_sample(Path(path), target, index, self.transform)


def imagenet_train(root: str | Path, transform: Callable | None = None, limit: int | None = None) -> ImageNetTrain:
    """The ImageNet-1k training set under ``root`` (see :class:`ImageNetTrain`)."""
    return ImageNetTrain(root, transform, limit=limit)
