"""The model zoo registry: one :class:`ModelSpec` per preset of the paper's models.

Presets are registered explicitly (``register(ModelSpec(...))`` in :mod:`attnflow.models.presets`); there are
no ``module.__dict__`` look-ups. Any timm architecture name that is not a preset also works wherever a model
name is accepted (see :func:`attnflow.models.load_model`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from ..errors import AttnflowError

FAMILIES: tuple[str, ...] = ("MIM", "JEA", "MIM+FT", "other")
"""Pre-training paradigm of a preset; plots colour models by it."""

POS_RESAMPLE: tuple[str, ...] = ("timm", "dinov2")
"""How a checkpoint's position table is resampled to the run's patch grid (``ModelSpec.pos_resample``)."""


class UnknownModelError(AttnflowError, KeyError):
    """Raised for a model name that is neither a preset nor a timm architecture; the message suggests names."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class ModelSpec:
    """One pretrained model of the zoo.

    Attributes:
        name: preset name used on the command line, e.g. ``"mae-vit-b16"``.
        arch: timm architecture the weights are loaded into, e.g. ``"vit_base_patch16_224"``.
        arch_kwargs: extra ``timm.create_model`` kwargs (e.g. ``{"num_heads": 12}`` for MoCo-v3 ViT-S).
        method: pre-training method for labels and legends, e.g. ``"MAE"``, ``"DINO"``, ``"MoCo-v3"``.
        family: one of :data:`FAMILIES`.
        size: ``"S"``, ``"B"``, ``"L"`` or ``"H"``.
        patch_size: patch side in pixels.
        has_cls: whether the model has a [cls] token (I-JEPA and CAPI do not).
        hub_tag: timm pretrained tag (``arch.tag``) when timm hosts the weights, else ``None``.
        url: the authors' official download URL (``None`` when there is no direct link).
        converter: name of the converter for the official file format (see ``attnflow.models.converters``).
        label: human-readable label for figures, e.g. ``"MAE ViT-B/16"``.
        notes: anything a user should know (which file variant, caveats).
        filename: name of the official file in the torch hub cache (``torch.hub.get_dir()/checkpoints/``);
            ``None`` means the last component of ``url``. Needed where several presets share a basename
            (iBOT's ``checkpoint_teacher.pth``) or the URL is a web page (SimMIM's Google Drive link).
        pos_resample: one of :data:`POS_RESAMPLE`: how the position table is resampled when the run's grid
            differs from the checkpoint's. ``"timm"``: bicubic with antialias to the grid size (timm's
            ``resample_abs_pos_embed``). ``"dinov2"``: the rule the DINOv2 models without registers apply at
            run time (bicubic without antialias, scale factor ``(grid + 0.1) / M``), so their tokens are
            those of the authors' code.
    """

    name: str
    arch: str
    method: str
    family: str
    size: str
    patch_size: int
    has_cls: bool = True
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    hub_tag: str | None = None
    url: str | None = None
    converter: str = "timm"
    label: str = ""
    notes: str = ""
    filename: str | None = None
    pos_resample: str = "timm"

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"{self.name}: family must be one of {FAMILIES}, got {self.family!r}")
        if self.pos_resample not in POS_RESAMPLE:
            raise ValueError(f"{self.name}: pos_resample must be one of {POS_RESAMPLE}, got {self.pos_resample!r}")
        if not self.label:
            object.__setattr__(self, "label", f"{self.method} ViT-{self.size}/{self.patch_size}")

    @property
    def cache_filename(self) -> str | None:
        """File name of the official checkpoint in the torch hub cache, or ``None`` without a URL."""
        if self.filename:
            return self.filename
        if not self.url:
            return None
        return self.url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add a preset to the zoo (a name may be registered once)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"model preset {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def _ensure_presets() -> None:
    from . import presets  # noqa: F401  (registers the zoo on first use)


def list_specs() -> list[ModelSpec]:
    """All registered presets, in registration order."""
    _ensure_presets()
    return list(_REGISTRY.values())


def find_spec(name: str) -> ModelSpec | None:
    """The preset called ``name``, or ``None``."""
    _ensure_presets()
    return _REGISTRY.get(name)


def close_names(name: str, candidates: list[str], n: int = 5, cutoff: float = 0.5) -> list[str]:
    """Up to ``n`` of ``candidates`` close to ``name``, best first, ignoring case (``MAE-ViT-B16`` finds
    ``mae-vit-b16``)."""
    by_lower: dict[str, str] = {}
    for candidate in candidates:
        by_lower.setdefault(candidate.lower(), candidate)
    return [by_lower[m] for m in difflib.get_close_matches(name.lower(), list(by_lower), n=n, cutoff=cutoff)]


def get_spec(name: str) -> ModelSpec:
    """The preset called ``name``.

    Raises:
        UnknownModelError: with up to five close matches among the presets.
    """
    spec = find_spec(name)
    if spec is None:
        close = close_names(name, list(_REGISTRY))
        hint = f"; did you mean {', '.join(close)}?" if close else "; run `attnflow models` to list presets"
        raise UnknownModelError(f"unknown model preset {name!r}{hint}")
    return spec
