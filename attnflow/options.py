"""The options every dataset loop shares, in one vocabulary: :class:`LoopOptions`, the precision words and the
device rule.

The same words mean the same thing, with the same defaults, in every Python entry point
(:func:`~attnflow.attention_stats`, :func:`~attnflow.aggregation.aggregation_statistics`,
:func:`~attnflow.localize.localize`, the probe) and in every command (the options ``batch_size``, ``device``,
``amp``, ``workers``, ``limit``, ``resume``, ``checkpoint_every``, spelled with dashes on the command line):

* precision (``amp``): ``auto`` (bf16 on a CUDA device that supports it, else fp32), ``bf16``, ``fp16`` or
  ``fp32``; ``none`` is accepted for ``fp32``. It is autocast only: the softmax and every statistic stay fp32.
  bf16/fp16 are refused on the CPU, whose autocast would compute the attention softmax in low precision.
* device: ``None`` means CUDA when available, else the CPU.
* workers: ``None`` means ``min(8, CPUs)`` DataLoader workers.
* decode (image folders): ``auto`` (= ``fast``), ``pil`` (PIL decode + timm's transform: the exact path), ``fast``
  (libjpeg-turbo decode, uint8 resize and crop, normalised on the device) or ``gpu`` (JPEGs decoded on the CUDA
  device); see :mod:`attnflow.data.decode`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .limits import DECODES, OptionError, check_crop_pct, check_fraction, check_img_size, check_workers

__all__ = ["DECODES", "LoopOptions", "OptionError", "PRECISIONS", "Precision", "autocast_dtype", "check_crop_pct",
           "check_fraction", "check_img_size", "decode_mode", "default_workers", "dtype_name", "parse_decode",
           "parse_precision", "resolve_device"]

Precision = Literal["auto", "bf16", "fp16", "fp32"]
"""Autocast precision of a forward pass (``none`` is accepted as an alias of ``fp32``)."""

PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp16", "fp32")
"""The precision words, in the order help texts list them."""

PRECISION_ALIASES: dict[str, str] = {"none": "fp32"}

_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def parse_precision(value: str) -> str:
    """The canonical precision word for ``value`` (``none`` -> ``fp32``).

    Raises:
        OptionError: an unknown word (close ones suggested).
    """
    word = PRECISION_ALIASES.get(str(value).strip().lower(), str(value).strip().lower())
    if word not in PRECISIONS:
        close = difflib.get_close_matches(word, [*PRECISIONS, *PRECISION_ALIASES], n=2, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise OptionError(f"amp must be one of {', '.join(PRECISIONS)} (or none for fp32); got {value!r}{hint}")
    return word


DEFAULT_DECODE = "fast"
"""What ``auto`` means: the fast path, whose statistics agree with the exact path's within the tolerances stated in
docs/performance.md (measured by ``benchmarks/bench_loader.py``)."""


def parse_decode(value: str) -> str:
    """The canonical decode word for ``value`` (one of :data:`DECODES`; ``auto`` stays ``auto``).

    Raises:
        OptionError: an unknown word.
    """
    word = str(value).strip().lower()
    if word not in DECODES:
        raise OptionError(f"decode must be one of {', '.join(DECODES)}; got {value!r}")
    return word


def decode_mode(decode: str, device: torch.device) -> str:
    """The decode path a run on ``device`` takes: ``pil``, ``fast`` or ``gpu`` (``auto`` is :data:`DEFAULT_DECODE`).

    Raises:
        OptionError: an unknown word, or ``gpu`` on a device that is not CUDA.
    """
    word = parse_decode(decode)
    if word == "gpu" and device.type != "cuda":
        raise OptionError(f"decode gpu decodes JPEGs on a CUDA device, and this run's device is {device}; use fast "
                          "(or auto) to decode on the CPU")
    return DEFAULT_DECODE if word == "auto" else word


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, or when ``None`` CUDA if available else the CPU.

    Raises:
        OptionError: a device torch does not know, or a CUDA device this machine does not have.
    """
    if device is None or device == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise OptionError(f"unknown device {str(device)!r}; use cpu, cuda or cuda:N") from None
    if resolved.type not in ("cpu", "cuda"):
        raise OptionError(f"device {str(device)!r} is not supported; use cpu, cuda or cuda:N")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"device {str(device)!r}: no CUDA GPU is available on this machine; use cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise OptionError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return resolved


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (``None``: no autocast, fp32).

    Raises:
        OptionError: an unknown precision, or bf16/fp16 on the CPU (whose autocast rounds the softmax).
    """
    word = parse_precision(precision)
    if word == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if _DTYPES[word] is not None and device.type != "cuda":
        # CUDA autocast runs softmax in fp32; CPU autocast runs timm's softmax in bf16/fp16, which would round
        # every attention map the numbers are computed from
        raise OptionError(f"amp {word} is not supported on the CPU: torch's CPU autocast computes the attention "
                          "softmax in low precision; use fp32 (the CPU default)")
    return _DTYPES[word]


def dtype_name(dtype: torch.dtype | None) -> str:
    """``"bfloat16"``, ``"float16"`` or ``"float32"`` (no autocast), as result sidecars record it."""
    return str(dtype).replace("torch.", "") if dtype is not None else "float32"


def default_workers() -> int:
    """DataLoader workers when none are given: ``min(8, CPUs)``."""
    return min(8, os.cpu_count() or 1)


def _positive(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptionError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class LoopOptions:
    """How a dataset loop runs; none of these change the numbers it computes (except ``amp``, ``limit`` and, within
    the tolerances of docs/performance.md, ``decode``).

    Attributes:
        batch_size: images per forward pass.
        device: ``"cuda"``, ``"cuda:1"``, ``"cpu"``; ``None``: CUDA when available.
        amp: autocast precision, one of :data:`PRECISIONS` (``none`` is read as ``fp32``).
        workers: DataLoader workers; ``None``: :func:`default_workers`.
        limit: use ``limit`` evenly spaced images of a folder or dataset (a deterministic subset).
        progress: show a progress bar (main process only).
        state_path: file for the resumable state (one per process under torchrun); ``None``: no state.
        resume: continue from ``state_path`` when it holds the state of the same run.
        checkpoint_every: batches between state saves.
        keep_state: leave the finished run's state in ``state_path`` (the caller removes it once the outputs
            are written; a resume from it returns the same result at once).
        decode: how an image folder's files become tensors, one of :data:`DECODES` (see :func:`decode_mode`).
    """

    batch_size: int = 64
    device: str | None = None
    amp: str = "auto"
    workers: int | None = None
    limit: int | None = None
    progress: bool = True
    state_path: str | Path | None = None
    resume: bool = False
    checkpoint_every: int = 50
    keep_state: bool = False
    decode: str = "auto"

    def __post_init__(self) -> None:
        _positive("batch_size", self.batch_size)
        _positive("checkpoint_every", self.checkpoint_every)
        check_workers(self.workers)
        _positive("limit", self.limit, allow_none=True)
        object.__setattr__(self, "amp", parse_precision(self.amp))
        object.__setattr__(self, "decode", parse_decode(self.decode))
        if isinstance(self.device, torch.device):
            object.__setattr__(self, "device", str(self.device))

    @classmethod
    def of(cls, options: "LoopOptions | None" = None, **overrides: Any) -> "LoopOptions":
        """``options`` (default: the defaults) with ``overrides`` applied, e.g. ``LoopOptions.of(batch_size=16)``.

        Raises:
            OptionError: an override that is not a loop option (close names suggested), or a bad value.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in overrides if k not in names]
        if unknown:
            close = difflib.get_close_matches(unknown[0], names, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; loop options: {', '.join(names)}"
            raise OptionError(f"unknown option {unknown[0]!r}{hint}")
        return dataclasses.replace(options or cls(), **overrides)

    @property
    def num_workers(self) -> int:
        """The DataLoader workers to start."""
        return default_workers() if self.workers is None else self.workers

    def torch_device(self) -> torch.device:
        """The resolved device (see :func:`resolve_device`)."""
        return resolve_device(self.device)

