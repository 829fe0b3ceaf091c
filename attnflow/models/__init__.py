"""Model zoo: presets of the paper's models and loaders for their official checkpoint formats."""

from .registry import FAMILIES, ModelSpec, UnknownModelError, find_spec, get_spec, list_specs, register

__all__ = ["FAMILIES", "ModelSpec", "UnknownModelError", "find_spec", "get_spec", "list_specs", "register"]
