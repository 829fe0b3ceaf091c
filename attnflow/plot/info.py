"""What a plot needs to know about a model: label, family, size, colour, marker, number of patches.

Every fact is looked up in this order: the model preset (:func:`attnflow.models.find_spec`, by the model
column's name or by the run's ``meta["preset"]``), then the run's provenance (``Result.run_meta``: keys
``family``, ``method``, ``size``, ``label``, ``n_patches``, ``img_size``, ``patch_size``), then the model name
itself (``vit-b16`` -> size B), then a neutral default (family ``"other"``).

Colours are a pure function of (family, method or name), never of which other models share the figure, so
the same model has the same colour in every figure. Families get separate hues: MIM reds/oranges, JEA
blues/greens, fine-tuned MIM purples, anything else greys.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import pandas as pd

from ..result import Result
from .style import PlotError

FAMILY_PALETTES: dict[str, tuple[str, ...]] = {
    "MIM": ("#d62728", "#ff7f0e", "#8c564b", "#e377c2", "#b8860b", "#f4a582", "#ffbb78", "#7b1e1e"),
    "JEA": ("#1f77b4", "#2ca02c", "#17becf", "#393b79", "#6b6ecf", "#6baed6", "#74a84a", "#98df8a"),
    "MIM+FT": ("#9467bd", "#5e3c99", "#c51b7d", "#b39ddb"),
    "other": ("#7f7f7f", "#404040", "#bcbd22", "#a0a0a0"),
}
"""Colours each family draws from; a model's colour always comes from its family's palette."""

FAMILY_MARKERS: dict[str, str] = {"MIM": "o", "JEA": "s", "MIM+FT": "^", "other": "D"}
"""Line markers per family, so that families differ in grey-scale print too."""

_METHOD_COLOURS: dict[tuple[str, str], str] = {
    ("MIM", "mae"): "#d62728", ("MIM", "beitv2"): "#ff7f0e", ("MIM", "simmim"): "#8c564b",
    ("MIM", "ijepa"): "#e377c2", ("MIM", "maskfeat"): "#b8860b", ("MIM", "capi"): "#f4a582",
    ("MIM", "beit"): "#ffbb78", ("MIM", "data2vec"): "#7b1e1e",
    ("JEA", "dino"): "#1f77b4", ("JEA", "mocov3"): "#2ca02c", ("JEA", "ibot"): "#17becf",
    ("JEA", "dinov2"): "#393b79", ("JEA", "dinov2reg4"): "#6b6ecf", ("JEA", "msn"): "#6baed6",
    ("JEA", "ijepa"): "#74a84a",
    ("MIM+FT", "mae"): "#9467bd", ("MIM+FT", "maeft"): "#9467bd", ("MIM+FT", "beitv2"): "#5e3c99",
    ("MIM+FT", "beitv2ft"): "#5e3c99",
    ("other", "deit"): "#7f7f7f", ("other", "supervised"): "#404040",
}
"""Fixed colours of the paper's methods (keys: family, method lower-cased without punctuation)."""

SIZE_ORDER: tuple[str, ...] = ("Ti", "S", "B", "L", "H", "g", "?")
"""Order of model sizes in grids."""

_SIZE_WORDS = {"tiny": "Ti", "ti": "Ti", "small": "S", "s": "S", "base": "B", "b": "B", "large": "L",
               "l": "L", "huge": "H", "h": "H", "giant": "g", "g": "g"}
_SIZE_RE = re.compile(r"vit[-_/]?(tiny|small|base|large|huge|giant|ti|s|b|l|h|g)(?=\d|[-_/.]|$)", re.I)

DataLike = Union[Result, pd.DataFrame, str, Path, Sequence[Union[Result, str, Path]]]
"""What plot functions accept: a Result, a tidy DataFrame, result file paths, or a list of those."""


@dataclass(frozen=True)
class ModelInfo:
    """Display facts of one model of a result.

    Attributes:
        name: the ``model`` column value.
        label: legend text (preset label, ``meta["label"]`` or the name).
        method: pre-training method (``"MAE"``), or the name when unknown; models of the same method share
            a colour and, in size grids, a legend entry.
        family: ``"MIM"``, ``"JEA"``, ``"MIM+FT"`` or ``"other"``.
        size: ``"S"``, ``"B"``, ``"L"``, ... or ``"?"``.
        n_patches: number of patch tokens of the run, or ``None`` when the provenance does not say.
        color: matplotlib colour.
        marker: matplotlib marker.
    """

    name: str
    label: str
    method: str
    family: str
    size: str
    n_patches: int | None
    color: str
    marker: str


def as_result(data: DataLike) -> Result:
    """Normalise plot input to one :class:`Result` (file paths are read, lists concatenated)."""
    if isinstance(data, Result):
        return data
    if isinstance(data, pd.DataFrame):
        return Result(data, {})
    if isinstance(data, (str, Path)):
        return Result.read(data)
    items = list(data)
    if not items:
        raise PlotError("nothing to plot: no results given")
    return Result.concat(r if isinstance(r, Result) else Result.read(r) for r in items)


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def color_for(family: str, key: str) -> str:
    """Stable colour of a model: a fixed colour for known methods, else a hash of ``key`` into the family's
    palette."""
    family = family if family in FAMILY_PALETTES else "other"
    fixed = _METHOD_COLOURS.get((family, _norm(key)))
    if fixed:
        return fixed
    palette = FAMILY_PALETTES[family]
    return palette[zlib.crc32(_norm(key).encode()) % len(palette)]


def size_from_name(name: str) -> str:
    """Model size parsed from a name such as ``mae-vit-b16`` or ``vit_large_patch16_224`` (``"?"`` if none)."""
    match = _SIZE_RE.search(name)
    return _SIZE_WORDS[match.group(1).lower()] if match else "?"


def n_patches_from_meta(meta: dict[str, Any]) -> int | None:
    """``meta["n_patches"]``, else ``(img_size / patch_size)`` squared from the provenance, else ``None``."""
    if meta.get("n_patches"):
        return int(meta["n_patches"])
    img, patch = meta.get("img_size"), meta.get("patch_size")
    if img and patch:
        img = img if isinstance(img, (list, tuple)) else (img, img)
        patch = patch if isinstance(patch, (list, tuple)) else (patch, patch)
        return int(img[0] // patch[0]) * int(img[1] // patch[1])
    grid = meta.get("grid")
    if isinstance(grid, (list, tuple)) and len(grid) == 2:
        return int(grid[0]) * int(grid[1])
    return None


def model_info(result: Result, model: str) -> ModelInfo:
    """Display facts of ``model`` in ``result`` (see the module docstring for the look-up order)."""
    from ..models.registry import find_spec

    meta = result.run_meta(model)
    spec = find_spec(model) or (find_spec(meta["preset"]) if isinstance(meta.get("preset"), str) else None)
    if spec is not None:
        family, method, size, label = spec.family, spec.method, spec.size, spec.label
    else:
        family = str(meta["family"]) if meta.get("family") in FAMILY_PALETTES else "other"
        method = str(meta.get("method") or model)
        size = str(meta.get("size") or size_from_name(model))
        label = str(meta.get("label") or model)
    return ModelInfo(name=model, label=label, method=method, family=family, size=size,
                     n_patches=n_patches_from_meta(meta), color=color_for(family, method),
                     marker=FAMILY_MARKERS[family])


def random_init_models(result: Result, models: Sequence[str] | None = None) -> list[str]:
    """Models whose run's provenance says they had random weights (``meta["random_init"]``)."""
    return [m for m in (models or result.models) if result.run_meta(m).get("random_init")]


def entropy_bound(n_patches: int) -> float:
    """The largest entropy of a distribution over ``n_patches`` patches: ln(N) (5.278 for 196)."""
    return math.log(n_patches)
