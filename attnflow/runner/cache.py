"""The run directory's result cache: which stored result answers which (model, weights, data) question.

Every result ``attnflow run`` writes goes to ``RUN_DIR/stats/<id>-<hash>.parquet`` (+ ``.csv``, ``.json``), and
its JSON sidecar holds the :class:`RunKey` it answers under ``meta["analysis_key"]``. A stored result is
reused when its sidecar's key equals the key of the requested run:

* ``model`` (preset or timm name), ``id``, ``model_kw``, ``checkpoint_key``;
* ``weights``: ``"sha256:<hex>"`` of the weights file, or ``"random-init"`` (never equal to real weights);
* ``data_root`` (resolved path), ``n_files`` (image files under it), ``limit`` (``None`` when it covers the
  whole folder), ``img_size``, ``crop_pct``;
* ``decode``: the image decoding path (``pil``, ``fast`` or ``gpu``; ``auto`` is ``fast``). A sidecar written
  before the option existed has none and answers ``pil``, the path it was computed with.

Two relaxations let figures be re-rendered on a machine that lacks the weights or the data: when the
official weights of a preset are not on this machine, any stored run of those official weights matches
(printed as "sha256 not checked"); when the data root does not exist, ``n_files`` is not compared.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..atomic import write_atomically
from ..models.files import sha256_file

log = logging.getLogger(__name__)

UNKNOWN_WEIGHTS = "official (not on this machine)"
"""``RunKey.weights`` of a preset's official weights that are neither cached nor given as a file."""


@dataclass(frozen=True)
class RunKey:
    """What a stored result must agree on to be reused (see the module docstring)."""

    model: str
    id: str
    weights: str
    official_weights: bool
    model_kw: Mapping[str, Any] = field(default_factory=dict)
    checkpoint_key: str | None = None
    data_root: str | None = None
    n_files: int | None = None
    limit: int | None = None
    img_size: int = 224
    crop_pct: float | None = None
    decode: str = "pil"

    def to_json(self) -> dict[str, Any]:
        """The key as a JSON-ready dict (what the sidecar stores)."""
        return json.loads(json.dumps(asdict(self), sort_keys=True, default=str))

    @property
    def digest(self) -> str:
        """Short hash of the key, for file names (the unknown-weights case hashes like the official file)."""
        data = self.to_json()
        data.pop("n_files")
        if data.get("decode") == "pil":  # the exact path keeps the names its results had before the option
            data.pop("decode")
        if self.official_weights:
            data["weights"] = "official"
        return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]

    def stem(self) -> str:
        """File stem of this key's result: ``<id>-<digest>`` with unsafe characters replaced."""
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in self.id)
        return f"{safe}-{self.digest}"


def key_matches(stored: Mapping[str, Any], key: RunKey) -> bool:
    """Whether a sidecar's ``analysis_key`` answers ``key`` (see the module docstring for the relaxations)."""
    want = key.to_json()
    have = {"decode": "pil", **stored}  # a sidecar from before the decode option: the PIL path
    if want["weights"] == UNKNOWN_WEIGHTS:
        if not have.get("official_weights") or have.get("weights") in (None, "random-init"):
            return False
        have["weights"] = UNKNOWN_WEIGHTS
    if want["n_files"] is None:
        have["n_files"] = None
    return have == want


@dataclass(frozen=True)
class Stored:
    """A result in the run directory: its parquet path and sidecar metadata."""

    path: Path
    meta: dict[str, Any]


def stored_results(stats_dir: Path) -> list[Stored]:
    """Every readable result in ``stats_dir`` whose sidecar has an ``analysis_key``, newest first."""
    found: list[Stored] = []
    if not stats_dir.is_dir():
        return found
    for side in stats_dir.glob("*.json"):
        parquet = side.with_suffix(".parquet")
        if not parquet.is_file():
            continue
        try:
            meta = json.loads(side.read_text())
        except (OSError, ValueError) as err:
            log.warning("ignoring %s: unreadable sidecar (%s)", side, err)
            continue
        if isinstance(meta, dict) and isinstance(meta.get("analysis_key"), dict):
            found.append(Stored(parquet, meta))
    found.sort(key=lambda s: s.path.stat().st_mtime, reverse=True)
    return found


def find_stored(stats_dir: Path, key: RunKey) -> Stored | None:
    """The newest stored result that answers ``key``, or ``None``."""
    for stored in stored_results(stats_dir):
        if key_matches(stored.meta["analysis_key"], key):
            return stored
    return None


class ShaCache:
    """sha256 of weight files, remembered by (path, size, mtime) in ``RUN_DIR/stats/sha256.json``.

    Hashing a ViT-L checkpoint takes seconds; a re-run that only re-renders figures should not pay it again.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.entries: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            self.entries = {}

    def sha256(self, file: Path) -> str:
        """Hex sha256 of ``file`` (from the cache when its size and mtime are unchanged)."""
        file = file.resolve()
        st = file.stat()
        entry = self.entries.get(str(file))
        if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
            return str(entry["sha256"])
        digest = sha256_file(file)
        self.entries[str(file)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        self._save()
        return digest

    def _save(self) -> None:
        try:
            text = json.dumps(self.entries, indent=1, sort_keys=True)
            write_atomically({self.path: lambda tmp: tmp.write_text(text)})
        except OSError as err:  # a read-only run directory only loses the speed-up
            log.debug("cannot save %s: %s", self.path, err)
