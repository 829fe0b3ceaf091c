"""Model introspection of timm ViT-family models: blocks, heads, prefix tokens, the patch grid, the token layout of a
forward, and the checks every analysis makes on a model and its input (one place each).

Hugging Face ``transformers`` vision models and ``open_clip`` visual towers are recognised here too: every function
below first passes its model through :func:`attnflow.models.adapter.adapt_model`, which presents such a model with
timm's names (see :mod:`attnflow.models.adapter`) and returns any other model as it is.

Token order is ``[cls?, registers..., patches (row-major)]``: ``num_prefix`` non-patch tokens ([cls], registers,
a distillation token) come first, and "patch" always excludes every one of them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn

from .errors import AttnflowError
from .models.adapter import ModelAdapter, adapt_model

log = logging.getLogger(__name__)


class UnsupportedModelError(AttnflowError):
    """The model's blocks do not expose a post-softmax attention map the tap can hook."""


class BlockIndexError(AttnflowError, IndexError):
    """A block index outside the model's blocks."""


class InputShapeError(AttnflowError):
    """Images that do not fit the model (resolution, channels, dtype)."""


class PatchSizeError(InputShapeError):
    """Images whose height or width is not a whole number of patches."""


@dataclass(frozen=True)
class TokenLayout:
    """Where the tokens of a forward pass are.

    Tokens are ordered ``[cls?, registers..., patches (row-major)]``.

    Attributes:
        num_prefix: number of non-patch tokens in front ([cls], registers, distillation token).
        has_cls: whether token 0 is a [cls] token.
        grid: patch grid ``(gh, gw)``; ``n_patches = gh * gw``.
        patch_size: input pixels per patch token ``(ph, pw)``: the patch size, or for hybrid models (CNN stem,
            e.g. ``vit_small_r26_s32_224``) the stem's stride times it.
    """

    num_prefix: int
    has_cls: bool
    grid: tuple[int, int]
    patch_size: tuple[int, int]

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n_tokens(self) -> int:
        return self.num_prefix + self.n_patches


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    a, b = tuple(value)
    return int(a), int(b)


def patch_embedding(model: nn.Module) -> nn.Module:
    """The module that turns the image into patch tokens: timm's ``patch_embed`` (``embeds`` in NaFlexViT).

    Raises:
        UnsupportedModelError: the model has neither, so the patch grid of a forward cannot be known.
    """
    model = adapt_model(model)
    for name in ("patch_embed", "embeds"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            return module
    raise UnsupportedModelError(
        f"{type(model).__name__} has no `patch_embed`: attnflow cannot tell where its patch tokens are")


def token_stride(embed: nn.Module) -> tuple[int, int]:
    """Input pixels per patch token ``(sh, sw)``: the patch size, times the backbone's reduction for hybrid
    (CNN stem) embeddings, from timm's ``feat_ratio``; the stride of an embedding that is one ``nn.Conv2d``
    (CLIP, SigLIP, open_clip)."""
    ratio = getattr(embed, "feat_ratio", None)
    if callable(ratio):
        return _pair(ratio(as_scalar=False))
    if isinstance(embed, nn.Conv2d):
        return _pair(embed.stride)
    return _pair(getattr(embed, "patch_size", 1))


def token_grid(embed: nn.Module, image_hw: tuple[int, int]) -> tuple[int, int]:
    """Patch grid ``(gh, gw)`` of an ``image_hw`` input, from timm's ``dynamic_feat_size`` when the embedding
    has it (hybrid backbones, dynamic padding), else the input size over :func:`token_stride`."""
    feat_size = getattr(embed, "dynamic_feat_size", None)
    if callable(feat_size):
        return _pair(feat_size(image_hw))
    sh, sw = token_stride(embed)
    return image_hw[0] // sh, image_hw[1] // sw


def model_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a timm ViT-family model, checked to expose a hookable attention.

    Raises:
        UnsupportedModelError: the model has no ``blocks`` or a block's attention has no ``attn_drop`` /
            ``fused_attn`` (e.g. convolutional or hierarchical models).
    """
    model = adapt_model(model)
    if isinstance(model, ModelAdapter):  # its blocks hand over their maps through attention_capture
        return list(model.blocks)
    name = type(model).__name__
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        raise UnsupportedModelError(
            f"{name} has no `blocks` list of transformer blocks; attnflow supports timm ViT-family models "
            "(ViT, DeiT, BEiT, EVA, DINOv2, ...)")
    for i, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        if attn is None or not isinstance(getattr(attn, "attn_drop", None), nn.Module) \
                or not hasattr(attn, "fused_attn"):
            kind = type(attn).__name__ if attn is not None else "no `attn`"
            raise UnsupportedModelError(
                f"{name}: block {i}'s attention ({kind}) exposes no post-softmax map "
                "(needs `attn.attn_drop` and `attn.fused_attn`, as timm's Attention has)")
    return list(blocks)


def model_has_cls(model: nn.Module) -> bool:
    """Whether the model prepends a [cls] token (timm's ``has_class_token`` or a ``cls_token``)."""
    model = adapt_model(model)
    flag = getattr(model, "has_class_token", None)
    if flag is not None:
        return bool(flag)
    return getattr(model, "cls_token", None) is not None


def model_num_prefix(model: nn.Module) -> int:
    """Number of prefix tokens ([cls], registers, distillation) of a timm model."""
    model = adapt_model(model)
    n = getattr(model, "num_prefix_tokens", None)
    if n is not None:
        return int(n)
    return int(model_has_cls(model)) + int(getattr(model, "num_reg_tokens", 0) or 0)


def model_num_heads(model: nn.Module) -> int:
    """Attention heads per block (of the first block).

    Raises:
        UnsupportedModelError: the attention module has no ``num_heads``.
    """
    model = adapt_model(model)
    if isinstance(model, ModelAdapter):
        return model.num_heads
    attn = model_blocks(model)[0].attn
    heads = getattr(attn, "num_heads", None)
    if heads is None:
        raise UnsupportedModelError(f"{type(attn).__name__} has no `num_heads`")
    return int(heads)


def resolve_block(model: nn.Module, block: int) -> int:
    """The non-negative index of ``block`` (negative counts from the end).

    Raises:
        BlockIndexError: a block the model does not have.
    """
    n = len(model_blocks(model))
    if not -n <= block < n:
        raise BlockIndexError(f"block {block} does not exist: the model has {n} blocks (0..{n - 1}, or -1..-{n} "
                              "from the end)")
    return block % n


def token_layout(model: nn.Module, image_hw: tuple[int, int]) -> TokenLayout:
    """The :class:`TokenLayout` of a forward of ``model`` on images of ``image_hw = (H, W)`` pixels."""
    embed = patch_embedding(model)
    return TokenLayout(model_num_prefix(model), model_has_cls(model), token_grid(embed, image_hw),
                       token_stride(embed))


def check_divisible(image_hw: Sequence[int], patch_size: Sequence[int]) -> None:
    """Refuse images that do not split into whole patches (their maps would not line up with the image).

    Raises:
        PatchSizeError: naming the size, the patch and the sizes that would fit.
    """
    (h, w), (ph, pw) = (int(image_hw[0]), int(image_hw[1])), (int(patch_size[0]), int(patch_size[1]))
    if h % ph or w % pw:
        raise PatchSizeError(f"images of {h}x{w} px do not split into {ph}x{pw} patches: use an input size "
                             f"(img_size) that is a multiple of {ph}, e.g. {max(ph, h // ph * ph)}")


class InputCheck:
    """Checks each batch ``[B, C, H, W]`` against the model and moves it to the device in the model's dtype.

    Raises:
        InputShapeError: integer images (raw pixels), or channels that are not dimension 1.
        PatchSizeError: images that do not split into whole patches.
    """

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        model = adapt_model(model)
        param = next(model.parameters(), None)
        self.device, self.dtype = device, (param.dtype if param is not None else torch.float32)
        embed = patch_embedding(model)
        self.stride = token_stride(embed)
        convs = (m for m in embed.modules() if isinstance(m, nn.Conv2d))
        self.channels: int | None = next((conv.in_channels for conv in convs), None)
        cfg: Any = getattr(model, "pretrained_cfg", None) or {}
        mean = cfg.get("mean")
        self.check_range = bool(mean) and any(m > 0 for m in mean or ())  # normalised images then go below 0
        self.mean_std = (mean, cfg.get("std"))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        shape = tuple(images.shape)
        if not images.is_floating_point():
            raise InputShapeError(f"images are {str(images.dtype).replace('torch.', '')} {list(shape)} (raw "
                                  "pixels?): the model needs float images normalised as it expects, e.g. by "
                                  "attnflow.eval_transform(model)")
        if self.channels is not None and (images.dim() != 4 or shape[1] != self.channels):
            hint = " (channels last? use images.permute(0, 3, 1, 2))" if shape[-1] == self.channels else ""
            raise InputShapeError(f"images must be [B, {self.channels}, H, W] ({self.channels} channels); got "
                                  f"{list(shape)}{hint}")
        check_divisible(shape[-2:], self.stride)
        images = images.to(self.device, dtype=self.dtype, non_blocking=True)
        if self.check_range:
            self.check_range = False  # the first batch only: one device sync per run
            low, high = images.aminmax()
            if low >= 0:
                log.warning("the first batch has no negative value (range [%.3g, %.3g]): are the images normalised? "
                            "The model expects mean %s, std %s, e.g. by attnflow.eval_transform(model)",
                            float(low), float(high), *self.mean_std)
        return images

