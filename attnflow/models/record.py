"""The model-info record: where a model's weights came from, as :func:`attnflow.load_model` records it on the model
it builds (``model.attnflow_info``), read with :func:`model_record` (typed fields, never string keys)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

ATTRIBUTE = "attnflow_info"
"""The model attribute that holds its :class:`ModelRecord` (a plain attribute: not a parameter or sub-module)."""


@dataclass(frozen=True)
class ModelRecord:
    """Where a model's weights came from.

    Attributes:
        arch: the timm architecture (or the class name of a model attnflow did not build).
        preset: the attnflow preset (``None`` for a plain timm name).
        checkpoint: the weights file.
        sha256: its sha256.
        source: ``"file"``, a hub or cache location, or ``"random-init"``.
        random_init: built without weights.
        seed_name: the run name that seeded the random weights.
        img_size: the input size the model was built at.
        has_cls: whether it has a [cls] token.
        converter: the checkpoint converter used.
        family: the preset's family (``MIM``, ``JEA``, ``MIM+FT``, ``other``).
        label: the display name.
        model_kw: the ``timm.create_model`` overrides it was built with.
        checkpoint_key: the top-level key of the weights in the checkpoint, when not the format's default.
        known: ``False`` for a model not built by :func:`attnflow.load_model` (only ``arch`` is known then).
    """

    arch: str
    preset: str | None = None
    checkpoint: str | None = None
    sha256: str | None = None
    source: str | None = None
    random_init: bool = False
    seed_name: str | None = None
    img_size: int | None = None
    has_cls: bool | None = None
    converter: str | None = None
    family: str = "other"
    label: str | None = None
    model_kw: dict[str, Any] = field(default_factory=dict)
    checkpoint_key: str | None = None
    known: bool = True

    def to_dict(self) -> dict[str, Any]:
        """The record as plain values (for sidecars)."""
        return dataclasses.asdict(self)


def plain_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` for :attr:`ModelRecord.model_kw`: scalars and ``None`` as they are, any other value as its
    ``repr`` (so the record stays JSON-serialisable)."""
    return {k: v if isinstance(v, (bool, int, float, str, type(None))) else repr(v) for k, v in kwargs.items()}


def model_record(model: nn.Module) -> ModelRecord:
    """The :class:`ModelRecord` of ``model``; for a model attnflow did not build, one with only its architecture
    (timm's ``pretrained_cfg``, else the class name) and ``known=False``."""
    record = getattr(model, ATTRIBUTE, None)
    if isinstance(record, ModelRecord):
        return record
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return ModelRecord(arch=cfg.get("architecture") or type(model).__name__, source=None, known=False)
