"""Models beyond timm: one interface for vision transformers of other libraries.

attnflow's analyses read a model through a handful of timm conventions (:mod:`attnflow.vit`): ``blocks``,
``patch_embed``, ``num_prefix_tokens`` / ``has_class_token``, ``forward_features``, ``norm`` and the input
normalisation in ``pretrained_cfg``. A :class:`ModelAdapter` presents a Hugging Face ``transformers`` vision model
(:mod:`attnflow.models.hf`) or an ``open_clip`` visual tower (:mod:`attnflow.models.openclip`) through exactly
these names, and adds the one thing timm models do not need: :meth:`ModelAdapter.attention_capture`, which makes
the model hand over each block's exact post-softmax map ``[B, H, N, N]``.

The wrapped model is used as it is: its weights and code are never changed. It is a registered sub-module
(``wrapped``), so ``.to()``, ``.eval()`` and ``.parameters()`` of the adapter act on it; ``blocks``,
``patch_embed`` and ``norm`` are properties returning the model's own modules (not registered twice, so the
state dict has each weight once). The forward hooks the analyses put on ``blocks[i]`` and ``patch_embed``
therefore fire whether the adapter or the model itself is called.

:func:`adapt_model` is the one place that recognises such models (by the library that defines the model's class,
without importing it): :mod:`attnflow.vit`, the tap, the token encoder and the transforms call it on entry, so
``AttentionTap(hf_model)`` and ``attention_stats(hf_model, ...)`` work on the unmodified model object as well as
on what :func:`attnflow.load_model` returns for an ``hf:`` / ``open_clip:`` name (the adapter itself).

Both libraries are optional extras; without them the names give one line saying what to install
(:class:`MissingExtraError`).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
import torch.nn as nn

from ..errors import AttnflowError

MapCallback = Callable[[int, torch.Tensor], None]
"""``on_map(block_index, attn)`` with the post-softmax map ``attn`` of shape ``[B, H, N, N]``."""

EXTRAS: dict[str, tuple[str, str, str]] = {
    "hf:": ("transformers", "hf", "attnflow.models.hf"),
    "open_clip:": ("open_clip", "open_clip", "attnflow.models.openclip"),
}
"""Model-name prefix -> (library module, attnflow extra that installs it, attnflow module that loads such names)."""

_LIBRARY_ADAPTERS: dict[str, str] = {"transformers": "attnflow.models.hf", "open_clip": "attnflow.models.openclip"}
"""Top-level module of a model's class -> the attnflow module whose ``adapt`` wraps it."""


class MissingExtraError(AttnflowError, ImportError):
    """An optional library (``transformers``, ``open_clip``) that a model name needs is not installed."""


class ModelAdapter(nn.Module):
    """A vision transformer of another library, presented with timm's names (see the module docstring).

    Args:
        wrapped: the model as given (registered as ``wrapped``; never modified).
        tower: the vision module of ``wrapped`` that a forward runs (``wrapped`` itself, or e.g. the vision tower
            of a two-tower CLIP); the tap hooks the start and end of its forward.
        num_prefix: tokens before the patches ([cls] and registers).
        has_cls: whether token 0 is a [cls] token.
        num_heads: attention heads per block.
        embed_dim: token width D.
        pretrained_cfg: timm-style input configuration (``mean``, ``std``, ``interpolation``, ``crop_pct``,
            ``input_size``), read by :func:`attnflow.data.transforms.eval_transform`.

    Attributes:
        arch: a readable name of the architecture (``transformers:Dinov2Model``, ``open_clip:VisionTransformer``).
    """

    library = ""
    _tower: nn.Module

    def __init__(self, wrapped: nn.Module, tower: nn.Module, *, num_prefix: int, has_cls: bool, num_heads: int,
                 embed_dim: int, pretrained_cfg: dict[str, Any]) -> None:
        super().__init__()
        self.wrapped = wrapped
        object.__setattr__(self, "_tower", tower)  # a sub-module of wrapped: not registered a second time
        self.num_prefix_tokens = int(num_prefix)
        self.has_class_token = bool(has_cls)
        self.num_reg_tokens = int(num_prefix) - int(has_cls)
        self.num_heads = int(num_heads)
        self.embed_dim = self.num_features = int(embed_dim)
        self.arch = f"{self.library}:{type(wrapped).__name__}"
        self.pretrained_cfg: dict[str, Any] = {"architecture": self.arch, "num_classes": 0, **pretrained_cfg}
        self.default_cfg = self.pretrained_cfg

    @property
    def tower(self) -> nn.Module:
        """The vision module a forward runs (the start and end of a forward are hooked on it)."""
        return self._tower

    @property
    def blocks(self) -> nn.ModuleList:
        """The model's own transformer blocks, in order (each block's output is ``[B, N, D]``)."""
        raise NotImplementedError

    @property
    def patch_embed(self) -> nn.Module:
        """The model's own patch embedding: called once per forward with the images ``[B, C, H, W]``; has a
        ``patch_size`` or is the patchifying ``nn.Conv2d``."""
        raise NotImplementedError

    @property
    def norm(self) -> nn.Module:
        """The model's final norm (``nn.Identity`` when it has none)."""
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, N, D]`` of the model's last block, as the model returns them (see the subclass).

        Shape:
            ``[B, C, H, W] -> [B, num_prefix + n_patches, D]``.
        """
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward_features` (the analyses only run the model for its hooks and tokens)."""
        return self.forward_features(x)

    def attention_capture(self, blocks: Sequence[int], on_map: MapCallback) -> ContextManager[None]:
        """A context in which every forward calls ``on_map(i, attn)`` once for each block ``i`` of ``blocks``,
        with the exact post-softmax map ``attn [B, H, N, N]`` the block multiplies with its values. Whatever
        the model needs for that (another attention implementation, unmasked input) is set on entry, for this
        model only, and restored on exit."""
        raise NotImplementedError


def adapt_model(model: nn.Module) -> nn.Module:
    """``model`` itself for timm (and any other) models; a :class:`ModelAdapter` around a Hugging Face
    ``transformers`` vision model or an ``open_clip`` visual tower (an adapter is returned as it is).

    Recognised by the top-level module of the model's class, so neither library is imported for other models.

    Raises:
        UnsupportedModelError: a model of those libraries that is not a supported vision transformer.
    """
    if isinstance(model, ModelAdapter):
        return model
    root = type(model).__module__.split(".", 1)[0]
    module = _LIBRARY_ADAPTERS.get(root)
    if module is None:
        return model
    adapter: nn.Module = importlib.import_module(module).adapt(model)
    return adapter


# ------------------------------------------------------------------------------------------------ names

def external_prefix(name: str) -> str | None:
    """The prefix of an ``hf:<repo id>`` or ``open_clip:<arch>/<tag>`` model name, else ``None``."""
    return next((prefix for prefix in EXTRAS if name.startswith(prefix)), None)


def require_library(name: str) -> Any:
    """The loader module (:mod:`attnflow.models.hf` or :mod:`attnflow.models.openclip`) of the prefixed model
    ``name``, once its library is importable.

    Raises:
        MissingExtraError: one line naming the library and the ``pip install`` that adds it.
    """
    prefix = external_prefix(name)
    assert prefix is not None, name
    library, extra, module = EXTRAS[prefix]
    if importlib.util.find_spec(library) is None:
        raise MissingExtraError(f"model {name} needs the {library} library, which is not installed: "
                                f"pip install attnflow[{extra}]")
    return importlib.import_module(module)


def load_external(name: str, *, checkpoint: str | Path | None, random_init: bool, img_size: int,
                  checkpoint_key: str | None, seed_name: str | None, model_kw: dict[str, Any]) -> nn.Module:
    """:func:`attnflow.load_model` for an ``hf:`` / ``open_clip:`` name: the loader module's ``load``."""
    loader = require_library(name)
    model: nn.Module = loader.load(name, checkpoint=checkpoint, random_init=random_init, img_size=img_size,
                                   checkpoint_key=checkpoint_key, seed_name=seed_name, model_kw=model_kw)
    return model


def external_cached_path(name: str) -> Path | None:
    """The cached weights file of an ``hf:`` / ``open_clip:`` name, or ``None`` (no network).

    Raises:
        MissingExtraError: the library is not installed.
    """
    path: Path | None = require_library(name).cached_path(name)
    return path


# ------------------------------------------------------------------------------------------------ helpers

@contextlib.contextmanager
def restoring(items: Sequence[tuple[Any, str, Any]]) -> Iterator[None]:
    """Set ``obj.attr = value`` for each ``(obj, attr, value)`` inside the block; each is restored after, in
    reverse order, also when the block raises."""
    saved: list[tuple[Any, str, Any]] = []
    try:
        for obj, attr, value in items:
            saved.append((obj, attr, getattr(obj, attr)))
            setattr(obj, attr, value)
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)


def pair(value: Any) -> tuple[int, int]:
    """``(h, w)`` of an int or a 2-sequence."""
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    return int(value), int(value)
