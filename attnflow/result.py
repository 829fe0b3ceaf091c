"""Result: the tidy table of per-(block, head) attention statistics plus its provenance.

A result is a long-form :class:`pandas.DataFrame` with exactly the columns of :data:`COLUMNS`
(``block`` and ``head`` are 0-based) and a ``meta`` dict of provenance. On disk a result is

* ``NAME.parquet`` - the table (pyarrow),
* ``NAME.csv``     - the same table, for spreadsheets and ``grep``,
* ``NAME.json``    - the provenance sidecar (model preset, checkpoint sha256, dataset root, images used and
  skipped, resolution, dtype, package versions, ...).
"""

from __future__ import annotations

import difflib
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

from .atomic import write_atomically
from .errors import AttnflowError

COLUMNS: tuple[str, ...] = ("model", "block", "head", "metric", "mean", "std", "count")
"""Columns of every result table, in order."""

_DTYPES = {"model": "string", "block": "int64", "head": "int64", "metric": "string",
           "mean": "float64", "std": "float64", "count": "int64"}

MAX_INDEX: int = 4095
"""The largest ``block`` or ``head`` index a table may hold (no ViT comes near it; a larger one is a corrupt or
hand-edited table, which would have a plot draw a tick per block)."""


class ResultError(AttnflowError, ValueError):
    """A result table that cannot be built, combined or queried as asked."""


class ResultNotFoundError(AttnflowError, FileNotFoundError):
    """No result file at the given path."""


def sidecar_path(path: str | Path) -> Path:
    """The JSON provenance file that belongs to a ``.parquet`` / ``.csv`` result path."""
    return Path(path).with_suffix(".json")


@dataclass
class Result:
    """Per-(block, head, metric) statistics of one or more models.

    Attributes:
        frame: tidy table with columns :data:`COLUMNS`; ``mean``/``std`` are over images, ``count`` is the
            number of images that contributed (0 and NaN for metrics a model does not have, e.g. [cls]
            metrics of I-JEPA).
        meta: provenance. For a single run a flat dict; for a concatenation ``{"runs": [meta, ...]}``.
    """

    frame: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [c for c in COLUMNS if c not in self.frame.columns]
        if missing:
            raise ResultError(f"result table lacks columns {missing}; expected {list(COLUMNS)}")
        expected = ", ".join(f"{c}: {t}" for c, t in _DTYPES.items())
        try:
            _check_values(self.frame)
            self.frame = self.frame.loc[:, list(COLUMNS)].astype(_DTYPES).reset_index(drop=True)
        except _BadValue:
            raise
        except (TypeError, ValueError) as err:  # e.g. text in the block column
            raise ResultError(f"result table has a column of the wrong type ({err}); expected {expected}") from None

    # ------------------------------------------------------------------ views
    def to_frame(self) -> pd.DataFrame:
        """A copy of the tidy table (columns :data:`COLUMNS`)."""
        return self.frame.copy()

    @property
    def models(self) -> list[str]:
        """Model names in order of first appearance."""
        return list(dict.fromkeys(self.frame["model"].tolist()))

    @property
    def metrics(self) -> list[str]:
        """Metric names in order of first appearance."""
        return list(dict.fromkeys(self.frame["metric"].tolist()))

    def per_block(self, metric: str) -> pd.DataFrame:
        """Mean over heads of one metric: columns ``model, block, value`` (NaN rows dropped).

        Raises:
            ResultError: ``metric`` is not in the table (the message names close ones).
        """
        if metric not in self.metrics:
            close = difflib.get_close_matches(metric, self.metrics, n=3, cutoff=0.5)
            raise ResultError(f"no metric {metric!r} in this result" + (f"; did you mean {', '.join(close)}?" if close
                                                                        else f"; it has {', '.join(self.metrics)}"))
        sub = self.frame[self.frame["metric"] == metric]
        out = sub.groupby(["model", "block"], sort=False)["mean"].mean().reset_index()
        return out.rename(columns={"mean": "value"}).dropna(subset=["value"])

    def run_meta(self, model: str) -> dict[str, Any]:
        """Provenance of the run that produced ``model`` ({} when unknown)."""
        runs = self.meta.get("runs", [self.meta])
        for run in runs:
            if run.get("model") == model:
                return run
        return {}

    # ------------------------------------------------------------------- I/O
    def write(self, path: str | Path) -> Path:
        """Write ``path`` (.parquet), the sibling .csv and the .json sidecar, all or nothing (see
        :func:`write_table`); returns the parquet path."""
        return write_table(path, self.frame, self.meta)

    @classmethod
    def read(cls, path: str | Path) -> "Result":
        """Read a result written by :meth:`write` (``.parquet`` or ``.csv``; the sidecar is optional).

        Raises:
            ResultNotFoundError: no file at ``path``.
            ResultError: not a ``.parquet``/``.csv`` file, an unreadable table or sidecar, or a table without
                the columns of :data:`COLUMNS`; the message names the file.
        """
        path = Path(path)
        if not path.exists():
            hint = ""
            if path.suffix not in (".parquet", ".csv"):
                found = [p.name for p in (path.with_suffix(".parquet"), path.with_suffix(".csv")) if p.exists()]
                hint = f"; did you mean {found[0]}?" if found else ""
            raise ResultNotFoundError(f"no result at {path}{hint}")
        if path.suffix not in (".parquet", ".csv"):
            raise ResultError(f"{path}: a result is a .parquet or .csv file")
        try:
            frame = pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
        except (OSError, ValueError, UnicodeDecodeError) as err:  # truncated parquet, binary CSV, empty file
            raise ResultError(f"{path}: not a readable result table ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else 'no detail'})") from err
        side = sidecar_path(path)
        try:
            meta = json.loads(side.read_text(encoding="utf-8")) if side.exists() else {}
        except (OSError, ValueError) as err:
            raise ResultError(f"{side}: the provenance sidecar is not valid JSON ({err}); delete or repair it "
                              "to read the table alone") from err
        try:
            check_meta(meta)
        except ResultError as err:
            raise ResultError(f"{side}: a malformed provenance sidecar: {err}; delete or repair it to read the "
                              "table alone") from None
        try:
            return cls(frame, meta)
        except ResultError as err:
            raise ResultError(f"{path}: {err}") from None

    @classmethod
    def concat(cls, results: Iterable["Result"]) -> "Result":
        """Stack several runs into one result for plotting; provenance goes to ``meta['runs']``.

        Runs may differ in blocks, heads and metrics. Each model may come from one result only.

        Raises:
            ResultError: no results, or a model name in more than one of them (its rows would be averaged
                together by every plot).
        """
        results = list(results)
        if not results:
            raise ResultError("nothing to concatenate")
        seen: dict[str, int] = {}
        for i, r in enumerate(results):
            for model in r.models:
                if model in seen:
                    raise ResultError(f"model {model!r} is in results {seen[model]} and {i}: give the runs "
                                      "distinct names (attention_stats(..., model_name=...), or set "
                                      "result.frame['model'])")
                seen[model] = i
        runs: list[dict[str, Any]] = []
        for r in results:
            runs.extend(r.meta.get("runs", [r.meta]))
        frame = pd.concat([r.frame for r in results], ignore_index=True)
        return cls(frame, {"runs": runs})


class _BadValue(ResultError):
    """A value outside its column's range (a :class:`ResultError` that is not a type error)."""


def _check_values(frame: pd.DataFrame) -> None:
    """Refuse values no statistics run writes: a ``block`` or ``head`` that is not a whole number in
    ``0 ..`` :data:`MAX_INDEX`, a negative or fractional ``count``, an infinite ``mean`` or ``std`` or a negative
    ``std`` (NaN is a missing statistic, kept).

    Raises:
        _BadValue: naming the column, the value and its row.
        TypeError, ValueError: a column that is not numeric.
    """
    for column in ("block", "head", "count", "mean", "std"):
        values = pd.to_numeric(frame[column]).astype("float64").to_numpy()
        if column in ("mean", "std"):
            bad = np.isinf(values) | ((values < 0) if column == "std" else False)
            rule = "a finite number or NaN (missing)" + (" >= 0" if column == "std" else "")
        else:
            top = MAX_INDEX if column != "count" else np.inf
            bad = ~np.isfinite(values) | (values != np.round(values)) | (values < 0) | (values > top)
            rule = f"a whole number in 0..{MAX_INDEX}" if column != "count" else "a whole number >= 0"
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            value = frame[column].iloc[row]
            raise _BadValue(f"result table: {column} must be {rule}, got {getattr(value, 'item', lambda: value)()!r} "
                            f"(row {row + 1} of {len(frame)})")


_META_TEXT = ("model", "preset", "label", "method", "family", "size", "arch")
"""Provenance keys the plots read as text."""


def check_meta(meta: Any) -> None:
    """Refuse provenance of a shape no attnflow run writes, in the keys the plots and ``attnflow run`` read
    (``runs`` a list of objects; ``model``, ``preset``, ``label``, ``method``, ``family``, ``size`` text;
    ``random_init`` true/false; ``n_patches`` a positive integer; ``img_size`` and ``patch_size`` positive
    integers or pairs of them; ``grid`` a pair; ``analysis_key`` an object). ``null`` is accepted for each.

    Raises:
        ResultError: naming the key and its value.
    """
    if not isinstance(meta, dict):
        raise ResultError(f"it holds a JSON {type(meta).__name__}, not an object")
    runs = meta.get("runs")
    if "runs" in meta and not (isinstance(runs, list) and all(isinstance(r, dict) for r in runs)):
        raise ResultError(f"runs must be a list of objects, got {runs!r:.80}")
    for i, run in enumerate(runs if isinstance(runs, list) else [meta]):
        where = f"runs[{i}]." if "runs" in meta else ""

        def refuse(key: str, rule: str) -> ResultError:
            return ResultError(f"{where}{key} must be {rule}, got {run[key]!r:.80}")

        for key in _META_TEXT:
            if run.get(key) is not None and not isinstance(run[key], str):
                raise refuse(key, "text")
        if run.get("random_init") is not None and not isinstance(run["random_init"], bool):
            raise refuse("random_init", "true or false")
        if run.get("analysis_key") is not None and not isinstance(run["analysis_key"], dict):
            raise refuse("analysis_key", "an object")
        for key, pair in (("n_patches", False), ("img_size", True), ("patch_size", True), ("grid", True)):
            value = run.get(key)
            if value is None:
                continue
            items = value if pair and isinstance(value, list) and len(value) == 2 else [value]
            if key == "grid" and not isinstance(value, list):
                items = [None]
            if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in items):
                raise refuse(key, "a pair of positive integers" if key == "grid" else
                             "a positive integer" + (" or a pair of them" if pair else ""))


def write_table(path: str | Path, frame: pd.DataFrame, meta: dict[str, Any] | None = None, *,
                extra: dict[str, pd.DataFrame] | None = None) -> Path:
    """The one writer of result tables: ``STEM.parquet``, ``STEM.csv``, the ``STEM.json`` provenance sidecar (with
    ``meta``) and each ``extra`` table as ``NAME.parquet`` / ``NAME.csv`` beside them.

    Every file is written under a temporary name and moved into place only when all are complete (the main
    parquet last: it marks a complete result), so a failure (a full disk, Ctrl-C) leaves the previous files, or
    none, never a truncated or mixed set.

    Args:
        path: the main table; a ``.csv`` or missing suffix names the same stem's ``.parquet``.
        frame: the main table.
        meta: provenance (numpy scalars, paths and tuples are converted); ``None``: no sidecar.
        extra: more tables, by file stem, written into the same folder.

    Returns:
        The main parquet path.
    """
    path = Path(path)
    parquet = path.with_suffix(".parquet") if path.suffix in (".parquet", ".csv") else \
        path.with_name(path.name + ".parquet")
    parquet.parent.mkdir(parents=True, exist_ok=True)
    tables = {parquet.with_name(stem + ".parquet"): table for stem, table in (extra or {}).items()}
    writers: dict[Path, Callable[[Path], Any]] = {}
    for table_path, table in [*tables.items(), (parquet, frame)]:
        writers[table_path.with_suffix(".csv")] = functools.partial(_to_csv, table)
        if table_path != parquet:
            writers[table_path] = functools.partial(_to_parquet, table)
    if meta is not None:
        writers[sidecar_path(parquet)] = functools.partial(_to_json, meta)
    writers[parquet] = functools.partial(_to_parquet, frame)  # last
    write_atomically(writers)
    return parquet


def _to_csv(frame: pd.DataFrame, path: Path) -> None:
    frame.to_csv(path, index=False)


def _to_parquet(frame: pd.DataFrame, path: Path) -> None:
    frame.to_parquet(path, index=False)


def _to_json(meta: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(_jsonable(meta), indent=2, sort_keys=True, default=str))


def _jsonable(obj: Any) -> Any:
    """Convert numpy scalars, paths and tuples so that ``json.dumps`` accepts them."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
