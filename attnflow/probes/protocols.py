"""Probe protocols: the paper's training presets (Appendix B.2), overridable field by field.

Precedence: preset < TOML config (``--config file.toml``, keys at top level or under ``[probe]``) < flags.

===============  ========================================================================================
preset           settings
===============  ========================================================================================
``imagenet``     MAE linear probe: LARS, base lr 0.1 x batch / 256, momentum 0.9, weight decay 0, 10
                 warm-up epochs then cosine, 90 epochs (50 for ViT-L/H), global batch 16,384 (gradient
                 accumulation over micro-batches), RandomResizedCrop(224, bicubic) + flip; val resize 256 +
                 center crop 224.
``imagenet-1pct``  the same but SGD (no momentum: the paper's code passes none), batch 1,024, the standard
                 1% split file (``--split-file``); epochs/warm-up are not stated by the paper: 90/10 (the
                 code's defaults).
``cub``          CUB-200-2011 with the ``imagenet-1pct`` settings.
``folder``       any ``ROOT/train`` + ``ROOT/val`` class-folder tree, with the ``cub`` settings.
===============  ========================================================================================

All presets: 3 seeds, tokens of the last block *without* the final LayerNorm (what the paper's numbers used,
see :mod:`attnflow.encode`), classifier with torch's default init (the paper's code), BatchNorm
statistics over each global micro-batch (see :mod:`attnflow.probes.norm`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover  (Python 3.10: tomli is a dependency there)
    import tomli as tomllib

from ..errors import AttnflowError
from .specs import DEFAULT_HEADS, parse_head_list

TASKS: tuple[str, ...] = ("imagenet", "imagenet-1pct", "cub", "folder")


@dataclass
class ProbeConfig:
    """Every setting of a probe run (see the module docstring for the presets).

    Attributes:
        task: dataset preset, one of :data:`TASKS`.
        heads: comma-separated head specs (see :mod:`attnflow.probes.specs`).
        optimizer: ``"lars"`` or ``"sgd"``.
        base_lr: MAE's blr; the peak lr is ``base_lr * batch_size / 256`` unless ``lr`` is set.
        lr: absolute peak lr(s); several values train every head once per lr (one encoder pass).
        batch_size: global batch per optimizer step.
        micro_batch: per-process micro-batch; accumulation steps = ceil(batch / (micro_batch x processes)).
        accum_steps: micro-batches per optimizer step, fixed (overrides ``micro_batch``); with a fixed value
            the global micro-batches, hence the BatchNorm statistics, are the same for any number of processes.
        epochs: training epochs; ``None``: 90, or 50 for ViT-L/H on ImageNet.
        warmup_epochs: linear warm-up epochs.
        min_lr: floor of the cosine.
        momentum: optimizer momentum.
        weight_decay: optimizer weight decay.
        seeds: seeds to train (one result row per seed).
        img_size: input resolution.
        crop_pct: validation center-crop fraction (0.875: resize 256, crop 224).
        train_aug: ``"rrc-flip"`` (RandomResizedCrop + horizontal flip) or ``"none"`` (the eval transform).
        rrc_scale: RandomResizedCrop area range.
        layernorm: apply the encoder's final norm to the tokens (the paper: no).
        block: encoder block whose tokens are read (-1: last).
        amp: encoder autocast: ``"auto"`` (bf16 on CUDA), ``"bf16"``, ``"fp16"``, ``"none"``.
        head_init: classifier init, ``"default"`` (torch, the paper's code) or ``"mae"``.
        cache: extract tokens once to disk and train from the cache (small datasets).
        views: augmented views per training image in the cache (1: the un-augmented eval transform).
        cache_dtype: ``"bf16"`` or ``"fp16"``.
        num_workers: DataLoader workers.
        eval_every: evaluate every N epochs (and after the last).
        split_file: ImageNet-1% split file (one ``CLASS/FILE`` or file name per line).
        limit: use at most this many training and validation images (quick checks).
        aggregation: a fixed, non-trainable aggregation of the patch tokens (paper Table 5): ``cls_mean``,
            ``cls_min_entropy``, ``central`` or ``reference:<model-name>``; the encoder then gives one token
            ``sum_i w_i x_i`` per image and only the ``cls`` head applies (see :mod:`attnflow.aggregation`).
    """

    task: str = "imagenet"
    heads: str = DEFAULT_HEADS
    optimizer: str = "lars"
    base_lr: float = 0.1
    lr: list[float] | None = None
    batch_size: int = 16384
    micro_batch: int = 1024
    accum_steps: int | None = None
    epochs: int | None = None
    warmup_epochs: float = 10.0
    min_lr: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 0.0
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    img_size: int = 224
    crop_pct: float = 0.875
    train_aug: str = "rrc-flip"
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    layernorm: bool = False
    block: int = -1
    amp: str = "auto"
    head_init: str = "default"
    cache: bool = False
    views: int = 1
    cache_dtype: str = "bf16"
    num_workers: int = 8
    eval_every: int = 1
    split_file: str | None = None
    limit: int | None = None
    aggregation: str | None = None

    def peak_lrs(self) -> list[float]:
        """Absolute peak learning rates."""
        return list(self.lr) if self.lr else [self.base_lr * self.batch_size / 256]

    def resolved_accum_steps(self, world_size: int = 1) -> int:
        """Micro-batches per optimizer step for ``world_size`` processes."""
        if self.accum_steps is not None:
            return self.accum_steps
        return max(1, math.ceil(self.batch_size / (self.micro_batch * world_size)))

    def resolved_epochs(self, model_size: str | None) -> int:
        """``epochs``, or the paper's 90 (50 for ViT-L/H on ImageNet-1k)."""
        if self.epochs is not None:
            return self.epochs
        return 50 if self.task == "imagenet" and (model_size or "").upper() in ("L", "H") else 90

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SMALL = dict(optimizer="sgd", batch_size=1024, momentum=0.0)
PROTOCOLS: dict[str, dict[str, Any]] = {
    "imagenet": {},
    "imagenet-1pct": dict(_SMALL),
    "cub": dict(_SMALL),
    "folder": dict(_SMALL),
}
"""Preset overrides of the :class:`ProbeConfig` defaults, per task."""

_CHOICES = {"task": TASKS, "optimizer": ("lars", "sgd"), "train_aug": ("rrc-flip", "none"),
            "amp": ("auto", "bf16", "fp16", "none"), "head_init": ("default", "mae"), "cache_dtype": ("bf16", "fp16")}


def _unknown(kind: str, name: str, valid: list[str] | tuple[str, ...]) -> AttnflowError:
    close = difflib.get_close_matches(name, list(valid), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; valid: {', '.join(valid)}"
    return AttnflowError(f"unknown {kind} {name!r}{hint}")


def read_toml(path: str | Path) -> dict[str, Any]:
    """Probe settings from a TOML file (top-level keys, or the ``[probe]`` table); dashes become underscores."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise AttnflowError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise AttnflowError(f"config file {path} is not valid TOML: {err}") from None
    data = data.get("probe", data)
    return {k.replace("-", "_"): v for k, v in data.items()}


def _coerce(name: str, value: Any) -> Any:
    if name in ("lr", "seeds") and value is not None and not isinstance(value, (list, tuple)):
        value = [value]
    if name == "lr" and value is not None:
        value = [float(v) for v in value]
    if name == "seeds":
        value = [int(v) for v in value]
    if name == "rrc_scale":
        value = tuple(float(v) for v in value)
    if name == "heads" and isinstance(value, (list, tuple)):
        value = ",".join(value)
    if name in _CHOICES and value not in _CHOICES[name]:
        raise _unknown(name.replace("_", "-"), str(value), _CHOICES[name])
    return value


def resolve_config(task: str, config_file: str | Path | None = None, **overrides: Any) -> ProbeConfig:
    """The preset of ``task``, updated by a TOML file and then by explicit overrides (``None`` = not given).

    Raises:
        AttnflowError: for an unknown task, key or choice (close names suggested).
    """
    if task not in PROTOCOLS:
        raise _unknown("task", task, TASKS)
    valid = [f.name for f in dataclasses.fields(ProbeConfig)]
    values: dict[str, Any] = {"task": task, **PROTOCOLS[task]}
    sources = [read_toml(config_file)] if config_file else []
    sources.append({k: v for k, v in overrides.items() if v is not None})
    for source in sources:
        for key, value in source.items():
            if key not in valid:
                raise _unknown("probe setting", key, valid)
            values[key] = _coerce(key, value)
    if values.get("task", task) != task:
        raise AttnflowError(f"config says task {values['task']!r} but the run's task is {task!r}")
    config = ProbeConfig(**values)
    check_config(config)
    return config


def check_config(config: ProbeConfig) -> None:
    """Reject settings that could only fail (or silently do nothing) later, with one line each.

    Raises:
        AttnflowError: non-positive counts, epochs, learning rates or evaluation interval, no seeds, a split
            file for a task other than imagenet-1pct, or a head spec outside the grammar (checked here, before
            any model is loaded).
    """
    if config.views < 1 or config.batch_size < 1 or config.micro_batch < 1 or (config.accum_steps or 1) < 1:
        raise AttnflowError("views, batch-size, micro-batch and accum-steps must be positive")
    if not config.seeds:
        raise AttnflowError("no seeds to train; e.g. --seeds 3 (seeds 0, 1, 2) or --seeds 0,5")
    if config.epochs is not None and config.epochs < 1:
        raise AttnflowError(f"epochs must be at least 1, got {config.epochs}")
    if config.eval_every < 1:
        raise AttnflowError(f"eval-every must be at least 1, got {config.eval_every}")
    bad_lrs = [x for x in config.peak_lrs() if not x > 0]
    if bad_lrs:
        raise AttnflowError(f"learning rates must be positive, got {', '.join(f'{x:g}' for x in bad_lrs)}")
    if config.split_file is not None and config.task != "imagenet-1pct":
        raise AttnflowError(f"split-file applies to task imagenet-1pct only, not {config.task!r} "
                            "(its train split is the dataset's own)")
    specs = parse_head_list(config.heads)
    if config.aggregation is not None:
        from ..aggregation.sources import parse_source

        parse_source(config.aggregation)
        others = [s.name for s in specs if s.kind != "cls"]
        if others:
            raise AttnflowError(f"--aggregation {config.aggregation} gives one fixed-weight token per image: only the "
                                f"cls head reads it, not {', '.join(others)}; use --heads cls (the default with "
                                "--aggregation)")
