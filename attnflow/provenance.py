"""Provenance recorded in every result's JSON sidecar: what model, which weights, which software."""

from __future__ import annotations

import datetime as _dt
import hashlib
import functools
import platform
from importlib import metadata
from typing import Any

import torch
import torch.nn as nn

from .models.record import model_record

_PACKAGES = ("attnflow", "torch", "torchvision", "timm", "numpy", "pandas")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages a result depends on (``None`` when missing) and Python's."""
    return dict(_package_versions())


@functools.lru_cache(maxsize=1)
def _package_versions() -> dict[str, str | None]:
    """Read once per process: reading package metadata takes milliseconds, and it does not change."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run_name(model: nn.Module, given: str | None = None) -> str:
    """The ``model`` column of a result: ``given``, else the preset, else the timm architecture, else the class
    name."""
    record = model_record(model)
    return given or record.preset or record.arch


def run_provenance(model: nn.Module, name: str) -> dict[str, Any]:
    """Model preset, architecture, architecture overrides (``model_kw``), checkpoint path, key and sha256, software
    versions and a UTC timestamp."""
    record = model_record(model)
    return {
        "model": name,
        "preset": record.preset,
        "arch": record.arch,
        "checkpoint": record.checkpoint,
        "checkpoint_sha256": record.sha256,
        "weights_source": record.source,
        "random_init": record.random_init if record.known else None,
        "seed_name": record.seed_name,
        "model_kw": record.model_kw,
        "checkpoint_key": record.checkpoint_key,
        "versions": package_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def weights_fingerprint(model: nn.Module, samples: int = 256) -> str:
    """A short hash of a model's architecture and weights, the same on any device.

    It covers every state-dict entry's name, shape and dtype, and the exact bytes of up to ``samples`` evenly
    strided values of each entry, so two models of one name but another ``model_kw``, ``checkpoint_key``
    or weights file differ (at a cost of a few small host copies, not a pass over the weights).
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        picked = flat[::max(1, flat.numel() // samples)][:samples].cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(picked.view(torch.uint8).numpy().tobytes() if picked.numel() else b"")
    return digest.hexdigest()[:16]
