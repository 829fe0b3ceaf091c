"""Model zoo: presets of the paper's models and loaders for their official checkpoint formats.

``load_model``, ``weights_cached``, ``CheckpointError`` and ``WeightsUnavailableError`` are imported lazily
(they pull in timm), so importing the registry stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from .registry import FAMILIES, ModelSpec, UnknownModelError, find_spec, get_spec, list_specs, register

_LAZY: dict[str, str] = {
    "load_model": "attnflow.models.load",
    "weights_cached": "attnflow.models.load",
    "sha256_file": "attnflow.models.load",
    "WeightsUnavailableError": "attnflow.models.load",
    "CheckpointError": "attnflow.models.converters",
    "CONVERTERS": "attnflow.models.converters",
}

__all__ = ["FAMILIES", "ModelSpec", "UnknownModelError", "find_spec", "get_spec", "list_specs", "register",
           *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'attnflow.models' has no attribute {name!r}")
