"""Model zoo: presets of the paper's models and loaders for their official checkpoint formats.

``load_model``, ``weights_cached``, ``CheckpointError`` and ``WeightsUnavailableError`` are imported lazily
(they pull in timm), so importing the registry stays cheap.
"""

from __future__ import annotations

from .._lazy import lazy_getattr
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

__getattr__ = lazy_getattr(__name__, _LAZY)
