"""Per-image attention maps (the paper's Fig. 9 and Fig. 2): compute them from one attention map.

Compute is split from drawing (:mod:`attnflow.plot.mapfig`): :func:`patch_maps` turns the post-softmax
attention ``[H, N, N]`` of one image in one block into patch-grid maps ``[gh, gw]``:

* ``cls_mean``: the [cls] row averaged over heads, restricted to patch keys and renormalised to sum to 1;
* ``cls_heads``: each head's [cls] row over patch keys, renormalised (``[H, gh, gw]``);
* ``cls_min_entropy``: the head whose renormalised [cls] row has the lowest entropy;
* ``central``: the central patch's row (patch ``(gh // 2, gw // 2)``), averaged over heads, restricted to patch
  keys and renormalised.

Models without [cls] get only ``central``. :func:`capture_maps` runs a model on images and returns the maps of
its last block through :class:`attnflow.tap.AttentionTap`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .style import PlotError

MAP_KINDS: tuple[str, ...] = ("cls_mean", "cls_min_entropy", "central")
"""Maps :func:`attnflow.plot.plot_attention_maps` draws by default, as in the paper's Fig. 9."""

KIND_LABELS: dict[str, str] = {
    "cls_mean": "[cls] attention, mean over heads",
    "cls_min_entropy": "[cls] attention, lowest-entropy head",
    "central": "central patch attention",
}
"""Column titles of each map kind."""


def entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy (nats) of non-negative weights along ``axis``, renormalised to sum to 1 (exact, 0 log 0 = 0)."""
    p = np.asarray(p, dtype=np.float64)
    s = p.sum(axis=axis, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return np.log(s.squeeze(axis)) - plogp.sum(axis=axis) / s.squeeze(axis)


@dataclass(frozen=True)
class PatchMaps:
    """Patch-grid attention maps of one image in one block.

    Attributes:
        grid: ``(gh, gw)`` patch grid.
        central_patch: ``(row, col)`` of the central patch whose attention is in ``central``.
        central: ``[gh, gw]`` central patch -> patch attention, mean over heads, sums to 1.
        cls_heads: ``[H, gh, gw]`` [cls] -> patch attention per head, each renormalised to sum to 1
            (``None`` without [cls]).
        cls_mean: ``[gh, gw]`` [cls] -> patch attention averaged over heads, renormalised (``None`` without
            [cls]).
        cls_entropy: ``[H]`` entropy of each head's renormalised [cls] -> patch row (``None`` without [cls]).
        min_entropy_head: 0-based head with the lowest ``cls_entropy`` (``None`` without [cls]).
    """

    grid: tuple[int, int]
    central_patch: tuple[int, int]
    central: np.ndarray
    cls_heads: np.ndarray | None = None
    cls_mean: np.ndarray | None = None
    cls_entropy: np.ndarray | None = None
    min_entropy_head: int | None = None

    @property
    def has_cls(self) -> bool:
        """Whether the model has a [cls] token (and so the [cls] maps)."""
        return self.cls_mean is not None

    @property
    def cls_min_entropy(self) -> np.ndarray | None:
        """``[gh, gw]`` map of the lowest-entropy head (``None`` without [cls])."""
        return None if self.cls_heads is None else self.cls_heads[self.min_entropy_head]

    def get(self, kind: str) -> np.ndarray | None:
        """The map called ``kind`` (one of :data:`MAP_KINDS` or ``"cls_head:<h>"``), ``None`` if absent.

        Raises:
            PlotError: for an unknown kind.
        """
        if kind in MAP_KINDS:
            return getattr(self, kind)
        if kind.startswith("cls_head:"):
            if self.cls_heads is None:
                return None
            h = int(kind.split(":", 1)[1])
            if not 0 <= h < len(self.cls_heads):
                raise PlotError(f"head {h} out of range (the block has {len(self.cls_heads)} heads)")
            return self.cls_heads[h]
        raise PlotError(f"unknown map kind {kind!r}; choose from {', '.join(MAP_KINDS)} or cls_head:<h>")


def _layout_fields(layout: Any) -> tuple[int, bool, tuple[int, int]]:
    try:
        return int(layout.num_prefix), bool(layout.has_cls), (int(layout.grid[0]), int(layout.grid[1]))
    except AttributeError as err:
        raise TypeError("layout needs num_prefix, has_cls and grid (an attnflow.tap.TokenLayout)") from err


def patch_maps(attn: torch.Tensor | np.ndarray, layout: Any) -> PatchMaps:
    """Patch-grid maps from the attention of one image in one block.

    Args:
        attn: ``[H, N, N]`` post-softmax attention (rows = queries), ``N = num_prefix + gh * gw``.
        layout: token layout with ``num_prefix``, ``has_cls`` and ``grid = (gh, gw)``; tokens are ordered
            ``[cls?, registers..., patches row-major]``.

    Returns:
        The :class:`PatchMaps` (float64 arrays).

    Raises:
        PlotError: if ``attn`` is not ``[H, N, N]`` with N matching the layout.
    """
    num_prefix, has_cls, (gh, gw) = _layout_fields(layout)
    if isinstance(attn, torch.Tensor):
        a = attn.detach().to(torch.float64).cpu().numpy()                           # [H, N, N]
    else:
        a = np.asarray(attn, np.float64)
    n = num_prefix + gh * gw
    if a.ndim != 3 or a.shape[1:] != (n, n):
        raise PlotError(f"attention of shape {tuple(a.shape)} does not match the token layout "
                        f"({num_prefix} prefix + {gh}x{gw} patches = [H, {n}, {n}])")
    from ..probes.fixed import aggregation_vectors  # the rules of the maps, shared with the fixed aggregations

    one = torch.from_numpy(a)[None]                                              # [1, H, N, N]

    def rule(kind: str) -> np.ndarray:
        return aggregation_vectors(one, layout, kind, dtype=torch.float64)[0].numpy().reshape(gh, gw)

    central_patch = (gh // 2, gw // 2)
    if not has_cls:
        return PatchMaps(grid=(gh, gw), central_patch=central_patch, central=rule("central"))
    cls_rows = a[:, 0, num_prefix:n]                                             # [H, P]
    heads = cls_rows / cls_rows.sum(axis=1, keepdims=True)
    ent = entropy(cls_rows, axis=1)
    return PatchMaps(grid=(gh, gw), central_patch=central_patch, central=rule("central"),
                     cls_heads=heads.reshape(-1, gh, gw), cls_mean=rule("cls_mean"),
                     cls_entropy=ent, min_entropy_head=int(np.argmin(ent)))


def upsample(grid_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a ``[gh, gw]`` map to ``size = (H, W)`` pixels (each patch covers its pixels)."""
    t = torch.as_tensor(np.asarray(grid_map, np.float64))[None, None]
    return F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)[0, 0].numpy()


def last_block_index(model: torch.nn.Module) -> int:
    """0-based index of a timm ViT's last block."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise PlotError(f"{type(model).__name__} has no `blocks`; per-image maps need a timm ViT")
    return len(blocks) - 1


@torch.inference_mode()
def capture_maps(model: torch.nn.Module, images: torch.Tensor, *, block: int | None = None) -> list[PatchMaps]:
    """Run ``model`` on a batch and return the patch maps of one block (default: the last) per image.

    Args:
        model: a timm ViT in eval mode.
        images: ``[B, 3, H, W]`` normalised images on the model's device.
        block: 0-based block index (negative counts from the end; default: last block).

    Returns:
        ``B`` :class:`PatchMaps`.

    Raises:
        PlotError: ``block`` is not a block of the model, or the images do not split into whole patches (the
            maps would not line up with the image).
    """
    from ..tap import AttentionTap

    n_blocks = last_block_index(model) + 1
    if block is not None and not -n_blocks <= block < n_blocks:
        raise PlotError(f"block {block} does not exist: the model has {n_blocks} blocks "
                        f"(0..{n_blocks - 1}, or -1..-{n_blocks} from the end)")
    b = n_blocks - 1 if block is None else block % n_blocks
    with AttentionTap(model, blocks=[b]) as tap:
        model(images)
        attn = tap.maps[0].float().cpu()                                         # [B, H, N, N]
        layout = tap.layout
    assert layout is not None  # tap.maps verified that a forward ran, and a forward sets the layout
    (gh, gw), (ph, pw) = layout.grid, layout.patch_size
    h, w = images.shape[-2:]
    if (gh * ph, gw * pw) != (h, w):
        raise PlotError(f"images of {h}x{w} px do not split into {ph}x{pw} patches (the model sees {gh}x{gw} "
                        f"patches, {gh * ph}x{gw * pw} px): use an --img-size that is a multiple of {ph}")
    return [patch_maps(attn[i], layout) for i in range(attn.shape[0])]


def model_maps(model: torch.nn.Module, images: Sequence[Any], *, img_size: int = 224, crop_pct: float | None = 0.875,
               block: int | None = None, batch_size: int = 16,
               device: torch.device | str | None = None) -> tuple[list[np.ndarray], list[PatchMaps]]:
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

    Returns:
        ``(crops, maps)``: uint8 ``[img_size, img_size, 3]`` crops and one :class:`PatchMaps` per image.
    """
    import timm.data

    from ..data.transforms import eval_transform

    transform = eval_transform(model, img_size=img_size, crop_pct=crop_pct)
    config = timm.data.resolve_data_config({}, model=model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    crops: list[np.ndarray] = []
    maps: list[PatchMaps] = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(img) for img in images[start:start + batch_size]])   # [B, 3, S, S]
        maps.extend(capture_maps(model, batch.to(device), block=block))
        crops.extend(denormalize(batch, config["mean"], config["std"]))
    return crops, maps


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> list[np.ndarray]:
    """Undo input normalisation: ``[B, 3, H, W]`` tensors -> ``B`` uint8 ``[H, W, 3]`` arrays for display."""
    m = torch.as_tensor(mean, dtype=images.dtype).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype).view(1, 3, 1, 1)
    x = (images.detach().cpu() * s + m).clamp(0, 1).permute(0, 2, 3, 1)
    return [(img.numpy() * 255).round().astype(np.uint8) for img in x]
