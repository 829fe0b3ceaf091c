"""Dataset manifests: machine-readable descriptions of the datasets the paper uses.

A manifest is one JSON file in ``data_manifests/`` (schema described in ``data_manifests/README.md``): layout,
counts, class list, file naming, label and split files, official archives with sizes and checksums, and what
could not be verified. :func:`load_manifest` reads one by name (``"imagenet-val"``) or by path; the files it
refers to (class table, validation labels, split lists) are read lazily, on first use.

Manifests are searched in, in order: the folders of the ``ATTNFLOW_MANIFESTS`` environment variable
(``os.pathsep``-separated), the ``data_manifests/`` folder of a source checkout, and
``<sys.prefix>/share/attnflow/data_manifests`` (where a wheel installs them).
"""

from __future__ import annotations

import difflib
import gzip
import json
import os
import sys
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

from .images import DataError

MANIFEST_ENV = "ATTNFLOW_MANIFESTS"
"""Environment variable with extra manifest folders, searched first."""

KINDS: tuple[str, ...] = ("imagenet-val", "imagenet-train", "imagenet-subset", "cub")
"""Dataset kinds that :func:`attnflow.data.verify.verify_dataset` knows how to check."""

_REQUIRED_KEYS: tuple[str, ...] = ("name", "kind", "num_images", "num_classes")


class UnknownManifestError(DataError, KeyError):
    """A manifest name that is not in any manifest folder; the message suggests close names."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


def manifest_dirs() -> list[Path]:
    """Folders searched for ``<name>.json`` manifests, in priority order (existing folders only)."""
    dirs = [Path(p) for p in os.environ.get(MANIFEST_ENV, "").split(os.pathsep) if p]
    dirs.append(Path(__file__).resolve().parents[2] / "data_manifests")
    dirs.append(Path(sys.prefix) / "share" / "attnflow" / "data_manifests")
    seen: list[Path] = []
    for d in dirs:
        if d.is_dir() and d not in seen:
            seen.append(d)
    return seen


def _manifest_paths() -> dict[str, Path]:
    """``name -> path`` of every manifest found; earlier folders win."""
    found: dict[str, Path] = {}
    for d in manifest_dirs():
        for path in sorted(d.glob("*.json")):
            found.setdefault(path.stem, path)
    return found


def list_manifests() -> list[str]:
    """Names of the available manifests, sorted (e.g. ``["cub-200-2011", "imagenet-1pct", ...]``)."""
    return sorted(_manifest_paths())


class Manifest:
    """One dataset description.

    Attributes:
        name: manifest name, e.g. ``"imagenet-val"``.
        kind: one of :data:`KINDS`.
        title: human-readable dataset name.
        num_images: images the complete dataset has.
        num_classes: number of classes.
        data: the raw JSON mapping (every documented key, e.g. ``"archives"``, ``"unverified"``).
        directory: folder the manifest was read from; relative file references resolve against it.
    """

    def __init__(self, data: Mapping[str, Any], directory: Path, source: str = "<memory>") -> None:
        missing = [k for k in _REQUIRED_KEYS if k not in data]
        if missing:
            raise DataError(f"manifest {source}: missing key(s) {', '.join(missing)}")
        if data["kind"] not in KINDS:
            raise DataError(f"manifest {source}: unknown kind {data['kind']!r} (known: {', '.join(KINDS)})")
        for key in ("num_images", "num_classes"):
            if not isinstance(data[key], int) or data[key] <= 0:
                raise DataError(f"manifest {source}: {key} must be a positive integer, got {data[key]!r}")
        self.data: Mapping[str, Any] = data
        self.directory = Path(directory)
        self.source = source
        self.name: str = str(data["name"])
        self.kind: str = str(data["kind"])
        self.title: str = str(data.get("title", self.name))
        self.num_images: int = int(data["num_images"])
        self.num_classes: int = int(data["num_classes"])

    def __repr__(self) -> str:
        return f"Manifest({self.name!r}, kind={self.kind!r}, num_images={self.num_images})"

    def resolve(self, filename: str) -> Path:
        """Path of a file the manifest refers to (relative to the manifest's folder).

        Raises:
            DataError: if the file does not exist.
        """
        path = self.directory / filename
        if not path.is_file():
            raise DataError(f"manifest {self.name}: referenced file {path} does not exist")
        return path

    def _read_text(self, filename: str) -> str:
        path = self.resolve(filename)
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8")

    @cached_property
    def _class_table(self) -> list[dict[str, str]]:
        """Rows of the class table (``index, wnid, devkit_id, name``) or inline classes as rows."""
        spec = self.data.get("classes") or {}
        if "file" in spec:
            lines = self._read_text(spec["file"]).splitlines()
            header = lines[0].split("\t")
            rows = [dict(zip(header, line.split("\t"))) for line in lines[1:] if line.strip()]
        elif "wnids" in spec:
            names = spec.get("names") or [""] * len(spec["wnids"])
            rows = [{"wnid": w, "name": n} for w, n in zip(spec["wnids"], names)]
        elif "folders" in spec:
            rows = [{"wnid": f, "name": f.split(".", 1)[-1].replace("_", " ")} for f in spec["folders"]]
        else:
            raise DataError(f"manifest {self.name}: no class list ('classes' needs 'file', 'wnids' or 'folders')")
        if len(rows) != self.num_classes:
            raise DataError(f"manifest {self.name}: class list has {len(rows)} entries, "
                            f"num_classes says {self.num_classes}")
        return rows

    @property
    def classes(self) -> list[str]:
        """Class identifiers in label order: ImageNet wnids (sorted) or CUB class folder names."""
        return [row["wnid"] for row in self._class_table]

    @property
    def class_names(self) -> list[str]:
        """Human-readable class names in label order (e.g. ``"tench, Tinca tinca"``)."""
        return [row.get("name", "") for row in self._class_table]

    @property
    def devkit_ids(self) -> dict[int, str] | None:
        """ImageNet devkit ``ILSVRC2012_ID`` (1..1000) -> wnid, or ``None`` when the table lacks it."""
        rows = self._class_table
        if not rows or "devkit_id" not in rows[0]:
            return None
        return {int(row["devkit_id"]): row["wnid"] for row in rows}

    @cached_property
    def val_labels(self) -> list[str] | None:
        """Wnid of each validation file in file order (line ``i`` = image ``index_start + i``), or ``None``."""
        spec = self.data.get("labels")
        if not spec:
            return None
        if "wnids" in spec:
            labels = list(spec["wnids"])
        else:
            labels = self._read_text(spec["file"]).split()
        if len(labels) != self.num_images:
            raise DataError(f"manifest {self.name}: label list has {len(labels)} entries, "
                            f"num_images says {self.num_images}")
        return labels

    @property
    def file_names(self) -> list[str]:
        """Expected file names for pattern-named datasets (ImageNet-val): ``ILSVRC2012_val_00000001.JPEG``, ..."""
        pattern = self.data.get("file_pattern")
        if not pattern or "{index" not in pattern:
            raise DataError(f"manifest {self.name}: has no indexed file_pattern")
        start = int(self.data.get("index_start", 1))
        return [pattern.format(index=i) for i in range(start, start + self.num_images)]

    @property
    def auxiliary_files(self) -> set[str]:
        """Names of non-image files that may sit next to the images (ground truth, index, split files)."""
        names = {entry["name"] for entry in self.data.get("ground_truth_files", [])}
        names.update(self.data.get("index_files", {}))
        split = self.data.get("split_file") or {}
        names.update(v for v in (split.get("file"), split.get("upstream_name")) if v)
        names.update({"README", "README.md", "LICENSE", "meta.mat"})
        return names

    def split_entries(self, split_file: str | Path | None = None) -> list[str]:
        """The file names listed by a subset's split file (one per line, blank lines skipped).

        Args:
            split_file: a split file to use instead of the shipped one (required when none is shipped).

        Raises:
            DataError: when no split file is shipped and none is given, or the file cannot be read.
        """
        spec = self.data.get("split_file") or {}
        if split_file is not None:
            path = Path(split_file)
            if path.is_dir():
                raise DataError(f"split file {path}: is a folder, not a file of image names")
            if not path.is_file():
                raise DataError(f"split file {path}: no such file")
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise DataError(f"split file {path}: not a text file of image names ({err})") from err
        elif spec.get("file"):
            text = self._read_text(spec["file"])
        else:
            upstream = spec.get("upstream_name", "the split file")
            raise DataError(f"manifest {self.name} ships no split file; give its path as split_file ({upstream}, "
                            f"{spec.get('source', 'see the manifest')})")
        return [line.strip() for line in text.splitlines() if line.strip()]


def load_manifest(name: str | Path) -> Manifest:
    """Load a manifest by name (``"imagenet-val"``) or from a JSON file path.

    Raises:
        UnknownManifestError: for an unknown name (the message lists close matches).
        DataError: for a file that is not a valid manifest.
    """
    text = str(name)
    candidate = Path(text)
    if text.endswith(".json") or os.sep in text or candidate.is_file():
        if not candidate.is_file():
            raise DataError(f"manifest file {candidate}: no such file")
        path = candidate
    else:
        paths = _manifest_paths()
        if text not in paths:
            close = difflib.get_close_matches(text, list(paths), n=3, cutoff=0.4)
            hint = (f"; did you mean {', '.join(close)}?" if close
                    else f"; available: {', '.join(sorted(paths)) or 'none (no manifest folder found)'}")
            raise UnknownManifestError(f"unknown dataset manifest {text!r}{hint}")
        path = paths[text]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"manifest {path}: not readable JSON ({err})") from err
    if not isinstance(data, dict):
        raise DataError(f"manifest {path}: top level must be a JSON object")
    return Manifest(data, path.parent, source=str(path))
