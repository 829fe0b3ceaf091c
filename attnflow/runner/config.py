"""Analysis configs: one small TOML file per paper figure (see ``analyses/README.md`` for the schema).

A config names the models (preset or timm architecture, optional checkpoint), the dataset and resolution, the
run directory that caches results, and the figures to render. :func:`load_config` reads and validates a file;
every problem is one :class:`ConfigError` line that names the file, the key and, for a typo, close matches.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover  (Python 3.10)
    import tomli as tomllib

from ..errors import AttnflowError
from ..limits import DECODES, OptionError, check_crop_pct, check_dpi, check_figure_width, check_img_size, check_workers

FIGURE_KINDS: dict[str, str] = {
    "set": "the standard per-block set: NAME-metrics (one panel per metric) and NAME-<metric> per metric "
           "(+ NAME-sizes when several sizes, + NAME-heads-<metric> with per_head)",
    "panel": "one figure, one panel per metric",
    "metric": "one single-column figure of one metric (the paper's Figs. 3-6)",
    "sizes": "grid over model sizes, rows = metrics, columns = ViT-S/B/L (the paper's Figs. 10-13)",
    "heads": "block x head heatmaps, one file NAME-<metric> per metric",
    "maps": "per-image attention maps of the last block (the paper's Fig. 9)",
}
"""Figure kinds a config may ask for, with what each writes."""

_TOP_KEYS = {"name", "title", "run_dir", "figures_dir", "data", "defaults", "models", "figures", "notes"}
_DATA_KEYS = {"root", "img_size", "crop_pct", "limit", "batch_size", "amp", "workers", "checkpoint_every",
              "expected_images", "decode"}
_DEFAULT_KEYS = {"model_kw", "checkpoint_key", "random_init"}
_MODEL_KEYS = {"name", "id", "checkpoint", "checkpoint_key", "random_init", "model_kw", "notes", "label", "method",
               "family", "size"}
_FIGURE_KEYS = {"name", "kind", "paper", "title", "models", "metrics", "band", "formats", "per_head", "by_size",
                "dpi", "width", "images", "limit", "kinds", "rows", "overlay", "block"}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(AttnflowError):
    """An analysis config that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class ModelEntry:
    """One model of an analysis.

    Attributes:
        name: preset (``attnflow models``) or timm architecture.
        id: the ``model`` column of its results and its legend key (default: ``name``).
        checkpoint: local weights file, or ``None`` for the preset's official weights (cache or download).
        checkpoint_key: top-level key of the checkpoint holding the weights, when not the format's default.
        random_init: build without weights (numbers are meaningless; for smoke tests).
        model_kw: ``timm.create_model`` overrides (e.g. ``{"depth": 2}`` in tests).
        notes: free text shown by a dry run.
        display: ``label``, ``method``, ``family``, ``size`` for models that are not presets (e.g. your own
            MAE ViT-S checkpoint loaded into ``vit_small_patch16_224``); stored in the result's provenance,
            where the plots look them up.
    """

    name: str
    id: str
    checkpoint: Path | None = None
    checkpoint_key: str | None = None
    random_init: bool = False
    model_kw: Mapping[str, Any] = field(default_factory=dict)
    notes: str | None = None
    display: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class FigureEntry:
    """One output figure (see :data:`FIGURE_KINDS`); files are ``figures_dir/NAME[-part].EXT``."""

    name: str
    kind: str
    paper: str | None = None
    title: str | None = None
    models: tuple[str, ...] | None = None
    metrics: tuple[str, ...] | None = None
    band: str = "heads"
    formats: tuple[str, ...] = ("pdf", "png")  # maps figures default to ("png",)
    per_head: bool = False
    by_size: bool | None = None
    dpi: int = 200
    width: float | None = None
    images: Path | None = None
    limit: int = 4
    kinds: tuple[str, ...] | None = None
    rows: str = "images"
    overlay: bool = True
    block: int | None = None


@dataclass(frozen=True)
class AnalysisConfig:
    """A parsed analysis config (paths resolved against the current directory, ``${VAR:-default}`` expanded).

    Attributes:
        name: short name (default: the file stem).
        title: one line for the printed plan.
        source: the TOML file, or ``None`` for configs built in code (``attnflow demo``).
        data_root: image folder (recursive), ``None`` when no statistics are needed.
        img_size, crop_pct: model input (``crop_pct=None``: each model's own; the presets use 0.875).
        limit: evenly spaced subset of the folder (``None``: every image).
        batch_size, amp, workers, checkpoint_every, decode: passed to :func:`attnflow.attention_stats`.
        expected_images: number of images the paper used; a warning is printed when the folder differs.
        run_dir: where results (``run_dir/stats``) are cached.
        figures_dir: where figures go (default ``run_dir/figures``).
        models, figures: the entries, in file order.
        notes: free text printed with the plan.
    """

    name: str
    title: str
    source: Path | None
    data_root: Path | None
    img_size: int
    crop_pct: float | None
    limit: int | None
    batch_size: int
    amp: str
    workers: int | None
    checkpoint_every: int
    expected_images: int | None
    run_dir: Path
    figures_dir: Path
    models: tuple[ModelEntry, ...]
    figures: tuple[FigureEntry, ...]
    notes: str | None = None
    decode: str = "auto"

    def model(self, model_id: str) -> ModelEntry:
        """The entry with id ``model_id``."""
        for entry in self.models:
            if entry.id == model_id:
                return entry
        raise KeyError(model_id)

    def stats_models(self) -> list[ModelEntry]:
        """Models whose statistics some figure needs (every model when the config has no figures)."""
        stat_figs = [f for f in self.figures if f.kind != "maps"]
        if not self.figures:
            return list(self.models)
        wanted = {m for f in stat_figs for m in (f.models or [e.id for e in self.models])}
        return [e for e in self.models if e.id in wanted]

    def with_overrides(self, *, data: str | Path | None = None, run_dir: str | Path | None = None,
                       limit: int | None = None, random_init: bool = False,
                       batch_size: int | None = None, workers: int | None = None,
                       decode: str | None = None) -> "AnalysisConfig":
        """A copy with a run's overrides applied (``data``, ``run_dir``, ``limit``, ...), as ``attnflow run`` gives."""
        out = self
        if data is not None:
            out = replace(out, data_root=_path(str(data)))
        if run_dir is not None:
            new_run = _path(str(run_dir))
            figs = out.figures_dir
            if figs == out.run_dir / "figures":
                figs = new_run / "figures"
            out = replace(out, run_dir=new_run, figures_dir=figs)
        if limit is not None:
            if limit <= 0:
                raise ConfigError(f"limit must be positive, got {limit}")
            out = replace(out, limit=limit)
        if random_init:
            out = replace(out, models=tuple(replace(m, random_init=True, checkpoint=None) for m in out.models))
        if batch_size is not None:
            out = replace(out, batch_size=batch_size)
        if workers is not None:
            check_workers(workers)
            out = replace(out, workers=workers)
        if decode is not None:
            out = replace(out, decode=_decode(decode))
        return out


# ------------------------------------------------------------------------------------------------ parsing

def expand(text: str, where: str) -> str:
    """Expand ``~``, ``${VAR}`` and ``${VAR:-default}`` in a path string.

    Raises:
        ConfigError: ``${VAR}`` without a default and ``VAR`` unset.
    """
    def sub(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name)
        if value:
            return value
        if default is not None:
            return default
        raise ConfigError(f"{where}: environment variable {name} is not set (set it, or pass the path on the "
                          "command line)")

    return os.path.expanduser(_VAR.sub(sub, text))


def _path(text: str, where: str = "path") -> Path:
    return Path(expand(text, where))


def _check_keys(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else f" (allowed: {', '.join(sorted(allowed))})"
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")


def _get(table: Mapping[str, Any], key: str, types: type | tuple[type, ...], where: str, default: Any = None) -> Any:
    value = table.get(key, default)
    if value is None:
        return None
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        names = "/".join(t.__name__ for t in types)
        raise ConfigError(f"{where}: {key} must be of type {names}, got {value!r}")
    return value


def _checked(check: Any, value: Any, key: str, where: str) -> Any:
    """``value`` when the option rule ``check`` (:mod:`attnflow.limits`, the same as the command line's and the
    Python API's) accepts it."""
    try:
        check(value, name=key)
    except OptionError as err:
        raise ConfigError(f"{where}: {err}") from None
    return value


def _decode(value: str, where: str = "") -> str:
    """``value`` when it is a decode word (:data:`attnflow.limits.DECODES`)."""
    if value not in DECODES:
        raise ConfigError(f"{where}decode must be {', '.join(DECODES[:-1])} or {DECODES[-1]}, got {value!r}")
    return value


def _str_list(table: Mapping[str, Any], key: str, where: str) -> tuple[str, ...] | None:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or not value:
        raise ConfigError(f"{where}: {key} must be a non-empty list of strings, got {value!r}")
    return tuple(value)


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else f" (choose from {', '.join(choices)})"


def _model_known(name: str) -> bool:
    from ..models.load import known_arch
    from ..models.registry import find_spec

    return find_spec(name) is not None or known_arch(name)


def _parse_model(raw: Any, i: int, defaults: Mapping[str, Any], where: str) -> ModelEntry:
    w = f"{where}: models[{i}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{w} must be a table ([[models]])")
    _check_keys(raw, _MODEL_KEYS, w)
    name = _get(raw, "name", str, w)
    if not name:
        raise ConfigError(f"{w}: name (a preset or timm architecture) is required")
    if not _model_known(name):
        from ..models.registry import list_specs

        raise ConfigError(f"{w}: unknown model {name!r}{_suggest(name, [s.name for s in list_specs()])} "
                          "(`attnflow models` lists the presets)")
    checkpoint = _get(raw, "checkpoint", str, w)
    random_init = bool(_get(raw, "random_init", bool, w, defaults.get("random_init", False)))
    if checkpoint and random_init:
        raise ConfigError(f"{w}: checkpoint and random_init exclude each other")
    kw = {**(defaults.get("model_kw") or {}), **(_get(raw, "model_kw", dict, w) or {})}
    display = {k: _get(raw, k, str, w) for k in ("label", "method", "family", "size") if k in raw}
    from ..models.registry import FAMILIES

    if display.get("family") not in (None, *FAMILIES):
        raise ConfigError(f"{w}: family must be one of {', '.join(FAMILIES)}, got {display['family']!r}")
    return ModelEntry(name=name, id=_get(raw, "id", str, w) or name,
                      checkpoint=_path(checkpoint, f"{w}: checkpoint") if checkpoint else None,
                      checkpoint_key=_get(raw, "checkpoint_key", str, w, defaults.get("checkpoint_key")),
                      random_init=random_init, model_kw=kw, notes=_get(raw, "notes", str, w),
                      display=display)


def _parse_figure(raw: Any, i: int, model_ids: list[str], where: str) -> FigureEntry:
    from ..metrics import METRICS
    from ..plot.blocks import BANDS
    from ..maps import KINDS
    from ..plot.style import SAVE_FORMATS

    w = f"{where}: figures[{i}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{w} must be a table ([[figures]])")
    _check_keys(raw, _FIGURE_KEYS, w)
    name, kind = _get(raw, "name", str, w), _get(raw, "kind", str, w, "set")
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"{w}: name must be a plain file stem such as 'fig3', got {name!r}")
    w = f"{where}: figure {name!r}"
    if kind not in FIGURE_KINDS:
        raise ConfigError(f"{w}: unknown kind {kind!r}{_suggest(kind, list(FIGURE_KINDS))}")
    models = _str_list(raw, "models", w)
    for m in models or ():
        if m not in model_ids:
            raise ConfigError(f"{w}: model {m!r} is not among the config's models{_suggest(m, model_ids)}")
    metrics = _str_list(raw, "metrics", w)
    for m in metrics or ():
        if m not in METRICS:
            raise ConfigError(f"{w}: unknown metric {m!r}{_suggest(m, list(METRICS))}")
    if kind == "metric" and (not metrics or len(metrics) != 1):
        raise ConfigError(f"{w}: kind 'metric' needs exactly one metric (metrics = [\"cls_self\"])")
    band = _get(raw, "band", str, w, "heads")
    if band not in BANDS:
        raise ConfigError(f"{w}: unknown band {band!r}{_suggest(band, list(BANDS))}")
    formats = _str_list(raw, "formats", w) or (("png",) if kind == "maps" else ("pdf", "png"))
    for f in formats:
        if f.lstrip(".").lower() not in SAVE_FORMATS:
            raise ConfigError(f"{w}: unknown format {f!r}{_suggest(f, list(SAVE_FORMATS))}")
    kinds = _str_list(raw, "kinds", w)
    for k in kinds or ():
        if k not in KINDS and not re.fullmatch(r"cls_head:\d+", k):
            raise ConfigError(f"{w}: unknown map kind {k!r}{_suggest(k, list(KINDS))} or cls_head:H")
    rows = _get(raw, "rows", str, w, "images")
    if rows not in ("images", "models"):
        raise ConfigError(f"{w}: rows must be 'images' or 'models', got {rows!r}")
    limit = _get(raw, "limit", int, w, 4)
    if limit <= 0:
        raise ConfigError(f"{w}: limit must be positive, got {limit}")
    images = _get(raw, "images", str, w)
    width = _checked(check_figure_width, _get(raw, "width", (int, float), w), "width", w)
    dpi = _checked(check_dpi, _get(raw, "dpi", int, w, 200), "dpi", w)
    return FigureEntry(
        name=name, kind=kind, paper=_get(raw, "paper", str, w), title=_get(raw, "title", str, w), models=models,
        metrics=metrics, band=band, formats=tuple(f.lstrip(".").lower() for f in formats),
        per_head=bool(_get(raw, "per_head", bool, w, False)), by_size=_get(raw, "by_size", bool, w),
        dpi=dpi, width=float(width) if width is not None else None,
        images=_path(images, f"{w}: images") if images else None, limit=limit, kinds=kinds, rows=rows,
        overlay=bool(_get(raw, "overlay", bool, w, True)), block=_get(raw, "block", int, w))


def parse_config(raw: Mapping[str, Any], *, source: Path | None = None, name: str | None = None) -> AnalysisConfig:
    """Validate a config given as a dict (the parsed TOML); see :func:`load_config`."""
    where = str(source) if source else "config"
    _check_keys(raw, _TOP_KEYS, where)
    data = raw.get("data", {})
    defaults = raw.get("defaults", {})
    for table, keys, label in ((data, _DATA_KEYS, "[data]"), (defaults, _DEFAULT_KEYS, "[defaults]")):
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: {label} must be a table")
        _check_keys(table, keys, f"{where}: {label}")
    _get(defaults, "model_kw", dict, f"{where}: [defaults]")
    w = f"{where}: [data]"
    root = _get(data, "root", str, w)
    limit = _get(data, "limit", int, w)
    if limit is not None and limit <= 0:
        raise ConfigError(f"{w}: limit must be positive, got {limit}")
    crop = _checked(check_crop_pct, _get(data, "crop_pct", (int, float), w), "crop_pct", w)
    img_size = _checked(check_img_size, _get(data, "img_size", int, w, 224), "img_size", w)
    workers = _checked(check_workers, _get(data, "workers", int, w), "workers", w)
    amp = _get(data, "amp", str, w, "auto")
    decode = _get(data, "decode", str, w, "auto")
    _decode(decode, f"{w}: ")
    if amp not in ("auto", "bf16", "fp16", "fp32"):
        raise ConfigError(f"{w}: amp must be auto, bf16, fp16 or fp32, got {amp!r}")
    raw_models = raw.get("models", [])
    if not isinstance(raw_models, list) or not raw_models:
        raise ConfigError(f"{where}: at least one [[models]] entry is required")
    models = tuple(_parse_model(m, i, defaults, where) for i, m in enumerate(raw_models))
    ids = [m.id for m in models]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ConfigError(f"{where}: model {dup[0]!r} appears twice; give one of them a distinct id = \"...\"")
    raw_figs = raw.get("figures", [])
    if not isinstance(raw_figs, list):
        raise ConfigError(f"{where}: figures must be an array of tables ([[figures]])")
    figures = tuple(_parse_figure(f, i, ids, where) for i, f in enumerate(raw_figs))
    names = [f.name for f in figures]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: two figures share a name; names become file names and must differ")
    cfg_name = _get(raw, "name", str, where) or name or (source.stem if source else "analysis")
    run_dir = _path(_get(raw, "run_dir", str, where) or f"runs/{cfg_name}", f"{where}: run_dir")
    figures_dir = _get(raw, "figures_dir", str, where)
    return AnalysisConfig(
        name=cfg_name, title=_get(raw, "title", str, where) or cfg_name, source=source,
        data_root=_path(root, f"{w}: root") if root else None, img_size=img_size,
        crop_pct=float(crop) if crop is not None else None, limit=limit,
        batch_size=_get(data, "batch_size", int, w, 64), amp=amp, workers=workers,
        checkpoint_every=_get(data, "checkpoint_every", int, w, 50),
        expected_images=_get(data, "expected_images", int, w), run_dir=run_dir,
        figures_dir=_path(figures_dir, f"{where}: figures_dir") if figures_dir else run_dir / "figures",
        models=models, figures=figures, notes=_get(raw, "notes", str, where), decode=decode)


def load_config(path: str | Path) -> AnalysisConfig:
    """Read and validate an analysis config (TOML).

    Raises:
        ConfigError: missing file, not UTF-8 text, TOML syntax error, unknown key/model/metric (with close matches),
            wrong type, a value outside its option's limits (:mod:`attnflow.limits`).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file (the shipped ones are in analyses/)")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {err.object[err.start]:#04x} at offset {err.start}); "
                          "a TOML config is UTF-8 text") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    return parse_config(raw, source=path)
