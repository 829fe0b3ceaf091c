"""Ground-truth boxes of ImageNet-val (and any image folder) in the formats they are distributed in.

==========  ==========================================================================================
format      what it is
==========  ==========================================================================================
``xml``     the official ``ILSVRC2012_bbox_val_v3.tgz`` (the archive itself, or extracted:
            ``val/ILSVRC2012_val_00000001.xml``, or one such file; also Kaggle's
            ``ILSVRC/Annotations/CLS-LOC/val``):
            PASCAL-VOC files with the image's ``<size>`` and one ``<object><bndbox>`` per object
``kaggle``  Kaggle's ``LOC_val_solution.csv``: ``ImageId,PredictionString`` with
            ``"n01751748 111 108 441 193 n01751748 ..."`` (groups of wnid x_min y_min x_max y_max)
``wsol``    clovaai/wsolevaluation's metadata folder (``metadata/ILSVRC/test``): ``localization.txt``
            lines ``val/ILSVRC2012_val_00000001.JPEG,x0,y0,x1,y1`` (one per box), ``image_sizes.txt``
            lines ``path,width,height``, ``image_ids.txt`` (one path per line)
``csv``     a CSV you write: ``path,x1,y1,x2,y2`` per box, optionally ``,width,height`` (the size the
            coordinates refer to), with or without a header (``path,x1,y1,x2,y2``,
            ``path,xmin,ymin,xmax,ymax`` or ``path,x0,y0,x1,y1``)
==========  ==========================================================================================

Coordinates are pixels of the original image, inclusive (ImageNet's convention: a box ``(x1, y1, x2, y2)``
covers ``x2 - x1 + 1`` columns); the four formats give identical numbers for ImageNet-val and are used as they
are. An image is matched to its boxes by its path relative to the data folder, else by its file name, else by
its stem (``ILSVRC2012_val_00000001``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import re
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

import numpy as np

from ..errors import AttnflowError

log = logging.getLogger(__name__)

BOX_FORMATS: tuple[str, ...] = ("auto", "xml", "kaggle", "wsol", "csv")
"""Values of the boxes' ``format`` option: ``read_boxes(format=...)``, also in ``attnflow localize``."""

_HEADERS: dict[tuple[str, ...], str] = {("path", "x1", "y1", "x2", "y2"): "x1y1x2y2",
                                        ("path", "xmin", "ymin", "xmax", "ymax"): "minmax",
                                        ("path", "x0", "y0", "x1", "y1"): "x0y0x1y1"}
_ARCHIVES = (".tgz", ".tar.gz", ".tar")


class BoxFileError(AttnflowError, ValueError):
    """A ground-truth box file or folder that cannot be read; the message names the file and what was expected."""


@dataclass
class GroundTruth:
    """Ground-truth boxes of a dataset.

    Attributes:
        boxes: image key -> ``[G, 4]`` float64 boxes ``(x1, y1, x2, y2)`` in original-image pixels (``G >= 1``).
        sizes: image key -> ``(width, height)`` the coordinates refer to, where the file states it.
        listed: keys the file lists without any box (e.g. an XML without ``<object>``).
        path: the file or folder read.
        format: one of :data:`BOX_FORMATS` (not ``auto``).
    """

    boxes: dict[str, np.ndarray]
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    listed: set[str] = field(default_factory=set)
    path: str = ""
    format: str = ""

    def __post_init__(self) -> None:
        self._by_name = _unique_index(self.boxes, lambda k: PurePosixPath(k).name)
        self._by_stem = _unique_index(self.boxes, lambda k: _stem(k))

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def n_boxes(self) -> int:
        """Total number of boxes."""
        return int(sum(len(b) for b in self.boxes.values()))

    def fingerprint(self) -> str:
        """A short hash of every key, box and stated size (what a resumed run must score against); neither the
        order of the images nor that of one image's boxes (the metric takes the best box) changes it."""
        digest = hashlib.sha256()
        for key in sorted(self.boxes):
            rows = np.asarray(self.boxes[key], dtype=np.float64).reshape(-1, 4)
            rows = rows[np.lexsort(rows.T[::-1])]                                      # sorted by x1, y1, x2, y2
            digest.update(key.encode() + b"\0" + np.ascontiguousarray(rows).tobytes()
                          + repr(self.sizes.get(key)).encode() + b"\0")
        return digest.hexdigest()[:16]

    def key_for(self, image: str | Path, root: str | Path | None = None) -> str | None:
        """The key of an image's boxes: its path relative to ``root``, else its file name, else its stem
        (each only when it names one entry of the file); ``None`` without boxes."""
        path = Path(image)
        if root is not None:
            try:
                rel = path.relative_to(root).as_posix()
            except ValueError:
                rel = path.as_posix()
            if rel in self.boxes:
                return rel
        return self._by_name.get(path.name) or self._by_stem.get(_stem(path.name))

    def size_of(self, key: str) -> tuple[int, int] | None:
        """The ``(width, height)`` the file states for ``key``, if any."""
        return self.sizes.get(key)


def _stem(name: str) -> str:
    base = PurePosixPath(name).name
    return base.rsplit(".", 1)[0] if "." in base else base


def _unique_index(boxes: dict[str, np.ndarray], name: object) -> dict[str, str]:
    index: dict[str, str] = {}
    clash: set[str] = set()
    for key in boxes:
        short = name(key)  # type: ignore[operator]
        if short in index and index[short] != key:
            clash.add(short)
        index.setdefault(short, key)
    for short in clash:
        del index[short]
    return index


# --------------------------------------------------------------------------------------------- readers
def read_boxes(path: str | Path, format: str = "auto") -> GroundTruth:
    """Read ground-truth boxes in any of the formats of this module.

    Args:
        path: a file or folder (see the module docstring).
        format: ``auto`` (detect) or one of ``xml``, ``kaggle``, ``wsol``, ``csv``.

    Returns:
        The :class:`GroundTruth`.

    Raises:
        BoxFileError: a missing path, an unknown format, or a malformed line or file (named, with the line).
    """
    p = Path(path)
    if format not in BOX_FORMATS:
        raise BoxFileError(f"unknown boxes format {format!r}; choose from {', '.join(BOX_FORMATS)}")
    if not p.exists():
        raise BoxFileError(f"{p}: no such boxes file or folder")
    fmt = detect_format(p) if format == "auto" else format
    reader = {"xml": read_xml_boxes, "kaggle": read_kaggle_boxes, "wsol": read_wsol_boxes, "csv": read_csv_boxes}
    gt = reader[fmt](p)
    if not gt.boxes:
        raise BoxFileError(f"{p}: no boxes found (read as {fmt}: {_EXPECTED[fmt]})")
    log.info("read %d boxes of %d images from %s (%s)", gt.n_boxes, len(gt), p, fmt)
    return gt


_EXPECTED = {
    "xml": "PASCAL-VOC .xml files with <object><bndbox>, as ILSVRC2012_bbox_val_v3.tgz",
    "kaggle": "LOC_val_solution.csv with columns ImageId,PredictionString",
    "wsol": "wsolevaluation metadata: localization.txt lines 'path,x0,y0,x1,y1'",
    "csv": "lines 'path,x1,y1,x2,y2[,width,height]'",
}


def detect_format(path: Path) -> str:
    """The format of a boxes file or folder (see :data:`BOX_FORMATS`).

    Raises:
        BoxFileError: when it looks like none of them.
    """
    if path.is_dir():
        if (path / "localization.txt").is_file():
            return "wsol"
        if _xml_folder(path) is not None:
            return "xml"
        raise BoxFileError(f"{path}: a boxes folder must hold ILSVRC .xml annotations (or val/*.xml) or "
                           "wsolevaluation metadata (localization.txt)")
    name = path.name.lower()
    if name.endswith(_ARCHIVES) or _is_xml_file(path):
        return "xml"
    if name == "localization.txt":
        return "wsol"
    first = _first_line(path)
    if [c.strip() for c in first.split(",")][:2] == ["ImageId", "PredictionString"]:
        return "kaggle"
    return "csv"


def _is_xml_file(path: Path) -> bool:
    """A single annotation file: a ``.xml`` name, or text that starts with ``<``."""
    if path.suffix.lower() == ".xml":
        return True
    with path.open("rb") as f:
        return f.read(256).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<")


def _first_line(path: Path) -> str:
    try:
        with path.open(encoding="utf-8-sig") as f:
            for line in f:
                if line.strip():
                    return line.strip()
    except UnicodeDecodeError:
        raise BoxFileError(f"{path}: not a text file; expected one of: {'; '.join(_EXPECTED.values())}") from None
    raise BoxFileError(f"{path}: empty boxes file")


def _number(text: str, where: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BoxFileError(f"{where}: {what} {text!r} is not a number") from None
    if not np.isfinite(value):
        raise BoxFileError(f"{where}: {what} {text!r} is not a finite number")
    return value


def _box(values: Iterable[str], where: str) -> list[float]:
    x1, y1, x2, y2 = (_number(v, where, name) for v, name in zip(values, ("x1", "y1", "x2", "y2")))
    if min(x1, y1) < 0:
        raise BoxFileError(f"{where}: negative coordinate in box ({x1:g}, {y1:g}, {x2:g}, {y2:g})")
    if x2 < x1 or y2 < y1:
        raise BoxFileError(f"{where}: box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) has x2 < x1 or y2 < y1 (expected "
                           "x1 y1 x2 y2: top-left then bottom-right corner)")
    return [x1, y1, x2, y2]


def _size(width: float, height: float, where: str) -> tuple[int, int]:
    if width <= 0 or height <= 0:
        raise BoxFileError(f"{where}: image size {width:g}x{height:g} is not positive")
    return int(width), int(height)


def _finish(boxes: dict[str, list[list[float]]], sizes: dict[str, tuple[int, int]], listed: set[str], path: Path,
            fmt: str) -> GroundTruth:
    arrays = {k: np.asarray(v, dtype=np.float64).reshape(-1, 4) for k, v in boxes.items() if v}
    return GroundTruth(arrays, sizes, {k for k in listed if k not in arrays}, str(path), fmt)


# ---------------------------------------------------------------------------------------- ILSVRC XML
def _xml_folder(path: Path) -> Path | None:
    for folder in (path, path / "val"):
        if folder.is_dir() and any(folder.glob("*.xml")):
            return folder
    return None


def _xml_sources(path: Path) -> Iterator[tuple[str, str, bytes]]:
    """``(display name, key, xml bytes)`` of every annotation in a folder or a tar archive."""
    if path.is_dir():
        folder = _xml_folder(path)
        if folder is None:
            raise BoxFileError(f"{path}: no .xml annotations (expected ILSVRC2012_bbox_val_v3.tgz extracted: "
                               "val/ILSVRC2012_val_00000001.xml)")
        for file in sorted(folder.glob("*.xml")):
            yield str(file), file.stem, file.read_bytes()
        return
    if not path.name.lower().endswith(_ARCHIVES) and _is_xml_file(path):  # one annotation file
        yield str(path), path.stem, path.read_bytes()
        return
    try:
        with tarfile.open(path) as tar:
            members = [m for m in tar if m.isfile() and m.name.lower().endswith(".xml")]
            if not members:
                raise BoxFileError(f"{path}: the archive holds no .xml annotations")
            for m in members:
                data = tar.extractfile(m)
                if data is not None:
                    yield f"{path}:{m.name}", PurePosixPath(m.name).stem, data.read()
    except (tarfile.TarError, EOFError, OSError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0].rstrip(":")
        raise BoxFileError(f"{path}: not a readable tar archive of .xml annotations ({reason})") from None


def _xml_int(node: ET.Element, tag: str, where: str) -> float:
    found = node.find(tag)
    if found is None or found.text is None:
        raise BoxFileError(f"{where}: <{tag}> is missing")
    return _number(found.text.strip(), where, f"<{tag}>")


def read_xml_boxes(path: str | Path) -> GroundTruth:
    """Boxes of the official ILSVRC bbox XML annotations (a folder, ``val/`` under it, the .tgz itself, or one
    ``.xml`` file)."""
    path = Path(path)
    boxes: dict[str, list[list[float]]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    listed: set[str] = set()
    for where, key, data in _xml_sources(path):
        try:
            root = ET.fromstring(data)
        except ET.ParseError as err:
            raise BoxFileError(f"{where}: not a PASCAL-VOC annotation ({err})") from None
        if root.tag != "annotation":
            raise BoxFileError(f"{where}: expected an <annotation> root (PASCAL-VOC), got <{root.tag}>")
        size = root.find("size")
        if size is not None:
            sizes[key] = _size(_xml_int(size, "width", where), _xml_int(size, "height", where), where)
        listed.add(key)
        for obj in root.iter("object"):
            bnd = obj.find("bndbox")
            if bnd is None:
                raise BoxFileError(f"{where}: an <object> without <bndbox>")
            values = [str(_xml_int(bnd, t, where)) for t in ("xmin", "ymin", "xmax", "ymax")]
            boxes.setdefault(key, []).append(_box(values, where))
    return _finish(boxes, sizes, listed, path, "xml")


# -------------------------------------------------------------------------------- Kaggle LOC_val_solution
def read_kaggle_boxes(path: str | Path) -> GroundTruth:
    """Boxes of Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``)."""
    path = Path(path)
    boxes: dict[str, list[list[float]]] = {}
    listed: set[str] = set()
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
            raise BoxFileError(f"{path}: expected the header ImageId,PredictionString of LOC_val_solution.csv, "
                               f"got {','.join(reader.fieldnames or [])!r}")
        for row in reader:
            where = f"{path}: line {reader.line_num}"
            key = (row["ImageId"] or "").strip()
            tokens = (row["PredictionString"] or "").split()
            if not key:
                raise BoxFileError(f"{where}: empty ImageId")
            if len(tokens) % 5:
                raise BoxFileError(f"{where}: PredictionString has {len(tokens)} fields; expected groups of 5 "
                                   "(wnid x_min y_min x_max y_max)")
            listed.add(key)
            for i in range(0, len(tokens), 5):
                boxes.setdefault(key, []).append(_box(tokens[i + 1:i + 5], where))
    return _finish(boxes, {}, listed, path, "kaggle")


# ------------------------------------------------------------------------------------- wsolevaluation
def _comma_lines(path: Path) -> Iterator[tuple[str, list[str]]]:
    with path.open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            line = line.strip("\r\n")
            if line.strip():
                yield f"{path}: line {number}", [part.strip() for part in line.split(",")]


def read_wsol_boxes(path: str | Path) -> GroundTruth:
    """Boxes of a wsolevaluation metadata folder (``localization.txt``, ``image_sizes.txt``, ``image_ids.txt``),
    or of its ``localization.txt`` (sizes and ids are then read from next to it when there)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    loc = path / "localization.txt" if path.is_dir() else path
    if not loc.is_file():
        raise BoxFileError(f"{loc}: no such file (wsolevaluation metadata: localization.txt, image_sizes.txt, "
                           "image_ids.txt)")
    boxes: dict[str, list[list[float]]] = {}
    for where, parts in _comma_lines(loc):
        if len(parts) == 3:
            raise BoxFileError(f"{where}: 'path,mask,ignore' is a mask (OpenImages) localization file; boxes "
                               "need 'path,x0,y0,x1,y1'")
        if len(parts) != 5:
            raise BoxFileError(f"{where}: expected 'path,x0,y0,x1,y1', got {','.join(parts)!r}")
        boxes.setdefault(parts[0], []).append(_box(parts[1:], where))
    sizes: dict[str, tuple[int, int]] = {}
    if (folder / "image_sizes.txt").is_file():
        for where, parts in _comma_lines(folder / "image_sizes.txt"):
            if len(parts) != 3:
                raise BoxFileError(f"{where}: expected 'path,width,height', got {','.join(parts)!r}")
            sizes[parts[0]] = _size(_number(parts[1], where, "width"), _number(parts[2], where, "height"), where)
    listed: set[str] = set()
    if (folder / "image_ids.txt").is_file():
        listed = {line.strip() for line in (folder / "image_ids.txt").read_text(encoding="utf-8").splitlines()
                  if line.strip()}
    return _finish(boxes, sizes, listed, path, "wsol")


# ---------------------------------------------------------------------------------------- generic CSV
def read_csv_boxes(path: str | Path) -> GroundTruth:
    """Boxes of a CSV ``path,x1,y1,x2,y2[,width,height]`` (one box per line, header optional)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8-sig")
    rows = [(n, r) for n, r in enumerate(csv.reader(io.StringIO(text)), start=1) if any(c.strip() for c in r)]
    if not rows:
        raise BoxFileError(f"{path}: empty boxes file")
    first = [c.strip().lower() for c in rows[0][1]]
    if len(first) >= 5 and not _is_number(first[1]):
        if tuple(first[:5]) not in _HEADERS or first[5:] not in ([], ["width", "height"]):
            raise BoxFileError(f"{path}: line 1: unknown header {','.join(first)!r}; expected "
                               + " or ".join(repr(",".join(h)) for h in _HEADERS) + " (optionally ,width,height)")
        rows = rows[1:]
    boxes: dict[str, list[list[float]]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    for number, row in rows:
        where = f"{path}: line {number}"
        parts = [c.strip() for c in row]
        if len(parts) not in (5, 7):
            raise BoxFileError(f"{where}: expected 'path,x1,y1,x2,y2' (optionally ',width,height'), got "
                               f"{_shorten(','.join(parts))!r}")
        if not parts[0]:
            raise BoxFileError(f"{where}: empty path")
        boxes.setdefault(parts[0], []).append(_box(parts[1:5], where))
        if len(parts) == 7:
            sizes[parts[0]] = _size(_number(parts[5], where, "width"), _number(parts[6], where, "height"), where)
    return _finish(boxes, sizes, set(), path, "csv")


def _shorten(text: str, width: int = 80) -> str:
    """``text`` cut to ``width`` characters (``...`` at the end) for an error line."""
    return text if len(text) <= width else text[:width - 3] + "..."


def _is_number(text: str) -> bool:
    return re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text.strip()) is not None
