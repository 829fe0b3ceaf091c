"""Per-image maps over the patch grid (the paper's Fig. 9 and Fig. 2): computed here, drawn by
:mod:`attnflow.plot.mapfig`.

From the post-softmax attention ``[H, N, N]`` of one image in one block, :func:`patch_maps` gives ``[gh, gw]``
maps with the rules of the fixed aggregations (:func:`attnflow.aggregation.vectors.aggregation_vectors`):

* ``cls_mean``: the [cls] row averaged over heads, restricted to patch keys and renormalised to sum to 1;
* ``cls_heads``: each head's [cls] row over patch keys, renormalised (``[H, gh, gw]``);
* ``cls_min_entropy``: the head whose renormalised [cls] row has the lowest entropy;
* ``central``: the central patch's row, averaged over heads, restricted to patch keys and renormalised; the
  central patch is ``((gh - 1) // 2, (gw - 1) // 2)``, the official code's ``ca1`` patch on even grids (``(6, 6)``
  of 14x14) and the true centre on odd ones (:func:`attnflow.aggregation.vectors.central_window`);
* ``rollout`` (when asked: it taps every block up to the chosen one): the attention rollout of blocks ``0 .. block``
  (Abnar & Zuidema 2020; heads fused by the mean, ``0.5 * A + 0.5 * I`` rows renormalised, multiplied from the first
  block on), read at the [cls] row (without [cls]: the mean of the patch rows) over the patches, renormalised, by
  :func:`attnflow.aggregation.rollout.rollout_vectors`, the vectors of the statistics' and localization's
  ``rollout`` source.

Models without [cls] get only ``central`` (and ``rollout``). :func:`capture_maps` runs a model on images and
returns the maps of one block; :func:`model_maps` does it for PIL images, with the crops the model saw;
:func:`aggregation_maps` gives a trained head's Selective Aggregation map
(:func:`attnflow.aggregation.vectors.head_vectors`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from .aggregation.rollout import RolloutStream, rollout_vectors
from .aggregation.vectors import aggregation_vectors, central_window, head_vectors
from .encode import TokenEncoder
from .errors import AttnflowError
from .metrics import row_entropy
from .tap import AttentionTap
from .vit import TokenLayout, check_divisible, resolve_block, token_layout

if TYPE_CHECKING:
    from .probes.heads import ProbeHead

MAP_KINDS: tuple[str, ...] = ("cls_mean", "cls_min_entropy", "central")
"""The maps of every image, as in the paper's Fig. 9 (models without [cls]: ``central`` only)."""

ROLLOUT_KIND = "rollout"
"""The attention-rollout map: computed only when asked (it taps every block up to the chosen one)."""

KINDS: tuple[str, ...] = (*MAP_KINDS, ROLLOUT_KIND)
"""Every map kind by name (besides ``cls_head:<h>``)."""


class MapError(AttnflowError, ValueError):
    """A map that cannot be computed or does not exist (an unknown kind, a head the block lacks)."""


@dataclass(frozen=True)
class PatchMaps:
    """Patch-grid attention maps of one image in one block.

    Attributes:
        grid: ``(gh, gw)`` patch grid.
        central_patch: ``(row, col)`` (0-based) of the central patch whose attention is in ``central``:
            ``((gh - 1) // 2, (gw - 1) // 2)``, e.g. ``(6, 6)`` on 14x14 (see
            :func:`attnflow.aggregation.vectors.central_window`).
        central: ``[gh, gw]`` central patch -> patch attention, mean over heads, sums to 1.
        cls_heads: ``[H, gh, gw]`` [cls] -> patch attention per head, each renormalised to sum to 1
            (``None`` without [cls]).
        cls_mean: ``[gh, gw]`` [cls] -> patch attention averaged over heads, renormalised (``None`` without
            [cls]).
        cls_entropy: ``[H]`` entropy of each head's renormalised [cls] -> patch row (``None`` without [cls]).
        min_entropy_head: 0-based head with the lowest ``cls_entropy`` (``None`` without [cls]).
        rollout: ``[gh, gw]`` attention rollout of blocks ``0 .. block`` at the [cls] row (without [cls]: the mean
            of the patch rows), over the patches, sums to 1 (``None`` unless asked for).
    """

    grid: tuple[int, int]
    central_patch: tuple[int, int]
    central: np.ndarray
    cls_heads: np.ndarray | None = None
    cls_mean: np.ndarray | None = None
    cls_entropy: np.ndarray | None = None
    min_entropy_head: int | None = None
    rollout: np.ndarray | None = None

    @property
    def has_cls(self) -> bool:
        """Whether the model has a [cls] token (and so the [cls] maps)."""
        return self.cls_mean is not None

    @property
    def cls_min_entropy(self) -> np.ndarray | None:
        """``[gh, gw]`` map of the lowest-entropy head (``None`` without [cls])."""
        return None if self.cls_heads is None else self.cls_heads[self.min_entropy_head]

    def get(self, kind: str) -> np.ndarray | None:
        """The map called ``kind`` (one of :data:`KINDS` or ``"cls_head:<h>"``), ``None`` if absent.

        Raises:
            MapError: for an unknown kind, or ``rollout`` when it was not computed.
        """
        if kind == ROLLOUT_KIND and self.rollout is None:
            raise MapError("the rollout map was not computed: ask for it (capture_maps / model_maps with rollout=True)")
        if kind in KINDS:
            return getattr(self, kind)
        if kind.startswith("cls_head:"):
            if self.cls_heads is None:
                return None
            h = int(kind.split(":", 1)[1])
            if not 0 <= h < len(self.cls_heads):
                raise MapError(f"head {h} out of range (the block has {len(self.cls_heads)} heads)")
            return self.cls_heads[h]
        raise MapError(f"unknown map kind {kind!r}; choose from {', '.join(KINDS)} or cls_head:<h>")


def _cpu_float64(values: torch.Tensor | np.ndarray) -> torch.Tensor:
    """An array or a (possibly GPU, possibly grad-tracking) tensor as a float64 CPU tensor."""
    tensor = values.detach().cpu() if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values))
    return tensor.to(torch.float64)


def patch_maps(attn: torch.Tensor | np.ndarray, layout: TokenLayout, *,
               rollout: torch.Tensor | np.ndarray | None = None) -> PatchMaps:
    """Patch-grid maps from the attention of one image in one block.

    Args:
        attn: ``[H, N, N]`` post-softmax attention (rows = queries), ``N = num_prefix + gh * gw``.
        layout: the forward's token layout (tokens ``[cls?, registers..., patches row-major]``).
        rollout: ``[N, N]`` attention-rollout product of this image through this block
            (:class:`attnflow.aggregation.rollout.RolloutStream`); gives the ``rollout`` map.

    Returns:
        The :class:`PatchMaps` (float64 arrays).

    Raises:
        AggregationError: ``attn`` (or ``rollout``) is not ``[H, N, N]`` (``[N, N]``) with N matching the layout.
    """
    one = _cpu_float64(attn)[None]                                                 # [1, H, N, N]
    gh, gw = layout.grid

    def rule(kind: str) -> np.ndarray:
        return aggregation_vectors(one, layout, kind, dtype=torch.float64)[0].numpy().reshape(gh, gw)

    central = rule("central")
    central_patch = central_window((gh, gw), 1)
    rolled = None
    if rollout is not None:
        rolled = rollout_vectors(_cpu_float64(rollout)[None], layout, dtype=torch.float64)[0].numpy().reshape(gh, gw)
    if not layout.has_cls:
        return PatchMaps(grid=(gh, gw), central_patch=central_patch, central=central, rollout=rolled)
    cls_rows = one[0, :, 0, layout.num_prefix:]                                    # [H, P]
    heads = cls_rows / cls_rows.sum(dim=1, keepdim=True)
    entropy = row_entropy(cls_rows)
    return PatchMaps(grid=(gh, gw), central_patch=central_patch, central=central,
                     cls_heads=heads.numpy().reshape(-1, gh, gw), cls_mean=rule("cls_mean"),
                     cls_entropy=entropy.numpy(), min_entropy_head=int(torch.argmin(entropy)), rollout=rolled)


@torch.inference_mode()
def capture_maps(model: nn.Module, images: torch.Tensor, *, block: int | None = None,
                 rollout: bool = False) -> list[PatchMaps]:
    """Run ``model`` on a batch and return the patch maps of one block (default: the last) per image.

    Args:
        model: a timm ViT in eval mode.
        images: ``[B, 3, H, W]`` normalised images on the model's device.
        block: 0-based block index (negative counts from the end; default: the last block).
        rollout: also the ``rollout`` map: the attention rollout of blocks ``0 .. block`` (every block with the
            default), streamed block by block (:class:`attnflow.aggregation.rollout.RolloutStream`).

    Returns:
        ``B`` :class:`PatchMaps`.

    Raises:
        BlockIndexError: ``block`` is not a block of the model.
        PatchSizeError: the images do not split into whole patches (the maps would not line up with them).
    """
    index = resolve_block(model, -1 if block is None else block)
    product = None
    if rollout:
        stream = RolloutStream(keep=index)
        with AttentionTap(model, callback=stream, blocks=range(index + 1)) as tap:  # streamed: no map stored
            model(images)
        assert stream.kept is not None and stream.product is not None  # the tap verified every block fired
        attn, product, layout = stream.kept.float().cpu(), stream.product.cpu(), tap.layout  # [B, H, N, N], [B, N, N]
    else:
        with AttentionTap(model, blocks=[index]) as tap:
            model(images)
            attn = tap.maps[0].float().cpu()                                     # [B, H, N, N]
            layout = tap.layout
    assert layout is not None  # the tap verified that a forward ran, and a forward sets the layout
    check_divisible(images.shape[-2:], layout.patch_size)
    return [patch_maps(attn[i], layout, rollout=None if product is None else product[i]) for i in range(attn.shape[0])]


def model_maps(model: torch.nn.Module, images: Sequence[Any], *, img_size: int = 224, crop_pct: float | None = 0.875,
               block: int | None = None, batch_size: int = 16, device: torch.device | str | None = None,
               rollout: bool = False) -> tuple[list[np.ndarray], list[PatchMaps]]:
    """Per-image maps of a model on PIL images, with the crops the model saw (for overlays).

    Every model gets its own normalisation but, with a fixed ``crop_pct``, the same geometric crop, so maps of
    several models overlay the same displayed image.

    Args:
        model: a timm ViT in eval mode.
        images: PIL images (e.g. :func:`attnflow.data.load_rgb`).
        img_size: side of the square model input.
        crop_pct: resize-then-center-crop fraction (``None``: the model's own).
        block: 0-based block (default: the last).
        batch_size: images per forward pass.
        device: where to run (default: the model's device).
        rollout: also the attention-rollout map of blocks ``0 .. block`` (see :func:`capture_maps`).

    Returns:
        ``(crops, maps)``: uint8 ``[img_size, img_size, 3]`` crops and one :class:`PatchMaps` per image.

    Raises:
        OptionError: ``img_size`` or ``crop_pct`` outside their limits (:mod:`attnflow.limits`).
        ImageSizeError: an image the eval transform refuses to resize (an extreme aspect ratio; the ``maps``
            command and ``attnflow run`` skip such images when they read the folder).
    """
    import timm.data

    from .data.transforms import denormalize, eval_transform

    transform = eval_transform(model, img_size=img_size, crop_pct=crop_pct)
    config = timm.data.resolve_data_config({}, model=model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    crops: list[np.ndarray] = []
    maps: list[PatchMaps] = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(img) for img in images[start:start + batch_size]])   # [B, 3, S, S]
        maps.extend(capture_maps(model, batch.to(device), block=block, rollout=rollout))
        crops.extend(denormalize(batch, config["mean"], config["std"]))
    return crops, maps


@torch.no_grad()
def aggregation_maps(model: nn.Module, head: "ProbeHead", images: torch.Tensor, *, block: int | None = None,
                     layernorm: bool | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """A trained head's Selective Aggregation map of each image: its weights over the patches, renormalised to
    sum to 1 (:func:`attnflow.aggregation.vectors.head_vectors`, the map the Table 5 statistics and localization
    use).

    Args:
        model: the frozen encoder the head was trained on.
        head: a trained head (e.g. from :func:`attnflow.probes.outputs.load_head`).
        images: ``[B, 3, H, W]`` (or one image ``[3, H, W]``), normalised as for the model.
        block, layernorm: token extraction; default: what the head was trained with (``head.meta``).
        device: where to run (default: the head's device).

    Returns:
        ``[B, H / patch, W / patch]`` float32 maps (``[H / patch, W / patch]`` for one image), each summing to 1.

    Raises:
        HeadMismatchError: a head of another model or token width.
        PatchSizeError: images that do not split into whole patches.
    """
    from .probes.backbone import check_head

    if images.dim() == 3:
        return aggregation_maps(model, head, images.unsqueeze(0), block=block, layernorm=layernorm, device=device)[0]
    meta = getattr(head, "meta", {}) or {}
    device = torch.device(device) if device is not None else next(head.parameters()).device
    encoder = TokenEncoder(model, block=meta.get("block", -1) if block is None else block,
                           layernorm=meta.get("layernorm", False) if layernorm is None else layernorm, device=device)
    check_head(head, encoder)
    layout = token_layout(model, (int(images.shape[-2]), int(images.shape[-1])))
    check_divisible(images.shape[-2:], layout.patch_size)
    weights = head_vectors(head.to(device).eval(), encoder(images))                           # [B, N]
    return weights.reshape(-1, *layout.grid)
