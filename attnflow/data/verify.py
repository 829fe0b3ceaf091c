"""Check a dataset folder against its manifest: missing, extra, misplaced, empty and undecodable files.

``verify_dataset("imagenet-val", "/data/imagenet/val")`` lists the folder once (``os.walk``), compares it with
the file names, labels and counts of the manifest, flags empty files without decoding them, and fully decodes
the other images with PIL on a thread pool (PIL releases the GIL while decoding).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from PIL import Image
from tqdm.auto import tqdm

from ..limits import check_workers
from .cub import read_index
from .images import DataError, evenly_spaced
from .manifests import Manifest, list_manifests, load_manifest

log = logging.getLogger(__name__)

TRAIN_NAME = re.compile(r"^(n\d{8})_\d+\.JPEG$")
"""File names of the ImageNet training set: ``<wnid>_<number>.JPEG``."""

CUB_INDEX_FILES: tuple[str, ...] = ("images.txt", "train_test_split.txt", "image_class_labels.txt", "classes.txt")


@dataclass
class VerifyReport:
    """What :func:`verify_dataset` found.

    Attributes:
        dataset: manifest name.
        root: the folder that was checked (after descending into e.g. ``CUB_200_2011/``).
        layout: ``"flat"``, ``"class_folders"``, ``"released"`` (CUB) or ``"split_file"`` (subsets).
        expected: number of images the manifest (or split file) expects.
        found: expected images present at their expected path.
        missing: expected relative paths that are absent (empty when names are unknown, as for ImageNet-train).
        n_missing: number of absent images (``len(missing)`` when names are known, else ``expected - found``).
        extra: files present that the dataset does not contain (ignoring known index/ground-truth files).
        misplaced: ``(found path, expected path)`` for images in the wrong folder (wrong class).
        spelled_differently: ``(found path, expected path)`` for images whose path differs from the expected
            one only in upper/lower case or in ``.jpg`` for ``.jpeg`` (``ILSVRC2012_val_00000008.jpg`` for
            ``ILSVRC2012_val_00000008.JPEG``): counted here, neither missing nor extra.
        corrupt: ``(path, reason)`` for empty files and files PIL cannot fully decode.
        decoded: number of images fully decoded (0 with ``check_images=False``).
        class_counts: images found per class (wnid or CUB folder).
        class_mismatch: ``class -> (found, expected)`` where they differ (expected ``None`` when unknown).
        problems: structural problems (missing index files, wrong totals, label/folder disagreements).
        notes: informational remarks (the folder descended into, checks skipped).
    """

    dataset: str
    root: str
    layout: str
    expected: int
    found: int = 0
    missing: list[str] = field(default_factory=list)
    n_missing: int = 0
    extra: list[str] = field(default_factory=list)
    misplaced: list[tuple[str, str]] = field(default_factory=list)
    spelled_differently: list[tuple[str, str]] = field(default_factory=list)
    corrupt: list[tuple[str, str]] = field(default_factory=list)
    decoded: int = 0
    class_counts: dict[str, int] = field(default_factory=dict)
    class_mismatch: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Complete and clean: nothing missing, misplaced, spelled in another case or corrupt, and no structural
        problem (extras are fine)."""
        return not (self.n_missing or self.misplaced or self.spelled_differently or self.corrupt or self.problems)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists) with ``ok`` added."""
        return {**asdict(self), "ok": self.ok}

    def summary(self, max_names: int = 5) -> str:
        """A few human-readable lines: counts and the first ``max_names`` names of each kind of problem."""

        def first(items: list[str]) -> str:
            shown = ", ".join(items[:max_names])
            return shown + (f", ... (+{len(items) - max_names:,} more)" if len(items) > max_names else "")

        lines = [f"{self.dataset} at {self.root} (layout: {self.layout})",
                 f"found {self.found:,} / {self.expected:,} expected images"]
        if self.n_missing:
            names = f": {first(self.missing)}" if self.missing else " (names unknown: see class counts)"
            lines.append(f"{self.n_missing:,} missing{names}")
        if self.misplaced:
            lines.append(f"{len(self.misplaced):,} misplaced: "
                         + first([f"{got} (expected {want})" for got, want in self.misplaced]))
        if self.spelled_differently:
            n = len(self.spelled_differently)
            lines.append(f"{n:,} name{' differs' if n == 1 else 's differ'} from the manifest only in case or "
                         ".jpg/.jpeg (rename to the expected names): "
                         + first([f"{got} (expected {want})" for got, want in self.spelled_differently]))
        if self.extra:
            lines.append(f"{len(self.extra):,} extra: {first(self.extra)}")
        if self.corrupt:
            lines.append(f"{len(self.corrupt):,} corrupt: " + first([f"{p} ({why})" for p, why in self.corrupt]))
        if self.class_mismatch:
            lines.append(f"{len(self.class_mismatch):,} classes with unexpected counts: " + first(
                [f"{c} {got}/{'?' if want is None else want}" for c, (got, want) in self.class_mismatch.items()]))
        lines.extend(f"problem: {p}" for p in self.problems)
        lines.extend(f"note: {n}" for n in self.notes)
        lines.append(f"decoded {self.decoded:,} images" if self.decoded else "images not decoded")
        lines.append("OK: complete and clean" if self.ok else "NOT OK: the dataset is incomplete or damaged")
        return "\n".join(lines)


WNID_DIR = re.compile(r"^n\d{8}$")
DESCEND: dict[str, tuple[str, ...]] = {
    "imagenet-val": ("val", "ILSVRC/Data/CLS-LOC/val"),
    "imagenet-train": ("train", "ILSVRC/Data/CLS-LOC/train"),
    "imagenet-subset": ("train", "ILSVRC/Data/CLS-LOC/train"),
}
"""Sub-folders tried when ``root`` points at the dataset's parent folder (ImageNet root, Kaggle root)."""


def _looks_like(kind: str, root: Path) -> bool:
    """Whether ``root`` directly holds ImageNet images (val) or wnid class folders."""
    with os.scandir(root) as entries:
        for entry in entries:
            if WNID_DIR.match(entry.name) and entry.is_dir():
                return True
            if kind == "imagenet-val" and entry.name.startswith("ILSVRC2012_val_"):
                return True
    return False


def locate_root(kind: str, root: Path) -> tuple[Path, list[str]]:
    """``root`` itself, or the first of :data:`DESCEND` under it that holds the images, with a note if moved."""
    if kind not in DESCEND or _looks_like(kind, root):
        return root, []
    for sub in DESCEND[kind]:
        if (root / sub).is_dir() and _looks_like(kind, root / sub):
            return root / sub, [f"using {root / sub}"]
    return root, []


def _walk(root: Path, prefix: str = "", progress: bool = False) -> dict[str, int]:
    """``relative posix path -> size in bytes`` of every regular file under ``root`` (hidden entries skipped)."""
    files: dict[str, int] = {}
    walker = os.walk(root)
    for dirpath, dirnames, filenames in tqdm(walker, desc=f"listing {root.name}", unit="dir", disable=not progress,
                                             leave=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = PurePosixPath(prefix, Path(dirpath).relative_to(root).as_posix())
        for name in filenames:
            if name.startswith("."):
                continue
            try:
                size = os.stat(os.path.join(dirpath, name)).st_size
            except OSError:  # a dangling link: report it as corrupt (size -1 means unreadable)
                size = -1
            files[str(rel_dir / name) if str(rel_dir) != "." else name] = size
    return files


def _decode_error(path: Path) -> str | None:
    """``None`` when PIL fully decodes ``path``, else the reason."""
    try:
        with Image.open(path) as img:
            img.load()
    except Exception as err:  # noqa: BLE001 - any failure means the file is unusable
        return f"cannot decode: {err}" if str(err) else f"cannot decode: {type(err).__name__}"
    return None


def _spelling_key(rel: str) -> str:
    """``rel`` in lower case with a ``.jpeg`` extension written ``.jpg``: equal keys are the same image spelled
    differently (``ILSVRC2012_val_00000008.jpg`` and ``ILSVRC2012_val_00000008.JPEG``)."""
    key = rel.casefold()
    return key[:-5] + ".jpg" if key.endswith(".jpeg") else key


def _match(report: VerifyReport, expected: Mapping[str, str | None], files: dict[str, int], aux: set[str],
           ) -> dict[str, int]:
    """Fill found/missing/misplaced/spelled_differently/extra/class_counts; return ``path -> size`` of the files
    to decode.

    An unexpected file whose name is an absent image's name is misplaced; one whose path has the same
    :func:`_spelling_key` as an absent image's path is spelled differently; the others are extra.
    """
    present = {rel: files[rel] for rel in expected if rel in files}
    absent = {PurePosixPath(rel).name: rel for rel in expected if rel not in files}
    to_check = dict(present)
    leftover = []
    for rel in sorted(set(files) - set(expected)):
        name = PurePosixPath(rel).name
        if name in absent:
            report.misplaced.append((rel, absent.pop(name)))
            to_check[rel] = files[rel]
        else:
            leftover.append(rel)
    folded = {_spelling_key(rel): name for name, rel in absent.items()}
    for rel in leftover:
        absent_name = folded.get(_spelling_key(rel))
        if absent_name is not None and absent_name in absent:
            report.spelled_differently.append((rel, absent.pop(absent_name)))
            to_check[rel] = files[rel]
        elif PurePosixPath(rel).name not in aux:
            report.extra.append(rel)
    report.missing = sorted(absent.values())
    report.n_missing = len(report.missing)
    report.found = len(present)
    counts = collections.Counter(cls for rel in present if (cls := expected[rel]) is not None)
    report.class_counts = dict(sorted(counts.items()))
    return to_check


def _class_mismatch(report: VerifyReport, expected_per_class: dict[str, int]) -> None:
    for cls, want in sorted(expected_per_class.items()):
        got = report.class_counts.get(cls, 0)
        if got != want:
            report.class_mismatch[cls] = (got, want)


def _scan_val(manifest: Manifest, root: Path, progress: bool) -> tuple[VerifyReport, dict[str, int]]:
    files = _walk(root, progress=progress)
    classes = set(manifest.classes)
    names = manifest.file_names
    labels = manifest.val_labels
    wanted = set(names)
    n_flat = sum(p in wanted for p in files)
    n_folders = sum(len(parts) == 2 and parts[0] in classes and parts[1] in wanted
                    for parts in (p.split("/") for p in files))
    layout = "class_folders" if n_folders > n_flat else "flat"  # the minority, if any, is reported as misplaced
    report = VerifyReport(manifest.name, str(root), layout, expected=manifest.num_images)
    if labels is None and layout == "class_folders":
        located = {PurePosixPath(p).name: p for p in files if len(p.split("/")) == 2 and p.split("/")[0] in classes}
        expected = {located.get(n, n): (located[n].split("/")[0] if n in located else None) for n in names}
        report.notes.append("the manifest has no per-image labels: class folders were not checked")
    elif labels is None:
        expected = {n: None for n in names}
    elif layout == "class_folders":
        expected = {f"{w}/{n}": w for n, w in zip(names, labels)}
    else:
        expected = dict(zip(names, labels))
    to_check = _match(report, expected, files, manifest.auxiliary_files)
    if labels is not None:
        _class_mismatch(report, collections.Counter(labels))
    return report, to_check


def _scan_train(manifest: Manifest, root: Path, progress: bool) -> tuple[VerifyReport, dict[str, int]]:
    files = _walk(root, progress=progress)
    classes = set(manifest.classes)
    report = VerifyReport(manifest.name, str(root), "class_folders", expected=manifest.num_images)
    aux = manifest.auxiliary_files
    counts: collections.Counter[str] = collections.Counter()
    to_check: dict[str, int] = {}
    for rel, size in sorted(files.items()):
        parts = rel.split("/")
        match = TRAIN_NAME.match(parts[-1])
        if len(parts) == 2 and parts[0] in classes and match and match.group(1) == parts[0]:
            counts[parts[0]] += 1
            to_check[rel] = size
        elif parts[-1] not in aux:
            report.extra.append(rel)
    report.found = len(to_check)
    report.class_counts = dict(sorted(counts.items()))
    report.n_missing = max(0, report.expected - report.found)
    empty = sorted(c for c in classes if counts[c] == 0)
    for cls in empty:
        report.class_mismatch[cls] = (0, None)
    if empty:
        report.problems.append(f"{len(empty)} of {len(classes)} class folders are missing or empty")
    if report.found > report.expected:
        report.problems.append(f"{report.found - report.expected:,} more training images than the "
                               f"{report.expected:,} expected")
    report.notes.append("per-class counts of the training set are not in the manifest: missing files are counted, "
                        "not named")
    return report, to_check


def _scan_subset(manifest: Manifest, root: Path, split_file: str | Path | None,
                 progress: bool) -> tuple[VerifyReport, dict[str, int]]:
    entries = manifest.split_entries(split_file)
    report = VerifyReport(manifest.name, str(root), "split_file", expected=len(entries))
    spec = manifest.data.get("split_file") or {}
    if split_file is not None and spec.get("sha256"):
        digest = hashlib.sha256(Path(split_file).read_bytes()).hexdigest()
        if digest != spec["sha256"]:
            report.notes.append(f"{split_file} differs from the manifest's {spec.get('upstream_name', 'split file')} "
                                f"(sha256 {digest[:12]}... != {spec['sha256'][:12]}...)")
    if len(entries) != manifest.num_images:
        report.problems.append(f"the split file lists {len(entries):,} images, the manifest expects "
                               f"{manifest.num_images:,}")
    classes = set(manifest.classes)
    expected: dict[str, str | None] = {}
    bad = []
    for line_no, entry in enumerate(entries, start=1):
        name = PurePosixPath(entry).name
        wnid = name.split("_", 1)[0]
        if wnid not in classes:
            bad.append(f"line {line_no}: {entry!r}")
            continue
        expected[f"{wnid}/{name}"] = wnid
    if bad:
        report.problems.append(f"{len(bad)} split-file lines do not name a file of a known class: "
                               + ", ".join(bad[:5]))
    files: dict[str, int] = {}
    for rel in tqdm(expected, desc="checking", unit="file", disable=not progress, leave=False):
        try:
            files[rel] = (root / rel).stat().st_size
        except OSError:
            pass
    to_check = _match(report, expected, files, set())
    _class_mismatch(report, collections.Counter(v for v in expected.values() if v is not None))
    report.notes.append(f"only the listed files are checked under {root} (extra files are not reported)")
    return report, to_check


def _class_of(class_ids: dict[int, str], label: str) -> str | None:
    """The class name ``class_ids`` gives the id written ``label``; ``None`` when it is no listed integer."""
    class_id = _as_int(label)
    return None if class_id is None else class_ids.get(class_id)


def _as_int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _scan_cub(manifest: Manifest, root: Path, progress: bool) -> tuple[VerifyReport, dict[str, int]]:
    folder = str(manifest.data.get("folder", "CUB_200_2011"))
    notes = []
    if not (root / "images.txt").exists() and (root / folder).is_dir():
        root = root / folder
        notes.append(f"using {root}")
    report = VerifyReport(manifest.name, str(root), "released", expected=manifest.num_images, notes=notes)
    absent = [f for f in CUB_INDEX_FILES if not (root / f).is_file()]
    if absent:
        report.problems.append(f"missing index file(s): {', '.join(absent)}")
    if not (root / "images").is_dir():
        report.problems.append("missing images/ folder")
    if "images.txt" in absent:
        report.n_missing = report.expected
        return report, {}
    images = read_index(root / "images.txt", report.problems)
    if len(images) != manifest.num_images:
        report.problems.append(f"images.txt lists {len(images):,} images, expected {manifest.num_images:,}")
    expected = {f"images/{rel}": rel.split("/")[0] for rel in images.values()}
    files = _walk(root / "images", prefix="images", progress=progress) if (root / "images").is_dir() else {}
    to_check = _match(report, expected, files, set())
    _class_mismatch(report, collections.Counter(expected.values()))
    if "classes.txt" not in absent:
        class_ids = read_index(root / "classes.txt", report.problems)
        listed = [class_ids[k] for k in sorted(class_ids)]
        if listed != manifest.classes:
            diff = [c for c in listed if c not in set(manifest.classes)] + \
                   [c for c in manifest.classes if c not in set(listed)]
            report.problems.append(f"classes.txt differs from the manifest's {manifest.num_classes} classes"
                                   + (f" (e.g. {', '.join(diff[:3])})" if diff else " (order differs)"))
        if "image_class_labels.txt" not in absent:
            labels = read_index(root / "image_class_labels.txt", report.problems)
            wrong = sorted(i for i, rel in images.items()
                           if _class_of(class_ids, labels.get(i, "")) != rel.split("/")[0])
            if wrong:
                report.problems.append(f"{len(wrong)} images whose class id in image_class_labels.txt disagrees "
                                       f"with their folder (first ids: {', '.join(map(str, wrong[:5]))})")
    if "train_test_split.txt" not in absent:
        split = read_index(root / "train_test_split.txt", report.problems)
        n_train = sum(split.get(i) == "1" for i in images)
        n_test = sum(split.get(i) == "0" for i in images)
        want = (manifest.data.get("num_train"), manifest.data.get("num_test"))
        if n_train + n_test != len(images):
            report.problems.append(f"train_test_split.txt gives no 0/1 flag for {len(images) - n_train - n_test} "
                                   f"images")
        if want[0] is not None and (n_train, n_test) != tuple(want):
            report.problems.append(f"train/test split has {n_train:,}/{n_test:,} images, expected "
                                   f"{want[0]:,}/{want[1]:,}")
    return report, to_check


def _subset_manifests() -> list[str]:
    """Names of the available manifests of kind ``imagenet-subset`` (the ones a split file applies to)."""
    names = []
    for name in list_manifests():
        try:
            if load_manifest(name).kind == "imagenet-subset":
                names.append(name)
        except DataError:  # a broken manifest elsewhere must not hide this message
            continue
    return names


def verify_dataset(name: str | Path | Manifest, root: str | Path, *, check_images: bool = True,
                   limit: int | None = None, split_file: str | Path | None = None, workers: int | None = None,
                   progress: bool = True) -> VerifyReport:
    """Compare the dataset under ``root`` with its manifest.

    Args:
        name: manifest name (``"imagenet-val"``), path to a manifest JSON, or a :class:`Manifest`.
        root: the dataset folder: the images folder for ImageNet-val (flat or class folders), the training
            folder for ImageNet-train and its subsets, ``CUB_200_2011/`` or its parent for CUB.
        check_images: fully decode every present image with PIL (empty files are flagged either way).
        limit: decode only ``limit`` evenly spaced present images (presence is always checked for all).
        split_file: split file of a subset manifest (required when the manifest ships none).
        workers: decoding threads (default: the number of CPUs; 0: decode in this thread).
        progress: show tqdm progress bars.

    Returns:
        A :class:`VerifyReport`; ``report.ok`` is ``True`` when the dataset is complete and clean.

    Raises:
        UnknownManifestError: for an unknown manifest name.
        DataError: when ``root`` is not a folder, a needed split file is not available, or ``split_file`` is
            given for a manifest that is not a subset.
    """
    check_workers(workers)
    manifest = name if isinstance(name, Manifest) else load_manifest(name)
    if split_file is not None and manifest.kind != "imagenet-subset":
        kind = f" ({manifest.kind})" if manifest.kind != manifest.name else ""
        raise DataError(f"split_file does not apply to {manifest.name}{kind}; it applies to the "
                        f"subset manifests: {', '.join(_subset_manifests()) or 'none found'}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder (the root of {manifest.name})")
    root, notes = locate_root(manifest.kind, root)
    if manifest.kind == "imagenet-val":
        report, to_check = _scan_val(manifest, root, progress)
    elif manifest.kind == "imagenet-train":
        report, to_check = _scan_train(manifest, root, progress)
    elif manifest.kind == "imagenet-subset":
        report, to_check = _scan_subset(manifest, root, split_file, progress)
    else:
        report, to_check = _scan_cub(manifest, root, progress)
    report.notes[:0] = notes
    base = Path(report.root)
    corrupt = [(rel, "empty file") for rel, size in to_check.items() if size == 0]
    corrupt += [(rel, "unreadable file") for rel, size in to_check.items() if size < 0]
    if check_images:
        candidates = sorted(rel for rel, size in to_check.items() if size > 0)
        chosen = [candidates[i] for i in evenly_spaced(len(candidates), limit)] if candidates else []
        desc = f"decoding {manifest.name}"
        if workers == 0:  # in this thread
            for rel in tqdm(chosen, desc=desc, unit="img", disable=not progress, leave=False):
                reason = _decode_error(base / rel)
                if reason is not None:
                    corrupt.append((rel, reason))
        else:
            with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
                futures = {pool.submit(_decode_error, base / rel): rel for rel in chosen}
                for future in tqdm(as_completed(futures), total=len(futures), desc=desc, unit="img",
                                   disable=not progress, leave=False):
                    reason = future.result()
                    if reason is not None:
                        corrupt.append((futures[future], reason))
        report.decoded = len(chosen)
    report.corrupt = sorted(corrupt)
    log.debug("%s: %d/%d found, %d missing, %d extra, %d corrupt", manifest.name, report.found, report.expected,
             report.n_missing, len(report.extra), len(report.corrupt))
    return report
