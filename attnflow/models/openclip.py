"""``open_clip`` visual towers for attnflow: an adapter and the ``open_clip:<arch>/<pretrained tag>`` loader.

Supported: open_clip's own ``VisionTransformer`` (the ``visual`` of ``ViT-*`` CLIP models, given alone or inside
the whole ``CLIP`` model), and towers built on a timm trunk (``TimmModel``, e.g. open_clip's SigLIP models),
whose ``trunk`` is a timm ViT and is measured as one (:func:`adapt` returns the trunk).

Capture (:meth:`OpenCLIPVisionAdapter.attention_capture`). Each block of open_clip's ``VisionTransformer``
(``ResidualAttentionBlock``) runs ``torch.nn.MultiheadAttention`` with ``need_weights=False``, which takes
PyTorch's fused path and forms no map. Inside the tap a forward pre-hook on each block's ``attn`` asks that call
for ``need_weights=True, average_attn_weights=False``, and a forward hook reads the per-head map
``[B, H, N, N]`` that ``MultiheadAttention`` returns: the very ``softmax(q k^T / sqrt(d))`` it multiplies with
the values on that path. Nothing of the module changes; outside the tap the model runs as before. Blocks with
open_clip's custom attention (``CustomResidualAttentionBlock``: qk-norm, scaled cosine or head scaling) are refused.

Prefix tokens: open_clip's ``VisionTransformer`` always prepends its ``class_embedding``: one [cls] token, no
registers. Blocks must run batch-first (open_clip's default since 2.26; older towers run ``[N, B, D]`` and are
refused).

Names: ``open_clip:<arch>/<tag>`` as ``open_clip.list_pretrained()`` spells them, e.g.
``open_clip:ViT-B-16/laion2b_s34b_b88k``. Weights come from open_clip's own caches without network: the
Hugging Face cache for tags hosted there (most), else ``~/.cache/clip/<file>`` for a tag's URL; when online and
not in offline mode a missing file is downloaded by open_clip. The tower is built at the run's ``img_size``
(``force_image_size``) and open_clip's checkpoint loader resizes the position embeddings. ``random_init``
builds from open_clip's architecture config alone; ``model_kw`` values are merged into it (``vision_cfg={...}``
updates the vision config; tests build tiny towers so). The normalisation is the tag's (else the tower's
``preprocess_cfg``, else OpenAI's CLIP statistics).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from ..errors import AttnflowError
from . import files
from .adapter import MapCallback, ModelAdapter, pair
from .record import ATTRIBUTE, ModelRecord, plain_kwargs

logger = logging.getLogger(__name__)

PREFIX = "open_clip:"

OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def _unsupported(message: str) -> AttnflowError:
    from ..vit import UnsupportedModelError

    return UnsupportedModelError(message)


def visual_tower(model: nn.Module) -> nn.Module:
    """``model.visual`` of a whole open_clip model, else ``model``."""
    visual = getattr(model, "visual", None)
    return visual if isinstance(visual, nn.Module) else model


def preprocessing(visual: nn.Module, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """timm-style input configuration of an open_clip tower: its ``preprocess_cfg`` (OpenAI's statistics and
    bicubic resizing by default), updated with ``overrides`` (a pretrained tag's ``mean`` / ``std`` /
    ``interpolation``). open_clip resizes the shorter side to the input size and center-crops: ``crop_pct`` 1."""
    cfg: dict[str, Any] = {"mean": OPENAI_CLIP[0], "std": OPENAI_CLIP[1], "interpolation": "bicubic"}
    for source in (getattr(visual, "preprocess_cfg", None) or {}, overrides or {}):
        cfg.update({k: source[k] for k in ("mean", "std", "interpolation") if source.get(k)})
    cfg["mean"], cfg["std"] = tuple(cfg["mean"]), tuple(cfg["std"])
    side = pair(getattr(visual, "image_size", 224))
    return {**cfg, "crop_pct": 1.0, "input_size": (3, *side)}


class OpenCLIPVisionAdapter(ModelAdapter):
    """open_clip's ``VisionTransformer`` with timm's names (see the module docstring).

    Args:
        model: a ``VisionTransformer``, or a whole open_clip model (its ``visual`` is measured), unmodified.
        pretrained_cfg: the input configuration; default :func:`preprocessing` of the tower.
    """

    library = "open_clip"
    _blocks: nn.ModuleList
    attn_modules: list[nn.MultiheadAttention]

    def __init__(self, model: nn.Module, pretrained_cfg: dict[str, Any] | None = None) -> None:
        visual: Any = visual_tower(model)
        transformer: Any = getattr(visual, "transformer", None)
        blocks: Any = getattr(transformer, "resblocks", None)
        if not isinstance(getattr(visual, "conv1", None), nn.Conv2d) or not isinstance(blocks, nn.ModuleList) \
                or getattr(visual, "class_embedding", None) is None:
            raise _unsupported(f"{type(visual).__name__} is not an open_clip VisionTransformer (conv1, "
                               "class_embedding, transformer.resblocks)")
        if getattr(transformer, "batch_first", False) is not True:  # open_clip before 2.26 had no such flag
            raise _unsupported("this open_clip tower runs its blocks sequence-first ([N, B, D]); attnflow needs "
                               "batch-first blocks: pip install 'open_clip_torch>=2.26.1'")
        attns: list[Any] = [getattr(block, "attn", None) for block in blocks]
        for i, (block, attn) in enumerate(zip(blocks, attns)):
            if not isinstance(attn, nn.MultiheadAttention):
                raise _unsupported(f"block {i} of the open_clip tower uses {type(block).__name__} with "
                                   f"{type(attn).__name__} attention; attnflow measures open_clip blocks that "
                                   "run torch.nn.MultiheadAttention")
        super().__init__(model, visual, num_prefix=1, has_cls=True, num_heads=int(attns[0].num_heads),
                         embed_dim=int(transformer.width), pretrained_cfg=pretrained_cfg or preprocessing(visual))
        object.__setattr__(self, "_blocks", blocks)
        object.__setattr__(self, "attn_modules", attns)

    @property
    def blocks(self) -> nn.ModuleList:
        return self._blocks

    @property
    def patch_embed(self) -> nn.Module:
        conv: nn.Module = getattr(self.tower, "conv1")
        return conv

    @property
    def norm(self) -> nn.Module:
        """``ln_post`` (open_clip applies it before or after pooling, per model)."""
        norm = getattr(self.tower, "ln_post", None)
        return norm if isinstance(norm, nn.Module) else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The tokens ``[B, N, D]`` leaving the last block (before ``ln_post``, pooling and projection), read
        from the tower's own forward."""
        captured: list[torch.Tensor] = []
        transformer: nn.Module = getattr(self.tower, "transformer")
        handle = transformer.register_forward_hook(lambda m, a, out: captured.append(out))
        try:
            self.tower(x)
        finally:
            handle.remove()
        return captured[0]

    @contextlib.contextmanager
    def attention_capture(self, blocks: Sequence[int], on_map: MapCallback) -> Iterator[None]:
        handles = []
        try:
            for i in blocks:
                attn = self.attn_modules[i]
                handles.append(attn.register_forward_pre_hook(_ask_for_weights, with_kwargs=True))
                handles.append(attn.register_forward_hook(_map_hook(i, on_map)))
            yield
        finally:
            for handle in handles:
                handle.remove()


def _ask_for_weights(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``MultiheadAttention(q, k, v, ...)`` called with ``need_weights=True, average_attn_weights=False``."""
    if len(args) > 4:
        raise _unsupported("open_clip passed need_weights positionally; attnflow cannot ask for the map")
    return args, {**kwargs, "need_weights": True, "average_attn_weights": False}


def _map_hook(index: int, on_map: MapCallback) -> Any:
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        attn = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
        if not isinstance(attn, torch.Tensor):
            raise _unsupported(f"block {index}: MultiheadAttention returned no attention map")
        on_map(index, attn)  # [B, H, N, N], post-softmax
    return hook


def adapt(model: nn.Module) -> nn.Module:
    """The adapter of an open_clip model given as it is; for a tower on a timm trunk (``TimmModel``), the timm
    trunk itself (see :func:`attnflow.models.adapter.adapt_model`)."""
    visual = visual_tower(model)
    trunk = getattr(visual, "trunk", None)
    if isinstance(trunk, nn.Module) and type(trunk).__module__.startswith("timm."):
        return trunk
    return OpenCLIPVisionAdapter(model)


# ------------------------------------------------------------------------------------------------ loading

def parse_name(name: str) -> tuple[str, str | None]:
    """``("ViT-B-16", "laion2b_s34b_b88k")`` of ``open_clip:ViT-B-16/laion2b_s34b_b88k`` (tag ``None`` if absent).

    Raises:
        UnknownModelError: an architecture or tag open_clip does not know (with close matches).
    """
    import open_clip

    from .registry import UnknownModelError, close_names

    arch, _, tag = name[len(PREFIX):].partition("/")
    if arch not in open_clip.list_models():
        close = close_names(arch, open_clip.list_models(), n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(f"unknown model {name!r}: open_clip has no architecture {arch!r}{hint}")
    if tag and not open_clip.get_pretrained_cfg(arch, tag):
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise UnknownModelError(f"unknown model {name!r}: open_clip has no pretrained tag {tag!r} for {arch} "
                                f"(it has {', '.join(tags) or 'none'})")
    return arch, tag or None


def _candidates(arch: str, tag: str) -> tuple[list[tuple[str, str]], str | None]:
    """``([(hub repo, file), ...], url)`` where open_clip keeps the weights of ``arch/tag``: the Hugging Face
    files it tries (safetensors first), and the URL it caches under ``~/.cache/clip``."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    hub, url = cfg.get("hf_hub") or "", cfg.get("url") or None
    found: list[tuple[str, str]] = []
    if hub:
        repo, filename = os.path.split(hub)
        if not filename:
            found = [(repo, "open_clip_model.safetensors"), (repo, "open_clip_pytorch_model.bin")]
        else:
            safe = [filename[:-4] + ".safetensors"] if filename.endswith((".bin", ".pth")) else []
            found = [(repo, f) for f in [*safe, filename]]
    return found, url


def url_cache_dir() -> Path:
    """open_clip's cache of files downloaded from a URL: ``~/.cache/clip``."""
    return Path(os.path.expanduser("~/.cache/clip"))


def cached_path(name: str) -> Path | None:
    """The cached weights file of ``open_clip:<arch>/<tag>``, or ``None``; no network."""
    arch, tag = parse_name(name)
    if tag is None:
        return None
    hub_files, url = _candidates(arch, tag)
    for repo, filename in hub_files:
        if (path := files.find_hf_cached(repo, filename)) is not None:
            return path
    path = url_cache_dir() / os.path.basename(url) if url else None
    return path if path is not None and path.is_file() else None


def _weights(name: str, arch: str, tag: str | None) -> tuple[Path, str]:
    """``(file, source)`` of the pretrained weights: cached, else downloaded by open_clip when online.

    Raises:
        WeightsUnavailableError: no tag, or not cached and no download possible.
    """
    import open_clip

    from .load import WeightsUnavailableError

    if tag is None:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        raise WeightsUnavailableError(f"{name} names no pretrained tag: use {PREFIX}{arch}/TAG (tags: {tags}), "
                                      "pass a weights file as checkpoint, or set random_init")
    hub_files, url = _candidates(arch, tag)
    source = f"hf-hub:{hub_files[0][0]}" if hub_files else str(url)
    if (path := cached_path(name)) is not None:
        return path, source
    if not files.offline() and files.reachable(url or os.environ.get("HF_ENDPOINT", "https://huggingface.co")):
        try:
            return Path(open_clip.download_pretrained(open_clip.get_pretrained_cfg(arch, tag))), source
        except Exception as err:  # noqa: BLE001  (no network, HTTP error: reported below)
            logger.info("could not download %s: %s", name, str(err).splitlines()[0][:200])
    where = [f"hf-hub:{repo} ({filename}) into the Hugging Face cache {files.hf_cache_dir()}"
             for repo, filename in hub_files[:1]]
    if url:
        where.append(f"{url} into {url_cache_dir()}")
    why = ("offline mode is on (HF_HUB_OFFLINE / ATTNFLOW_OFFLINE)" if files.offline()
           else "could not be downloaded (no network?)")
    raise WeightsUnavailableError(
        f"weights of {name} are not cached and {why}: get {' or '.join(where)}, or pass the file as checkpoint; "
        "random_init builds the model without weights")


def _model_kwargs(arch: str, model_kw: dict[str, Any], img_size: int) -> dict[str, Any]:
    """``create_model`` overrides: ``model_kw`` with dict values merged into the architecture's config (open_clip
    replaces them whole), the vision config at ``img_size``."""
    import open_clip

    cfg = open_clip.get_model_config(arch) or {}
    kwargs = {k: ({**cfg.get(k, {}), **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v)
              for k, v in model_kw.items()}
    if "vision_cfg" in kwargs:
        kwargs["vision_cfg"] = {**kwargs["vision_cfg"], "image_size": img_size}
    return kwargs


def _build(arch: str, img_size: int, model_kw: dict[str, Any], seed: int) -> nn.Module:
    """The whole open_clip model at ``img_size`` with random weights drawn under ``seed`` (no download: base
    tower weights are not fetched)."""
    import inspect

    import open_clip

    accepted = inspect.signature(open_clip.create_model).parameters
    no_base_weights = {k: False for k in ("pretrained_image", "pretrained_text", "pretrained_hf") if k in accepted}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model: nn.Module = open_clip.create_model(arch, pretrained=None, force_image_size=img_size,
                                                      **no_base_weights, **_model_kwargs(arch, model_kw, img_size))
        except TypeError as err:
            raise AttnflowError(f"cannot build open_clip {arch} with {model_kw}: {err}") from None
    return model


def _tag_preprocessing(arch: str, tag: str | None) -> dict[str, Any]:
    import open_clip

    return dict(open_clip.get_pretrained_cfg(arch, tag)) if tag else {}


def load(name: str, *, checkpoint: str | Path | None, random_init: bool, img_size: int,
         checkpoint_key: str | None, seed_name: str | None, model_kw: dict[str, Any]) -> nn.Module:
    """:func:`attnflow.load_model` of ``open_clip:<arch>/<tag>``: the visual tower in an
    :class:`OpenCLIPVisionAdapter` (the timm trunk for a timm-based tower), eval mode, with its
    :class:`~attnflow.models.record.ModelRecord`.

    Raises:
        UnknownModelError: an unknown architecture or tag.
        WeightsUnavailableError: the weights are not cached and cannot be downloaded.
        CheckpointError: a checkpoint open_clip cannot load into the model.
    """
    import open_clip

    from .converters import CheckpointError
    from .load import check_finite, random_init_seed

    arch, tag = parse_name(name)
    if checkpoint_key is not None:
        raise AttnflowError(f"checkpoint_key does not apply to {name}: open_clip reads its own checkpoints")
    path, source = (None, "random-init") if random_init else \
        (Path(checkpoint).expanduser(), "file") if checkpoint is not None else _weights(name, arch, tag)
    model = _build(arch, img_size, model_kw, random_init_seed(seed_name or name))
    if path is not None:
        logger.info("loading %s weights from %s", name, path)
        try:
            open_clip.load_checkpoint(model, str(path))
        except (RuntimeError, KeyError, ValueError, OSError) as err:
            raise CheckpointError(f"open_clip could not load {path.name} into {arch}: "
                                  f"{str(err).splitlines()[0]}") from None
        check_finite(model, path)
    visual = visual_tower(model).eval()
    cfg = preprocessing(visual, _tag_preprocessing(arch, tag))
    adapted: Any = adapt(visual)
    if isinstance(adapted, ModelAdapter):
        adapted.pretrained_cfg.update(cfg)
    else:  # a timm trunk: open_clip's normalisation, not the trunk's default tag's
        adapted.pretrained_cfg = {**getattr(adapted, "pretrained_cfg", {}), **cfg}
    record = ModelRecord(
        arch=name, checkpoint=str(path) if path else None, sha256=files.sha256_file(path) if path else None,
        source=source, random_init=random_init, seed_name=(seed_name or name) if random_init else None,
        img_size=img_size, has_cls=bool(getattr(adapted, "has_class_token", True)), converter="open_clip",
        label=name[len(PREFIX):],
        model_kw=plain_kwargs(model_kw))
    setattr(adapted, ATTRIBUTE, record)
    return adapted.eval()
