"""``load_model``: a preset or any timm architecture, with weights from a local file, a cache or the web.

Where the weights come from, in order (unless ``random_init``):

1. ``checkpoint=PATH``: the file, read through the preset's converter (a bare timm name: generic unwrapping
   of ``model``/``state_dict``/``module.``);
2. the Hugging Face cache, when timm hosts the preset's weights (``hub_tag`` with an ``hf_hub_id``);
3. the torch hub cache, ``torch.hub.get_dir()/checkpoints/<file>``, holding the authors' official file;
4. when online: a download from the hub, else from the authors' URL (short timeouts);
5. otherwise :class:`WeightsUnavailableError`, naming the URL / hub tag and the ``checkpoint`` option.

Names of other libraries' models: ``hf:<repo id>`` (a Hugging Face ``transformers`` vision model,
:mod:`attnflow.models.hf`) and ``open_clip:<arch>/<tag>`` (an ``open_clip`` visual tower,
:mod:`attnflow.models.openclip`), each from its library's cache, in a
:class:`~attnflow.models.adapter.ModelAdapter`; without the optional library, one line says what to install.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import AttnflowError
from ..limits import check_img_size
from . import files
from ..vit import model_has_cls
from .adapter import external_cached_path, external_prefix, load_external
from .converters import CheckpointError, get_converter, load_converted, official_formats
from .record import ATTRIBUTE, ModelRecord, plain_kwargs
from .registry import ModelSpec, UnknownModelError, close_names, find_spec, list_specs

logger = logging.getLogger(__name__)

__all__ = ["WeightsUnavailableError", "cached_weights_path", "check_finite", "hub_repo", "known_arch", "load_model",
           "official_cache_path", "random_init_seed", "sha256_file", "weights_cached"]

sha256_file = files.sha256_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CUSTOM_ARCHS: dict[str, str] = {
    "capi_vit_large_patch14": "attnflow.models.capi:capi_vit_large_patch14",
}
"""Architectures timm does not have, as ``module:function`` builders taking ``img_size`` and overrides."""


class WeightsUnavailableError(AttnflowError):
    """No local copy of a model's weights, and no way to download them (offline or unreachable)."""


@dataclass(frozen=True)
class _Weights:
    path: Path
    converter: str
    source: str


# ------------------------------------------------------------------------------------------------ names

def known_arch(name: str) -> bool:
    """Whether ``name`` is a timm architecture (``arch``, or ``arch.tag`` with a tag timm knows) or one of
    :data:`CUSTOM_ARCHS`."""
    import timm

    if name in CUSTOM_ARCHS or external_prefix(name) is not None:
        return True
    if not timm.is_model(name):  # checks the architecture part only
        return False
    return "." not in name or _known_tag(name)


def _known_tag(name: str) -> bool:
    """Whether timm has a pretrained config for ``arch.tag``."""
    from timm.models import get_pretrained_cfg

    try:
        return get_pretrained_cfg(name) is not None
    except RuntimeError:  # timm: "Invalid pretrained tag (...) for ..."
        return False


def _unknown(name: str) -> UnknownModelError:
    import timm

    arch, dot, tag = name.partition(".")
    if dot and timm.is_model(arch):
        tags = timm.list_pretrained(f"{arch}.*")
        close = close_names(name, tags, n=5, cutoff=0.3) or tags[:5]
        hint = f"; did you mean {', '.join(close)}?" if close else "; it has no pretrained tags"
        return UnknownModelError(f"unknown model {name!r}: timm has no pretrained tag {tag!r} for {arch}{hint}")
    presets = [s.name for s in list_specs()]
    close = close_names(name, presets)
    close += [m for m in close_names(name, timm.list_models() + list(CUSTOM_ARCHS), cutoff=0.6) if m not in close]
    hint = f"; did you mean {', '.join(close[:6])}?" if close else ""
    return UnknownModelError(f"unknown model {name!r}: neither a preset nor a timm architecture{hint} "
                             f"(`attnflow models` lists the presets)")


def _resolve(name: str) -> tuple[ModelSpec | None, str]:
    """``(preset or None, architecture name with an optional timm tag)``."""
    spec = find_spec(name)
    if spec is not None:
        return spec, spec.arch
    if known_arch(name):
        return None, name
    raise _unknown(name)


# ------------------------------------------------------------------------------------------------ build

def _build(spec: ModelSpec | None, arch: str, img_size: int, timm_kwargs: dict[str, Any]) -> nn.Module:
    kwargs = {**(spec.arch_kwargs if spec else {}), **timm_kwargs}
    base = arch.split(".", 1)[0]
    if base in CUSTOM_ARCHS:
        module_name, fn_name = CUSTOM_ARCHS[base].split(":")
        builder: Callable[..., nn.Module] = getattr(importlib.import_module(module_name), fn_name)
        kwargs.pop("num_classes", None)
        with _build_errors(arch, timm_kwargs):
            return _check_img_size(builder(img_size=img_size, **kwargs), img_size, arch)
    import timm

    kwargs.setdefault("num_classes", 0)
    if spec is not None:
        # the same eval preprocessing for every preset: ImageNet mean/std, resize 256 -> crop 224, bicubic
        overlay = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop_pct": 0.875, "interpolation": "bicubic",
                   "input_size": (3, img_size, img_size), "num_classes": 0}
        if not spec.hub_tag:
            overlay.update(url=spec.url or "", hf_hub_id=None, tag=None)
        kwargs.setdefault("pretrained_cfg_overlay", overlay)
        arch = spec.hub_tag or arch
    with _build_errors(arch, timm_kwargs):
        model = timm.create_model(arch, pretrained=False, img_size=img_size, **kwargs)
    return _check_img_size(model, img_size, arch)


@contextlib.contextmanager
def _build_errors(arch: str, model_kw: dict[str, Any],
                  errors: tuple[type[Exception], ...] = (TypeError, AssertionError, ValueError)) -> Iterator[None]:
    """Turn what a model's constructor raises for arguments that do not fit it (a ``TypeError`` for an unknown
    one, timm's ``assert dim % num_heads == 0``, a ``ValueError``) into one line naming the ``model_kw``."""
    try:
        yield
    except errors as err:
        given = ", ".join(f"{k}={v!r}" for k, v in model_kw.items() if k != "pretrained_cfg_overlay")
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise AttnflowError(f"cannot build {arch}" + (f" with model_kw {given}" if given else "") + f": {why}") \
            from None


def _pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (tuple, list)) else (int(value), int(value))


def _check_img_size(model: nn.Module, img_size: int | tuple[int, int], arch: str) -> nn.Module:
    """``model`` itself; raises :class:`AttnflowError` when ``img_size`` is not a multiple of its patch size.

    timm's patch embedding floors the grid (a 230 px ViT-B/16 sees 14x14 patches and silently ignores the
    last 6 px), so such a resolution is refused unless the model pads its input (``dynamic_img_pad``).
    """
    embed = getattr(model, "patch_embed", None)
    patch = getattr(embed, "patch_size", None)
    if patch is None or getattr(embed, "dynamic_img_pad", False):
        return model
    check_patch_multiple(img_size, _pair(patch), arch)
    return model


def check_patch_multiple(img_size: int | tuple[int, int], patch: tuple[int, int], arch: str) -> None:
    """Raise :class:`AttnflowError` when a side of ``img_size`` is not a multiple of ``patch`` ``(ph, pw)``,
    naming the sizes that would fit."""
    for side, p in zip(_pair(img_size), patch):
        if side % p:
            lower, upper = side // p * p, (side // p + 1) * p
            raise AttnflowError(f"img_size {img_size} is not a multiple of the patch size {p} of {arch}: "
                                f"use a multiple of {p}, e.g. {lower or upper} or {upper}")


# ------------------------------------------------------------------------------------------------ weights

def _hub_ids(spec: ModelSpec | None, arch: str) -> tuple[str | None, str | None, str | tuple[str, str] | None]:
    """``(hf_hub_id, hf_hub_filename, url)`` of the timm pretrained config of ``spec.hub_tag`` or ``arch``; timm
    may give ``url`` as a ``(url, cache file name)`` pair."""
    from timm.models import get_pretrained_cfg

    tag = spec.hub_tag if spec is not None else arch
    if not tag or arch.split(".", 1)[0] in CUSTOM_ARCHS:
        return None, None, None
    cfg = get_pretrained_cfg(tag)
    if cfg is None:
        return None, None, None
    return cfg.hf_hub_id or None, cfg.hf_hub_filename or None, cfg.url or None


def _url_and_file(spec: ModelSpec | None, arch: str) -> tuple[str | None, str | None, str]:
    """``(url, cache file name, converter)`` of the authors' file (or timm's URL for a bare timm name)."""
    if spec is not None:
        return spec.url, spec.cache_filename, spec.converter
    _, _, url = _hub_ids(None, arch)
    if isinstance(url, tuple):  # timm's (url, cache file name) form
        return url[0], url[1], "timm-arch"
    return url, (url.split("?", 1)[0].rsplit("/", 1)[-1] if url else None), "timm-arch"


def _find_weights(spec: ModelSpec | None, arch: str, *, download: bool) -> _Weights | None:
    hub_id, hub_file, _ = _hub_ids(spec, arch)
    url, filename, url_converter = _url_and_file(spec, arch)
    if hub_id and (path := files.find_hf_cached(hub_id, hub_file)):
        return _Weights(path, "timm" if spec else "timm-arch", f"hf-hub:{hub_id}")
    if (path := files.find_hub_cached(filename)) is not None:
        return _Weights(path, url_converter, url or str(path))
    if not download:
        return None
    if hub_id and (path := files.hf_download(hub_id, hub_file)):
        return _Weights(path, "timm" if spec else "timm-arch", f"hf-hub:{hub_id}")
    if url and filename and (path := files.url_download(url, filename)):
        return _Weights(path, url_converter, url)
    return None


def hub_repo(spec: ModelSpec) -> str | None:
    """The Hugging Face repo where timm hosts the weights of ``spec`` (from its ``hub_tag``), or ``None``."""
    return _hub_ids(spec, spec.arch)[0]


def official_cache_path(spec: ModelSpec) -> Path | None:
    """Where the authors' file of ``spec`` is looked for (``torch.hub.get_dir()/checkpoints/<file>``), or
    ``None`` without an official file. A file copied there by hand is used with no ``checkpoint``."""
    return files.torch_hub_checkpoint_dir() / spec.cache_filename if spec.cache_filename else None


def cached_weights_path(name: str) -> Path | None:
    """The local file holding the pretrained weights of ``name`` (HF cache or torch hub cache), or ``None``.

    Never touches the network.

    Raises:
        UnknownModelError: ``name`` is neither a preset nor a timm architecture.
        MissingExtraError: an ``hf:`` / ``open_clip:`` name without its library.
    """
    if external_prefix(name) is not None:
        return external_cached_path(name)
    spec, arch = _resolve(name)
    found = _find_weights(spec, arch, download=False)
    return found.path if found is not None else None


def weights_cached(name: str) -> bool:
    """Whether the pretrained weights of ``name`` are on this machine (HF cache or torch hub cache).

    Raises:
        UnknownModelError: ``name`` is neither a preset nor a timm architecture.
    """
    return cached_weights_path(name) is not None


def _unavailable(name: str, spec: ModelSpec | None, arch: str) -> WeightsUnavailableError:
    hub_id, _, _ = _hub_ids(spec, arch)
    url, filename, _ = _url_and_file(spec, arch)
    where = []
    if spec is not None and spec.hub_tag and hub_id:
        where.append(f"timm hub tag {spec.hub_tag} (hf-hub:{hub_id})")
    elif spec is None and hub_id:
        where.append(f"hf-hub:{hub_id}")
    if url:
        where.append(url)
    if not where:
        return WeightsUnavailableError(f"{name}: no pretrained weights are known; pass a local weights file as "
                                       "checkpoint, or set random_init")
    why = ("offline mode is on (HF_HUB_OFFLINE / ATTNFLOW_OFFLINE)" if files.offline()
           else "could not be downloaded (no network?)")
    cache = f" or save it as {files.torch_hub_checkpoint_dir() / filename}" if filename else ""
    return WeightsUnavailableError(
        f"weights of {name} are not cached and {why}: get {' or '.join(where)} and pass the file as checkpoint"
        f"{cache}; random_init builds the model without weights")


# ------------------------------------------------------------------------------------------------ main

def load_model(name: str, checkpoint: str | Path | None = None, *, random_init: bool = False,
               img_size: int = 224, checkpoint_key: str | None = None, seed_name: str | None = None,
               **timm_kwargs: Any) -> nn.Module:
    """Build a preset (or any timm architecture) at ``img_size`` and load its weights; eval mode.

    Args:
        name: a preset (``attnflow models``), e.g. ``"mocov3-vit-b16"``, a timm name (``arch[.tag]``), a
            Hugging Face repo ``"hf:facebook/dinov2-small"`` or an open_clip model
            ``"open_clip:ViT-B-16/laion2b_s34b_b88k"`` (see :mod:`attnflow.models.hf`,
            :mod:`attnflow.models.openclip`; their ``model_kw`` are config values).
        checkpoint: a local file in the preset's official format (or a timm state dict).
        random_init: build without weights (smoke tests); ``checkpoint`` must then be ``None``. The random
            weights are seeded by ``seed_name`` (see :func:`random_init_seed`): every process and every rerun
            of a run gets the same weights, and runs of other names get other weights.
        img_size: input resolution; position embeddings of the weights are resampled to it.
        checkpoint_key: top-level key holding the weights when it is not the format's default, e.g.
            ``"target_encoder"`` for I-JEPA or ``"student"`` for a DINO/iBOT full checkpoint.
        seed_name: with ``random_init``, the run's name that seeds the random weights (the ``model`` column of
            its table: a run's ``model_name``, a config entry's ``id``); default ``name``. Ignored otherwise.
        **timm_kwargs: architecture overrides passed to ``timm.create_model`` (e.g. ``depth=2`` in tests).

    Returns:
        The model, features only (``num_classes=0``), with its :class:`~attnflow.models.record.ModelRecord`
        (read it with :func:`~attnflow.models.record.model_record`): ``preset, arch,
        checkpoint, sha256, source, random_init, img_size, has_cls`` (plus ``converter, family, label``, the
        ``model_kw`` overrides and ``checkpoint_key`` it was built with, and the ``seed_name`` of random weights).

    Raises:
        OptionError: an ``img_size`` outside ``1 ..`` :data:`attnflow.limits.MAX_IMG_SIZE`.
        UnknownModelError: unknown name (with close matches).
        AttnflowError: ``timm_kwargs`` the architecture cannot be built with (e.g. ``num_heads`` that does not
            divide the width).
        CheckpointError: unreadable file, keys that do not fit (names the missing and unexpected keys), or a
            tensor holding NaN or infinite values.
        WeightsUnavailableError: no checkpoint given, none cached, and no download possible.
        MissingExtraError: an ``hf:`` / ``open_clip:`` name without its library (one line: what to install).
    """
    if random_init and checkpoint is not None:
        raise AttnflowError("random_init and checkpoint exclude each other")
    check_img_size(img_size)
    if external_prefix(name) is not None:
        return load_external(name, checkpoint=checkpoint, random_init=random_init, img_size=img_size,
                             checkpoint_key=checkpoint_key, seed_name=seed_name, model_kw=dict(timm_kwargs))
    spec, arch = _resolve(name)
    weights: _Weights | None = None
    if checkpoint is not None:
        weights = _Weights(Path(checkpoint).expanduser(), spec.converter if spec else "timm", "file")
    elif not random_init:
        weights = _find_weights(spec, arch, download=True)
        if weights is None:
            raise _unavailable(name, spec, arch)
    if weights is not None and weights.converter == "timm-arch":
        model = _build_timm_pretrained(arch, img_size, dict(timm_kwargs), weights.path)
    elif weights is None:
        model = _build_random(spec, arch, img_size, dict(timm_kwargs), seed_name or name)
    else:
        model = _build(spec, arch, img_size, dict(timm_kwargs))
        if weights is not None:
            logger.info("loading %s weights from %s", name, weights.path)
            _load_weights(model, weights, spec, arch, checkpoint_key)
    if weights is not None:
        check_finite(model, weights.path)
    sha = files.sha256_file(weights.path) if weights is not None else None
    model.eval()
    record = ModelRecord(
        arch=arch, preset=spec.name if spec else None, checkpoint=str(weights.path) if weights else None,
        sha256=sha, source=weights.source if weights else "random-init", random_init=weights is None,
        seed_name=(seed_name or name) if weights is None else None, img_size=img_size,
        has_cls=model_has_cls(model),
        converter=weights.converter if weights else None, family=spec.family if spec else "other",
        label=spec.label if spec else arch, checkpoint_key=checkpoint_key,
        model_kw=plain_kwargs(timm_kwargs))
    setattr(model, ATTRIBUTE, record)  # a plain attribute, not a parameter or sub-module
    return model


def check_finite(model: nn.Module, path: str | Path) -> None:
    """Refuse weights with a NaN or infinite value: every statistic of such a model would be NaN (a diverged
    training run, a corrupt conversion).

    Raises:
        CheckpointError: naming the first such tensor and how many of its values are not finite.
    """
    for key, param in model.named_parameters():  # buffers are the architecture's (an attention mask may hold -inf)
        tensor = param.detach()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{Path(path).name}: tensor {key} {tuple(tensor.shape)} holds {bad} NaN or infinite "
                                  f"value(s) of {tensor.numel()}: the weights are corrupt (a diverged training run?)")


def random_init_seed(seed_name: str) -> int:
    """The seed of the random weights of a run named ``seed_name``: ``zlib.crc32`` of its UTF-8 bytes (stable
    across processes and Python versions, unlike ``hash``)."""
    return zlib.crc32(seed_name.encode())


def _build_random(spec: ModelSpec | None, arch: str, img_size: int, timm_kwargs: dict[str, Any],
                  seed_name: str) -> nn.Module:
    """The model with random weights, the only rule for them: built under seed 0, then, when the architecture has
    timm's ``init_weights`` (every timm ViT, BEiT and EVA), every weight re-drawn under
    :func:`random_init_seed` of ``seed_name``. The same name gives the same weights in every process and rerun;
    two names (MAE and DINO ViT-B/16 share one architecture) give different weights. The global RNG is left as
    it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _build(spec, arch, img_size, timm_kwargs)
        init_weights = getattr(model, "init_weights", None)
        if callable(init_weights):
            torch.manual_seed(random_init_seed(seed_name))
            init_weights()
        else:
            logger.warning("%s has no init_weights(): its random weights do not depend on the run's name %r",
                           arch, seed_name)
    return model


def _load_weights(model: nn.Module, weights: _Weights, spec: ModelSpec | None, arch: str,
                  checkpoint_key: str | None) -> None:
    conv = get_converter(weights.converter)
    raw = files.read_checkpoint(weights.path)
    what = f"preset {spec.name} ({spec.arch})" if spec else f"timm model {arch}"
    try:
        state = conv(raw, key=checkpoint_key)
        load_converted(model, state, expected=f"{what}, read as format {conv.name!r} [{conv.description}] "
                                              f"from {weights.path.name}",
                       pos_resample=spec.pos_resample if spec else "timm")
    except CheckpointError as err:
        names = [] if spec is not None and spec.converter in official_formats(raw) else _presets_for(raw, arch)
        if not names:
            raise
        use = f"the model {names[0]}" if len(names) == 1 else "one of them as the model"
        raise CheckpointError(f"{err}; the file has the official layout of {', '.join(names)}: use {use}") \
            from None


def _presets_for(checkpoint: Any, arch: str) -> list[str]:
    """The presets whose official file layout ``checkpoint`` has (:func:`official_formats`); only those of
    architecture ``arch`` when there are any. A DINOv2 file picks the presets with registers iff it holds
    ``register_tokens``."""
    formats = official_formats(checkpoint)
    specs = [s for s in list_specs() if s.converter in formats]
    if "dinov2" in formats:
        registers = "register_tokens" in checkpoint
        specs = [s for s in specs if s.converter != "dinov2" or ("reg4" in s.arch) == registers]
    same_arch = [s for s in specs if s.arch == arch.split(".", 1)[0]]
    return [s.name for s in same_arch or specs]


def _build_timm_pretrained(arch: str, img_size: int, timm_kwargs: dict[str, Any], path: Path) -> nn.Module:
    """A bare timm name with a cached file: timm's own loader (its filter for that architecture)."""
    import timm

    kwargs = {"num_classes": 0, **timm_kwargs}
    overlay = {**kwargs.pop("pretrained_cfg_overlay", {}), "file": str(path)}
    try:
        with _build_errors(arch, timm_kwargs, (TypeError, AssertionError)):  # a ValueError: the file's
            model = timm.create_model(arch, pretrained=True, img_size=img_size, pretrained_cfg_overlay=overlay,
                                      **kwargs)
    except (RuntimeError, KeyError, ValueError) as err:
        raise CheckpointError(f"timm could not load {path.name} into {arch}: {str(err).splitlines()[0]}") \
            from None
    return _check_img_size(model, img_size, arch)
