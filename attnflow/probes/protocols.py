"""Probe settings in one vocabulary: :class:`TrainOptions` (how heads train, the :func:`fit_heads` defaults) and
:class:`ProbeConfig` (a whole ``attnflow probe`` run: the paper's presets, Appendix B.2, overridable field by field).

Every training setting has one name everywhere: a :class:`TrainOptions` field, the :class:`ProbeConfig` field
of the same name (``seed`` there is ``seeds``, one run per seed), the TOML key and the ``attnflow probe``
option (which spells ``base_lr`` as ``blr``). Precedence of a run: preset < TOML config file (keys at top level
or under ``[probe]``) < command-line options.

===============  ========================================================================================
preset           settings
===============  ========================================================================================
``imagenet``     MAE linear probe: LARS, base lr 0.1 x batch / 256, momentum 0.9, weight decay 0, 10
                 warm-up epochs then cosine, 90 epochs (50 for ViT-L/H), global batch 16,384 (gradient
                 accumulation over micro-batches), RandomResizedCrop(224, bicubic) + flip; val resize 256 +
                 center crop 224.
``imagenet-1pct``  the same but SGD (no momentum: the paper's code passes none), batch 1,024, the standard
                 1% split file (``split_file``); epochs/warm-up are not stated by the paper: 90/10 (the
                 code's defaults).
``cub``          CUB-200-2011 with the ``imagenet-1pct`` settings.
``folder``       any ``ROOT/train`` + ``ROOT/val`` (or ``ROOT/test``) class-folder tree; not a paper protocol:
                 SGD as ``cub``, but the base lr is chosen per head from :data:`DEFAULT_BASE_LRS` on 10% of
                 the training images held out (:mod:`attnflow.probes.holdout`), and the batch is
                 ``min(256, training images)``, so a folder of a dozen images trains on the defaults.
===============  ========================================================================================

The paper's presets keep their fixed lr rule and train on every training image (``holdout = 0``). All presets:
3 seeds, tokens of the last block *without* the final LayerNorm (what the paper's numbers used, see
:mod:`attnflow.encode`), classifier with torch's default init (the paper's code), BatchNorm statistics
over each global micro-batch (see :mod:`attnflow.probes.norm`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover  (Python 3.10: tomli is a dependency there)
    import tomli as tomllib

from ..errors import AttnflowError
from ..limits import check_crop_pct, check_img_size, check_non_negative, check_workers
from ..options import OptionError, parse_precision
from .specs import DEFAULT_HEADS, parse_head_list

TASKS: tuple[str, ...] = ("imagenet", "imagenet-1pct", "cub", "folder")

DEFAULT_BASE_LRS: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0)
"""The default base-lr grid (peak lr = base lr x batch / 256): the paper's 0.1 and four half-decades above it.
Small training sets make few optimizer steps, and LARS moves a weight by ~lr x 0.001 of its norm per step, so
the paper's rule (tuned for ImageNet's 1.2M images) can leave a head untrained there."""

AUTO_BATCH = 256
"""The batch size when none is given: ``min(AUTO_BATCH, training samples)`` (at 256, peak lr = base lr)."""

DEFAULT_HOLDOUT = 0.1
"""Share of the training set held out to choose each head's lr from a grid (as DINOv2 and CAPI do)."""

OPTIMIZERS: tuple[str, ...] = ("lars", "sgd")
HEAD_INITS: tuple[str, ...] = ("default", "mae")
EVAL_AMPS: tuple[str, ...] = ("fp32", "fp16", "bf16")
"""Autocast of the heads at evaluation: ``fp32`` (none, the default) or ``fp16``, the official code's evaluation
(``torch.cuda.amp.autocast()``); ``none`` reads as ``fp32``."""


def _eval_amp(value: Any) -> str:
    word = {"none": "fp32"}.get(str(value).strip().lower(), str(value).strip().lower())
    if word not in EVAL_AMPS:
        raise unknown("eval_amp", str(value), EVAL_AMPS)
    return word


def _floats(name: str, value: Any) -> tuple[float, ...]:
    """``value`` (a number or a sequence of numbers) as a tuple of floats, all positive and finite."""
    values = [value] if isinstance(value, numbers.Real) else list(value)
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise OptionError(f"{name} must be a number or a list of numbers, got {value!r}") from None
    bad = [v for v in out if not (v > 0 and math.isfinite(v))]
    if not out or bad:
        raise OptionError(f"{name} must be positive learning rates, got {', '.join(f'{v:g}' for v in out) or '[]'}")
    return out


def _count(name: str, value: Any, minimum: int = 1, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise OptionError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise unknown(name, str(value), choices)


def _holdout(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 0.5:
        raise OptionError(f"holdout must be a fraction in [0, 0.5] (0: no held-out split), got {value!r}")


@dataclass(frozen=True)
class TrainOptions:
    """How probe heads train: the settings of one seed's run. The defaults are :func:`fit_heads`'s.

    With several learning rates (a ``base_lr`` grid, the default, or several ``lr``) and ``holdout > 0`` each
    head's lr is chosen on ``holdout`` of the training set, held out of training (see
    :mod:`attnflow.probes.holdout`); with one lr, or ``holdout = 0``, every training sample is trained on.

    Attributes:
        epochs: training epochs.
        batch_size: global batch per optimizer step (the partial last batch of an epoch is dropped); ``None``:
            ``min(256, training samples)``, so an epoch has at least one step.
        accum_steps: micro-batches per optimizer step (gradient accumulation).
        lr: absolute peak learning rate(s); ``None``: ``base_lr x batch_size / 256``.
        base_lr: MAE's blr, one value or a grid (default :data:`DEFAULT_BASE_LRS`); used when ``lr`` is None.
        holdout: share of the training set held out to choose each head's lr from several (0: none).
        optimizer: ``"lars"`` (ImageNet protocol) or ``"sgd"`` (CUB / ImageNet-1%).
        momentum: optimizer momentum.
        weight_decay: optimizer weight decay.
        warmup_epochs: linear warm-up epochs before the cosine.
        min_lr: floor of the cosine.
        head_init: classifier initialisation, ``"default"`` (torch) or ``"mae"``.
        eval_every: evaluate every N epochs (and after the last).
        seed: data order, held-out split and head initialisation.
        eval_amp: autocast of the heads when they are scored (validation, held-out): ``"fp32"`` (none) or
            ``"fp16"`` as the official code's evaluation (see :data:`EVAL_AMPS`); training is float32 either way.
    """

    epochs: int = 90
    batch_size: int | None = None
    accum_steps: int = 1
    lr: tuple[float, ...] | None = None
    base_lr: tuple[float, ...] = DEFAULT_BASE_LRS
    holdout: float = DEFAULT_HOLDOUT
    optimizer: str = "lars"
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    head_init: str = "default"
    eval_every: int = 1
    seed: int = 0
    eval_amp: str = "fp32"

    def __post_init__(self) -> None:
        _count("epochs", self.epochs)
        _count("batch_size", self.batch_size, allow_none=True)
        _count("accum_steps", self.accum_steps)
        _count("eval_every", self.eval_every)
        _count("seed", self.seed, minimum=0)
        _holdout(self.holdout)
        check_non_negative("warmup_epochs", self.warmup_epochs)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("head_init", self.head_init, HEAD_INITS)
        object.__setattr__(self, "eval_amp", _eval_amp(self.eval_amp))
        if self.lr is not None:
            object.__setattr__(self, "lr", _floats("lr", self.lr))
        object.__setattr__(self, "base_lr", _floats("base_lr", self.base_lr))

    @classmethod
    def of(cls, options: "TrainOptions | None" = None, **overrides: Any) -> "TrainOptions":
        """``options`` (default: the defaults) with ``overrides``, e.g. ``TrainOptions.of(epochs=10, lr=0.5)``.

        Raises:
            OptionError: an override that is not a training setting (close names suggested), or a bad value.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        for key in overrides:
            if key not in names:
                raise unknown("training setting", key, names)
        return dataclasses.replace(options or cls(), **overrides)

    @property
    def grid_size(self) -> int:
        """How many learning rates each head trains with."""
        return len(self.lr if self.lr is not None else self.base_lr)

    @property
    def selects_lr(self) -> bool:
        """Whether each head's lr is chosen on held-out training data (several lrs and ``holdout > 0``)."""
        return self.grid_size > 1 and self.holdout > 0

    def resolved_batch(self, n_train: int) -> int:
        """The global batch for ``n_train`` training samples (``batch_size``, or ``min(256, n_train)``)."""
        return self.batch_size if self.batch_size is not None else min(AUTO_BATCH, n_train)

    def peak_lrs(self, batch_size: int | None = None) -> list[float]:
        """Absolute peak lrs: ``lr``, else ``base_lr x batch / 256`` for every base lr, at ``batch_size``
        (default: the options' own, which must then be set)."""
        batch = batch_size if batch_size is not None else self.batch_size
        if self.lr is not None:
            return list(self.lr)
        if batch is None:
            raise ValueError("peak_lrs needs a batch size: the options' batch_size is not resolved yet")
        return [b * batch / 256 for b in self.base_lr]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ProbeConfig:
    """Every setting of a probe run (see the module docstring for the presets).

    The training settings are those of :class:`TrainOptions`, under the same names (``seeds`` lists the runs'
    ``seed``); :meth:`train_options` gives one seed's.

    Attributes:
        task: dataset preset, one of :data:`TASKS`.
        heads: comma-separated head specs (see :mod:`attnflow.probes.specs`).
        optimizer: ``"lars"`` or ``"sgd"``.
        base_lr: MAE's blr, or a grid of them; the peak lr is ``base_lr * batch_size / 256`` unless ``lr`` is set.
        lr: absolute peak lr(s); several values train every head once per lr (one encoder pass).
        holdout: share of the training images held out to choose each head's lr when there are several
            (0: none, every lr is reported on the validation set).
        batch_size: global batch per optimizer step; ``None``: ``min(256, training images)``.
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
        block: encoder block whose tokens are read (0-based; -1: last).
        blocks: several encoder blocks, each with its own heads, all read from one forward pass (the paper's
            Sec. 6 outlook: Selective Aggregation of internal blocks): block indices counted from 0 as ``block``
            (negative from the end; the paper's 1-based "blocks 6, 9, 12" of ViT-B are ``[5, 8, 11]``) or
            ``"all"``; ``None`` (default): only ``block``. When set it replaces ``block``, which must then be
            left at -1. See :func:`parse_blocks`.
        amp: encoder autocast, one of :data:`attnflow.options.PRECISIONS` (``none`` is read as ``fp32``).
        head_init: classifier init, ``"default"`` (torch, the paper's code) or ``"mae"``.
        cache: extract tokens once to disk and train from the cache (small datasets).
        views: augmented views per training image in the cache (1: the un-augmented eval transform).
        cache_dtype: ``"bf16"`` or ``"fp16"``.
        workers: DataLoader workers; ``None``: :func:`attnflow.options.default_workers`.
        eval_every: evaluate every N epochs (and after the last).
        split_file: ImageNet-1% split file (one ``CLASS/FILE`` or file name per line).
        limit: use at most this many training and validation images (quick checks).
        aggregation: a fixed, non-trainable aggregation of the patch tokens (paper Table 5): ``cls_mean``,
            ``cls_min_entropy``, ``central``, ``caK``, ``cpK``, ``reference:<model-name>``, ... (see
            :mod:`attnflow.aggregation.sources`); the encoder then gives one token ``sum_i w_i x_i`` per image (the
            official code's feature) and only the ``cls`` head applies.
        eval_amp: autocast of the heads at evaluation, ``fp32`` (default) or ``fp16`` (the official code's).
    """

    task: str = "imagenet"
    heads: str = DEFAULT_HEADS
    optimizer: str = "lars"
    base_lr: float | list[float] = 0.1
    lr: list[float] | None = None
    holdout: float = 0.0
    batch_size: int | None = 16384
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
    blocks: list[int] | str | None = None
    amp: str = "auto"
    head_init: str = "default"
    cache: bool = False
    views: int = 1
    cache_dtype: str = "bf16"
    workers: int | None = None
    eval_every: int = 1
    split_file: str | None = None
    limit: int | None = None
    aggregation: str | None = None
    eval_amp: str = "fp32"

    def train_options(self, seed: int, *, n_train: int, world_size: int = 1, model_size: str | None = None
                      ) -> TrainOptions:
        """The training settings of seed ``seed`` with ``n_train`` samples to train on (after any held-out
        split): epochs and batch resolved, accumulation for ``world_size`` processes."""
        options = TrainOptions(
            epochs=self.resolved_epochs(model_size), batch_size=self.batch_size,
            lr=tuple(self.lr) if self.lr else None, base_lr=_floats("base_lr", self.base_lr), holdout=self.holdout,
            optimizer=self.optimizer, momentum=self.momentum, weight_decay=self.weight_decay,
            warmup_epochs=self.warmup_epochs, min_lr=self.min_lr, head_init=self.head_init,
            eval_every=self.eval_every, seed=seed, eval_amp=self.eval_amp)
        batch = options.resolved_batch(n_train)
        return dataclasses.replace(options, batch_size=batch,
                                   accum_steps=self.resolved_accum_steps(world_size, batch))

    @property
    def selects_lr(self) -> bool:
        """Whether each head's lr is chosen on held-out training images (several lrs and ``holdout > 0``)."""
        grid = self.lr if self.lr else _floats("base_lr", self.base_lr)
        return len(grid) > 1 and self.holdout > 0

    def peak_lrs(self, batch_size: int | None = None) -> list[float]:
        """Absolute peak learning rates at ``batch_size`` (default: the configured one)."""
        batch = batch_size if batch_size is not None else self.batch_size or AUTO_BATCH
        return list(self.lr) if self.lr else [b * batch / 256 for b in _floats("base_lr", self.base_lr)]

    def resolved_accum_steps(self, world_size: int = 1, batch_size: int | None = None) -> int:
        """Micro-batches per optimizer step for ``world_size`` processes (at ``batch_size``, default the
        configured one)."""
        if self.accum_steps is not None:
            return self.accum_steps
        batch = batch_size if batch_size is not None else self.batch_size or AUTO_BATCH
        return max(1, math.ceil(batch / (self.micro_batch * world_size)))

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
    "folder": dict(_SMALL, batch_size=None, base_lr=list(DEFAULT_BASE_LRS), holdout=DEFAULT_HOLDOUT),
}
"""Preset overrides of the :class:`ProbeConfig` defaults, per task."""

_CHOICES = {"task": TASKS, "optimizer": OPTIMIZERS, "train_aug": ("rrc-flip", "none"), "head_init": HEAD_INITS,
            "cache_dtype": ("bf16", "fp16")}

RENAMED: dict[str, str] = {"num_workers": "workers"}
"""Settings that were renamed, so that an old TOML file gets told the new name."""


def unknown(kind: str, name: str, valid: Sequence[str]) -> OptionError:
    """The error for an unknown name: close valid names suggested, else the valid ones listed."""
    if name in RENAMED and RENAMED[name] in valid:
        return OptionError(f"{kind} {name!r} is now called {RENAMED[name]!r}; did you mean {RENAMED[name]}?")
    close = difflib.get_close_matches(name, list(valid), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; valid: {', '.join(valid)}"
    return OptionError(f"unknown {kind} {name!r}{hint}")


def read_toml(path: str | Path) -> dict[str, Any]:
    """Probe settings from a TOML file (top-level keys, or the ``[probe]`` table); dashes become underscores."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AttnflowError(f"config file {path} does not exist") from None
    except UnicodeDecodeError as err:
        raise AttnflowError(f"config file {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                            f"{err.start}); a TOML config is UTF-8 text") from None
    except tomllib.TOMLDecodeError as err:
        raise AttnflowError(f"config file {path} is not valid TOML: {err}") from None
    data = data.get("probe", data)
    return {k.replace("-", "_"): v for k, v in data.items()}


def parse_blocks(value: Any) -> list[int] | str | None:
    """``blocks`` as a run records it: ``"all"``, a list of block indices, or ``None``.

    Accepts ``"all"``, a comma-separated string (``"5,8,11"``), one integer or a list of integers; indices are
    0-based (negative from the end) and are checked against the model when it is loaded
    (:func:`attnflow.encode.resolve_blocks`).

    Raises:
        OptionError: anything else (e.g. ``"6-12"`` or an empty list).
    """
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip().lower() == "all":
            return "all"
        value = [v for v in value.split(",") if v.strip()]
    values = [value] if isinstance(value, (int, str)) else list(value)
    try:
        blocks = [int(v) for v in values if not isinstance(v, (bool, float))]
    except (TypeError, ValueError):
        blocks = []
    if not values or len(blocks) != len(values):
        raise OptionError(f"blocks must be 'all' or block indices counted from 0 (e.g. 5,8,11), got {value!r}")
    return blocks


def _coerce(name: str, value: Any) -> Any:
    if name in ("lr", "seeds") and value is not None and not isinstance(value, (list, tuple)):
        value = [value]
    if name in ("lr", "base_lr") and isinstance(value, (list, tuple)):
        value = list(_floats(name, value))
    if name == "base_lr" and isinstance(value, list) and len(value) == 1:
        value = value[0]  # one base lr reads the same however it was written (a resume compares them)
    if name == "seeds":
        value = [int(v) for v in value]
    if name == "rrc_scale":
        value = tuple(float(v) for v in value)
    if name == "heads" and isinstance(value, (list, tuple)):
        value = ",".join(value)
    if name == "amp":
        value = parse_precision(value)
    if name == "eval_amp":
        value = _eval_amp(value)
    if name == "blocks":
        value = parse_blocks(value)
    if name in _CHOICES and value not in _CHOICES[name]:
        raise unknown(name, str(value), _CHOICES[name])
    return value


def resolve_config(task: str, config_file: str | Path | None = None, **overrides: Any) -> ProbeConfig:
    """The preset of ``task``, updated by a TOML file and then by explicit overrides (``None`` = not given).

    Raises:
        AttnflowError: for an unknown task, key or choice (close names suggested; a renamed key, such as
            ``num_workers``, gets its new name).
    """
    if task not in PROTOCOLS:
        raise unknown("task", task, TASKS)
    valid = [f.name for f in dataclasses.fields(ProbeConfig)]
    values: dict[str, Any] = {"task": task, **PROTOCOLS[task]}
    sources = [read_toml(config_file)] if config_file else []
    sources.append({k: v for k, v in overrides.items() if v is not None})
    for source in sources:
        for key, value in source.items():
            if key not in valid:
                raise unknown("probe setting", key, valid)
            values[key] = _coerce(key, value)
    if values.get("task", task) != task:
        raise AttnflowError(f"config says task {values['task']!r} but the run's task is {task!r}")
    config = ProbeConfig(**values)
    check_config(config)
    return config


def check_config(config: ProbeConfig) -> None:
    """Reject settings that could only fail (or silently do nothing) later, with one line each.

    Raises:
        AttnflowError: non-positive counts, epochs, learning rates or evaluation interval, no seeds, an
            unknown precision, a split file for a task other than imagenet-1pct, or a head spec outside the
            grammar (checked here, before any model is loaded).
    """
    for name in ("views", "micro_batch"):
        _count(name, getattr(config, name))
    _count("accum_steps", config.accum_steps, allow_none=True)
    check_workers(config.workers)
    _count("epochs", config.epochs, allow_none=True)
    check_crop_pct(config.crop_pct, allow_none=False)
    check_img_size(config.img_size)
    if not config.seeds:
        raise OptionError("no seeds to train; e.g. seeds = [0, 1, 2]")
    parse_precision(config.amp)
    # the training settings are checked where they are defined, by TrainOptions
    TrainOptions(epochs=config.epochs or 1, batch_size=config.batch_size, accum_steps=config.accum_steps or 1,
                 lr=tuple(config.lr) if config.lr else None, base_lr=_floats("base_lr", config.base_lr),
                 holdout=config.holdout, optimizer=config.optimizer, momentum=config.momentum,
                 weight_decay=config.weight_decay, warmup_epochs=config.warmup_epochs, min_lr=config.min_lr,
                 head_init=config.head_init, eval_every=config.eval_every, seed=min(config.seeds),
                 eval_amp=config.eval_amp)
    _check_blocks(config)
    if config.split_file is not None and config.task != "imagenet-1pct":
        raise AttnflowError(f"split_file applies to task imagenet-1pct only, not {config.task!r} "
                            "(its train split is the dataset's own)")
    specs = parse_head_list(config.heads)
    if config.aggregation is not None:
        from ..aggregation.sources import parse_source

        parse_source(config.aggregation)
        others = [s.name for s in specs if s.kind != "cls"]
        if others:
            raise AttnflowError(f"aggregation {config.aggregation} gives one fixed-weight token per image: only the "
                                f"cls head reads it, not {', '.join(others)}; use heads cls (the default with "
                                "an aggregation)")


def _check_blocks(config: ProbeConfig) -> None:
    """``blocks`` is well formed, replaces ``block`` (left at -1) and is not combined with a fixed aggregation
    (which gives one token of one block per image).

    Raises:
        OptionError: either conflict, or a malformed ``blocks``.
    """
    config.blocks = parse_blocks(config.blocks)
    if config.blocks is None:
        return
    if config.block != -1:
        raise OptionError(f"block {config.block} and blocks {config.blocks} are both set; give one (blocks reads "
                          "every block it lists)")
    if config.aggregation is not None:
        raise OptionError(f"aggregation {config.aggregation} gives one fixed-weight token of one block per image; "
                          "use block, not blocks")
