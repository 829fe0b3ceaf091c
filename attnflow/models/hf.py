"""Hugging Face ``transformers`` vision models for attnflow: an adapter and the ``hf:<repo id>`` loader.

Supported: ViT, ViT-MAE (encoder), DINOv2 with and without registers, BEiT, the CLIP and SigLIP vision towers
(also inside a two-tower ``CLIPModel`` / ``SiglipModel``, and under the ``...ForImageClassification`` /
``...ForPreTraining`` heads), as ``transformers`` 5.9 or later builds them (the first release in which every one
of these families lists its attention modules; 4.x builds CLIP and BEiT another way), unmodified.

Capture (:meth:`HFVisionAdapter.attention_capture`). transformers loads vision models with SDPA attention by
default, which never forms the map. Inside the tap the model is switched to **eager** attention: the
``_attn_implementation`` of the config its attention modules read at each forward is set to ``"eager"`` and
restored on exit (per model, like timm's per-module ``fused_attn``; nothing process-wide). Each block's map is
then read with a forward hook on the block's attention module (the class the model lists under
``_can_record_outputs["attentions"]``) from its output ``(attn_output, attn_weights)``: exactly what
``output_attentions=True`` records, the post-softmax map the block multiplies with its values, also for BEiT's
relative position bias (added as a mask inside the softmax), which a recomputation from ``q`` and ``k`` would
miss. Eager attention costs a materialised map per block, which the tap needs anyway.

Prefix tokens are read from the model's embeddings: a ``cls_token`` (ViT, ViT-MAE, BEiT, DINOv2) or
``class_embedding`` (CLIP) is a [cls] token in front; DINOv2's ``register_tokens`` follow it; SigLIP has neither
(its ``head`` pools with an attention of its own, not a token), so it has no [cls] and no prefix.

Masking. The ViT-MAE encoder keeps a random quarter of the patches in a random order unless told otherwise. The
adapter runs it on every patch, in order: ``config.mask_ratio`` is 0 (set by the loader; set inside the tap,
and restored, for a model given as it is) and the forward gets ``noise = arange(n_patches)``, whose argsort is the
identity.

Resolution: an input size other than ``config.image_size`` is run with ``interpolate_pos_encoding=True`` (the
model's own interpolation of its position embeddings) where the model's forward has that argument; DINOv2
always interpolates.

Names: ``hf:<repo id>``, e.g. ``hf:facebook/dinov2-small``. Weights come from the Hugging Face cache
(``$HF_HUB_CACHE``, else ``$HF_HOME/hub``) without network; when online and not in offline mode, a missing repo
is downloaded into it. ``random_init`` builds from the cached ``config.json`` only, or from a config given in
``model_kw`` with its ``model_type`` (tests build tiny models so, with no file at all). The input normalisation
is the repo's ``preprocessor_config.json`` when cached, else the family's published values
(:data:`PREPROCESSING`).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from ..errors import AttnflowError
from . import files
from .adapter import MapCallback, ModelAdapter, pair, restoring
from .record import ATTRIBUTE, ModelRecord, plain_kwargs

logger = logging.getLogger(__name__)

PREFIX = "hf:"

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))

PREPROCESSING: dict[str, dict[str, Any]] = {
    "vit": {"mean": HALF[0], "std": HALF[1], "interpolation": "bilinear", "crop_pct": 1.0},
    "vit_mae": {"mean": IMAGENET[0], "std": IMAGENET[1], "interpolation": "bicubic", "crop_pct": 1.0},
    "dinov2": {"mean": IMAGENET[0], "std": IMAGENET[1], "interpolation": "bicubic", "crop_pct": 0.875},
    "dinov2_with_registers": {"mean": IMAGENET[0], "std": IMAGENET[1], "interpolation": "bicubic",
                              "crop_pct": 0.875},
    "beit": {"mean": HALF[0], "std": HALF[1], "interpolation": "bicubic", "crop_pct": 0.875},
    "clip_vision_model": {"mean": OPENAI_CLIP[0], "std": OPENAI_CLIP[1], "interpolation": "bicubic",
                          "crop_pct": 1.0},
    "siglip_vision_model": {"mean": HALF[0], "std": HALF[1], "interpolation": "bicubic", "crop_pct": 1.0},
}
"""Input normalisation of each family's reference checkpoints (their ``preprocessor_config.json``), used when a
model's own file is not cached: ``config.model_type`` -> timm-style ``pretrained_cfg`` entries."""

_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
"""PIL resampling codes of ``preprocessor_config.json`` -> timm interpolation names."""

_LAYER_PATHS = ("layers", "encoder.layers", "encoder.layer", "layer")
"""Where the transformer blocks of a transformers vision model are (5.x: ``layers``; DINOv2: ``encoder.layer``;
CLIP / SigLIP: ``encoder.layers``)."""


def _unsupported(message: str) -> AttnflowError:
    from ..vit import UnsupportedModelError

    return UnsupportedModelError(message)


# ------------------------------------------------------------------------------------------------ introspection

def vision_tower(model: nn.Module) -> nn.Module:
    """The module of ``model`` that runs the vision transformer: ``model`` itself, its ``vision_model`` (CLIP,
    SigLIP) or its base model (``...ForImageClassification`` -> ``.vit`` / ``.dinov2`` / ``.beit``).

    Raises:
        UnsupportedModelError: none of them has patch embeddings and a list of blocks.
    """
    candidates = [model, getattr(model, "vision_model", None), getattr(model, "base_model", None)]
    for candidate in candidates:
        if isinstance(candidate, nn.Module) and _patch_module(candidate) is not None and _layers(candidate):
            return candidate
    raise _unsupported(f"{type(model).__name__} is not a transformers vision transformer attnflow knows (ViT, "
                       "ViT-MAE, DINOv2, BEiT, CLIP / SigLIP vision): no patch embeddings and blocks found")


def _patch_module(tower: nn.Module) -> nn.Module | None:
    embeddings = getattr(tower, "embeddings", None)
    for name in ("patch_embeddings", "patch_embedding"):
        module = getattr(embeddings, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def _layers(tower: nn.Module) -> nn.ModuleList | None:
    for path in _LAYER_PATHS:
        module: Any = tower
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return module
    return None


def _attention_target(*owners: nn.Module) -> tuple[type | None, str | None, int]:
    """``(class, class-name suffix, output index)`` of the attention modules the model itself records for
    ``output_attentions`` (``_can_record_outputs["attentions"]`` of the first of ``owners`` that has it: the
    vision tower, else the model holding it)."""
    entry: Any = next((spec["attentions"] for owner in owners
                       if "attentions" in (spec := getattr(type(owner), "_can_record_outputs", None) or {})), None)
    if isinstance(entry, (list, tuple)):
        entry = entry[0] if entry else None
    if entry is None:
        raise _unsupported(f"{type(owners[-1]).__name__} does not say which modules compute its attention maps "
                           "(no _can_record_outputs['attentions'], which transformers 5.9 has for every family "
                           "attnflow supports: pip install 'transformers>=5.9')")
    if isinstance(entry, type):
        return entry, None, 1
    if isinstance(entry, str):
        return None, entry, 1
    return getattr(entry, "target_class", None), getattr(entry, "class_name", None), int(entry.index)


def attention_modules(model: nn.Module, tower: nn.Module, layers: nn.ModuleList) -> tuple[list[nn.Module], int]:
    """The attention module of each block of ``tower`` (the vision tower of ``model``) and the index of the map
    in its output.

    Raises:
        UnsupportedModelError: a block without exactly one such module.
    """
    cls, suffix, index = _attention_target(tower, model)
    found = []
    for i, layer in enumerate(layers):
        mods = [m for m in layer.modules() if (cls is not None and isinstance(m, cls))
                or (suffix is not None and type(m).__name__.endswith(suffix))]
        if len(mods) != 1:
            raise _unsupported(f"block {i} of {type(tower).__name__} has {len(mods)} attention modules "
                               f"({getattr(cls, '__name__', suffix)}), not one")
        found.append(mods[0])
    return found, index


def prefix_tokens(tower: nn.Module) -> tuple[int, bool]:
    """``(num_prefix, has_cls)`` from the model's embeddings: a ``cls_token`` / ``class_embedding`` parameter is
    a [cls] token; ``register_tokens`` ``[1, R, D]`` are R registers after it."""
    embeddings = getattr(tower, "embeddings", None)
    has_cls = any(isinstance(getattr(embeddings, n, None), nn.Parameter) for n in ("cls_token", "class_embedding"))
    registers = getattr(embeddings, "register_tokens", None)
    n_reg = int(registers.shape[1]) if isinstance(registers, nn.Parameter) else 0
    return int(has_cls) + n_reg, has_cls


def preprocessing(config: Any, processor: dict[str, Any] | None = None) -> dict[str, Any]:
    """timm-style input configuration: from a ``preprocessor_config.json`` when given, else
    :data:`PREPROCESSING` of the family (ImageNet statistics for an unknown family, with a warning)."""
    model_type = str(getattr(config, "model_type", ""))
    base = PREPROCESSING.get(model_type)
    if base is None:
        logger.warning("no input normalisation known for transformers model type %r: using ImageNet's", model_type)
        base = {"mean": IMAGENET[0], "std": IMAGENET[1], "interpolation": "bicubic", "crop_pct": 0.875}
    cfg = dict(base)
    if processor:
        if processor.get("image_mean") and processor.get("image_std"):
            cfg["mean"], cfg["std"] = tuple(processor["image_mean"]), tuple(processor["image_std"])
        if processor.get("resample") in _RESAMPLE:
            cfg["interpolation"] = _RESAMPLE[processor["resample"]]
        size, crop = processor.get("size"), processor.get("crop_size")
        shortest = size.get("shortest_edge") if isinstance(size, dict) else None
        crop_side = crop.get("height") if isinstance(crop, dict) else crop
        cfg["crop_pct"] = (float(crop_side) / float(shortest) if processor.get("do_center_crop") and shortest
                           and crop_side else 1.0)
    side = pair(getattr(config, "image_size", 224))
    cfg["input_size"] = (int(getattr(config, "num_channels", 3)), *side)
    return cfg


# ------------------------------------------------------------------------------------------------ adapter

class HFVisionAdapter(ModelAdapter):
    """A transformers vision model with timm's names (see the module docstring).

    Args:
        model: the model, unmodified (``ViTModel``, ``Dinov2Model``, ``CLIPVisionModel``, ``CLIPModel``, ...).
        pretrained_cfg: the input configuration; default :func:`preprocessing` of the family.

    Attributes:
        attn_modules: the attention module of each block (hooked by :meth:`attention_capture`).
    """

    library = "transformers"
    _layers: nn.ModuleList
    attn_modules: list[nn.Module]

    def __init__(self, model: nn.Module, pretrained_cfg: dict[str, Any] | None = None) -> None:
        tower = vision_tower(model)
        config: Any = tower.config
        num_prefix, has_cls = prefix_tokens(tower)
        super().__init__(model, tower, num_prefix=num_prefix, has_cls=has_cls,
                         num_heads=int(config.num_attention_heads), embed_dim=int(config.hidden_size),
                         pretrained_cfg=pretrained_cfg or preprocessing(config))
        layers = _layers(tower)
        assert layers is not None  # vision_tower checked it
        object.__setattr__(self, "_layers", layers)
        modules, self._map_index = attention_modules(model, tower, layers)
        object.__setattr__(self, "attn_modules", modules)
        params = inspect.signature(tower.forward).parameters
        self._interpolate_arg = "interpolate_pos_encoding" in params
        self._masks = "noise" in params and callable(getattr(getattr(tower, "embeddings", None), "random_masking",
                                                             None))
        self._native_hw = pair(getattr(config, "image_size", 0))

    @property
    def blocks(self) -> nn.ModuleList:
        return self._layers

    @property
    def patch_embed(self) -> nn.Module:
        module = _patch_module(self.tower)
        assert module is not None  # vision_tower checked it
        return module

    @property
    def norm(self) -> nn.Module:
        """``layernorm`` (ViT, ViT-MAE, DINOv2, BEiT: an identity with mean pooling) or ``post_layernorm`` (CLIP,
        SigLIP)."""
        for name in ("layernorm", "post_layernorm"):
            module = getattr(self.tower, name, None)
            if isinstance(module, nn.Module):
                return module
        return nn.Identity()

    def forward_kwargs(self, images: torch.Tensor) -> dict[str, Any]:
        """What the model's forward needs besides the images: ``interpolate_pos_encoding`` at another size than
        ``config.image_size``, and for ViT-MAE the ``noise`` that keeps every patch in order."""
        kwargs: dict[str, Any] = {}
        if self._interpolate_arg and tuple(images.shape[-2:]) != self._native_hw:
            kwargs["interpolate_pos_encoding"] = True
        if self._masks:
            kwargs["noise"] = identity_noise(images, self.patch_embed)
        return kwargs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The model's ``last_hidden_state`` ``[B, N, D]``: after the final ``layernorm`` for ViT, ViT-MAE,
        DINOv2, BEiT and SigLIP; before ``post_layernorm`` for CLIP (which norms only its pooled [cls])."""
        out = self.tower(x, **self.forward_kwargs(x))
        hidden: torch.Tensor = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return hidden

    @contextlib.contextmanager
    def attention_capture(self, blocks: Sequence[int], on_map: MapCallback) -> Iterator[None]:
        configs = {id(c): c for c in (getattr(m, "config", None) for m in self.attn_modules) if c is not None}
        settings: list[tuple[Any, str, Any]] = [(c, "_attn_implementation", "eager") for c in configs.values()]
        if self._masks:
            settings.append((self.tower.config, "mask_ratio", 0.0))
        handles = []
        try:
            with restoring(settings):
                for i in blocks:
                    handles.append(self.attn_modules[i].register_forward_hook(self._map_hook(i, on_map)))
                if self._masks:
                    handles.append(self.tower.register_forward_pre_hook(self._noise_hook, with_kwargs=True))
                yield
        finally:
            for handle in handles:
                handle.remove()

    def _map_hook(self, index: int, on_map: MapCallback) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            attn = output[self._map_index] if isinstance(output, (tuple, list)) else None
            if not isinstance(attn, torch.Tensor):
                raise _unsupported(f"block {index}: {type(module).__name__} returned no attention map with eager "
                                   "attention (another attention implementation forced?)")
            on_map(index, attn)  # [B, H, N, N], post-softmax
        return hook

    def _noise_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """ViT-MAE called as it is (not through the adapter): every patch, in order."""
        if kwargs.get("noise") is not None or len(args) > 1:
            return None
        images = args[0] if args else kwargs.get("pixel_values")
        if not isinstance(images, torch.Tensor):
            return None
        return args, {**kwargs, "noise": identity_noise(images, self.patch_embed)}


def identity_noise(images: torch.Tensor, patch_embed: nn.Module) -> torch.Tensor:
    """ViT-MAE's ``noise`` ``[B, n_patches]`` whose argsort keeps the patches in order: ``arange(n_patches)``."""
    ph, pw = pair(getattr(patch_embed, "patch_size", 1))
    n = (images.shape[-2] // ph) * (images.shape[-1] // pw)
    return torch.arange(n, device=images.device, dtype=torch.float32).expand(images.shape[0], n)


def adapt(model: nn.Module) -> HFVisionAdapter:
    """The adapter of a transformers model given as it is (see :func:`attnflow.models.adapter.adapt_model`)."""
    return HFVisionAdapter(model)


# ------------------------------------------------------------------------------------------------ loading

def repo_id(name: str) -> str:
    """``facebook/dinov2-small`` of ``hf:facebook/dinov2-small``.

    Raises:
        UnknownModelError: no repo id after the prefix.
    """
    from .registry import UnknownModelError

    repo = name[len(PREFIX):].strip()
    if not repo or any(c.isspace() for c in repo):
        raise UnknownModelError(f"model {name!r}: give a Hugging Face repo id after {PREFIX}, e.g. "
                                "hf:facebook/dinov2-small")
    return repo


def cached_path(name: str) -> Path | None:
    """The cached weights file of ``hf:<repo>`` (safetensors, a ``.bin``, or the index of sharded weights), or
    ``None``; no network."""
    repo = repo_id(name)
    return files.find_hf_cached(repo) or files.find_hf_cached(repo, "model.safetensors.index.json")


def _may_download() -> bool:
    return not files.offline() and files.reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


def _vision_class(config: Any) -> tuple[Any, Any]:
    """``(model class, its config)``: the vision tower of a two-tower config (CLIP, SigLIP), else the base model
    the auto classes map the config to."""
    from transformers import AutoModel

    vision = getattr(config, "vision_config", None)
    cfg = vision if vision is not None else config
    mapping: Any = getattr(AutoModel, "_model_mapping")
    return mapping[type(cfg)], cfg


def _config(repo: str, model_kw: dict[str, Any], local_only: bool) -> Any:
    """The model's config: from ``model_kw`` alone when it has a ``model_type``, else the repo's (cached)."""
    from transformers import AutoConfig

    kwargs = dict(model_kw)
    model_type = kwargs.pop("model_type", None)
    if model_type is not None:
        return AutoConfig.for_model(str(model_type), **kwargs)
    config = AutoConfig.from_pretrained(repo, cache_dir=str(files.hf_cache_dir()), local_files_only=local_only)
    for key, value in kwargs.items():
        setattr(getattr(config, "vision_config", None) or config, key, value)
    return config


def _unavailable(name: str, repo: str, what: str, random_init: bool) -> AttnflowError:
    from .load import WeightsUnavailableError

    why = ("offline mode is on (HF_HUB_OFFLINE / ATTNFLOW_OFFLINE)" if files.offline()
           else "could not be downloaded (no network?)")
    fix = ("or give the architecture as model_kw with its model_type (e.g. model_type='dinov2', hidden_size=384)"
           if random_init else "or pass a folder saved by save_pretrained as checkpoint; random_init builds the "
                               "model without weights")
    return WeightsUnavailableError(f"{what} of {name} {'is' if random_init else 'are'} not in the Hugging Face "
                                   f"cache {files.hf_cache_dir()} and {why}: download hf-hub:{repo} into that "
                                   f"cache on a machine with internet (e.g. `hf download {repo}`), {fix}")


def _build(name: str, repo: str, checkpoint: Path | None, random_init: bool, seed: int,
           model_kw: dict[str, Any]) -> tuple[nn.Module, str]:
    """``(model, source)``: random weights under ``seed``, a ``save_pretrained`` folder, or the cached repo."""
    kwargs = dict(model_kw)
    attn = kwargs.pop("attn_implementation", None)
    extra = {"attn_implementation": attn} if attn else {}
    if random_init:
        try:
            config = _config(repo, kwargs, local_only=True)
        except OSError:
            raise _unavailable(name, repo, "the config.json", True) from None
        cls, cfg = _vision_class(config)
        if getattr(cfg, "mask_ratio", None) is not None:
            cfg.mask_ratio = 0.0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls._from_config(cfg, **extra), "random-init"
    source = str(checkpoint) if checkpoint is not None else repo
    for local_only in (True, False):
        if not local_only and (checkpoint is not None or not _may_download()):
            break
        try:
            config = _config(source, kwargs, local_only)
            cls, cfg = _vision_class(config)
            if getattr(cfg, "mask_ratio", None) is not None:
                kwargs["mask_ratio"] = 0.0
            model = cls.from_pretrained(source, cache_dir=str(files.hf_cache_dir()), local_files_only=local_only,
                                        **kwargs, **extra)
            return model, "file" if checkpoint is not None else f"hf-hub:{repo}"
        except OSError as err:
            if checkpoint is not None:
                from .converters import CheckpointError

                raise CheckpointError(f"cannot load {checkpoint} as a transformers model folder: "
                                      f"{str(err).splitlines()[0]}") from None
    raise _unavailable(name, repo, "the weights", False)


def _processor_config(repo: str, checkpoint: Path | None) -> dict[str, Any] | None:
    path = (checkpoint / "preprocessor_config.json" if checkpoint is not None
            else files.find_hf_cached(repo, "preprocessor_config.json"))
    if path is None or not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data


def load(name: str, *, checkpoint: str | Path | None, random_init: bool, img_size: int,
         checkpoint_key: str | None, seed_name: str | None, model_kw: dict[str, Any]) -> nn.Module:
    """:func:`attnflow.load_model` of ``hf:<repo id>``: the vision model in an :class:`HFVisionAdapter`, eval mode,
    with its :class:`~attnflow.models.record.ModelRecord`.

    ``checkpoint`` is a folder written by ``save_pretrained``; ``model_kw`` overrides config values (with a
    ``model_type``, it is the whole config of a ``random_init`` model); ``random_init`` weights are seeded by
    ``seed_name`` (default ``name``) and built at ``img_size``.

    Raises:
        WeightsUnavailableError: the repo (or, with ``random_init``, its config) is not cached and cannot be
            downloaded.
        CheckpointError: ``checkpoint`` is not a transformers model folder, or its weights hold NaN or infinite
            values.
    """
    from ..vit import token_stride
    from .load import check_finite, check_patch_multiple, random_init_seed

    repo = repo_id(name)
    if checkpoint_key is not None:
        raise AttnflowError(f"checkpoint_key does not apply to {name}: transformers folders hold one model")
    folder = Path(checkpoint).expanduser() if checkpoint is not None else None
    kwargs = dict(model_kw)
    if random_init:  # built at the run's resolution (pretrained weights interpolate their positions instead)
        kwargs.setdefault("image_size", img_size)
    model, source = _build(name, repo, folder, random_init, random_init_seed(seed_name or name), kwargs)
    model.eval()
    processor = None if random_init else _processor_config(repo, folder)
    adapter = HFVisionAdapter(model, preprocessing(vision_tower(model).config, processor))
    adapter.pretrained_cfg["input_size"] = (adapter.pretrained_cfg["input_size"][0], img_size, img_size)
    check_patch_multiple(img_size, token_stride(adapter.patch_embed), name)
    weights = None if random_init else (folder if folder is not None else cached_path(name))
    weights_file = weights if weights is None or weights.is_file() else next(
        (p for p in sorted(weights.glob("*.safetensors")) + sorted(weights.glob("*.bin"))), None)
    if weights is not None:
        check_finite(model, weights)
    record = ModelRecord(
        arch=name, checkpoint=str(weights) if weights else None,
        sha256=files.sha256_file(weights_file) if weights_file else None, source=source, random_init=random_init,
        seed_name=(seed_name or name) if random_init else None, img_size=img_size,
        has_cls=adapter.has_class_token, converter="transformers", label=repo,
        model_kw=plain_kwargs(model_kw))
    setattr(adapter, ATTRIBUTE, record)
    return adapter.eval()
