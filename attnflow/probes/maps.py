"""Per-image Selective Aggregation maps: a saved head's token weights laid out on the patch grid.

Used by the maps (paper Fig. 9) and localization (Table 7, MaxBoxAccV2) work::

    head = load_head("runs/probe-mae/seed0/heads/abmilp.pt")
    maps = aggregation_maps(model, head, images)        # [B, grid_h, grid_w], sums to 1 over patches
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import AttnflowError
from .encode import TokenEncoder
from .heads import ProbeHead


def patch_grid(model: nn.Module, images: torch.Tensor) -> tuple[int, int]:
    """The patch grid ``(h, w)`` of ``model`` for images ``[B, 3, H, W]`` of this size (hybrid CNN stems and
    NaFlexViT included: the same rule as the statistics' tap)."""
    from ..tap import UnsupportedModelError, patch_embedding, token_grid

    try:
        return token_grid(patch_embedding(model), (images.shape[-2], images.shape[-1]))
    except UnsupportedModelError as err:
        raise AttnflowError(str(err)) from None


@torch.no_grad()
def aggregation_maps(model: nn.Module, head: ProbeHead, images: torch.Tensor, *, block: int | None = None,
                     layernorm: bool | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """The head's aggregation weights over the patches, as a map per image.

    Args:
        model: the frozen encoder the head was trained on.
        head: a trained head (e.g. from :func:`attnflow.probes.outputs.load_head`).
        images: ``[B, 3, H, W]`` (or one image ``[3, H, W]``), normalised as for the model.
        block, layernorm: token extraction; default: what the head was trained with (``head.meta``).
        device: where to run (default: the head's device).

    Returns:
        ``[B, H / patch, W / patch]`` float32 weights (``[H / patch, W / patch]`` for one image; for ``+cls``
        heads the [cls] share is left out, so the map sums to ``1 - s_cls``).
    """
    if images.dim() == 3:
        return aggregation_maps(model, head, images.unsqueeze(0), block=block, layernorm=layernorm, device=device)[0]
    meta = getattr(head, "meta", {}) or {}
    device = torch.device(device) if device is not None else next(head.parameters()).device
    encoder = TokenEncoder(model, block=meta.get("block", -1) if block is None else block,
                           layernorm=meta.get("layernorm", False) if layernorm is None else layernorm, device=device)
    if encoder.has_cls != head.has_cls or encoder.dim != head.dim:
        raise AttnflowError(f"the head was trained on tokens of width {head.dim} (has_cls={head.has_cls}); this "
                            f"model gives width {encoder.dim} (has_cls={encoder.has_cls})")
    tokens = encoder(images).float()
    weights = head.to(device).eval().scores(tokens)[:, int(head.has_cls):]  # [B, N]
    gh, gw = patch_grid(model, images)
    if weights.shape[1] != gh * gw:
        raise AttnflowError(f"{weights.shape[1]} patch tokens do not fill a {gh}x{gw} grid")
    return weights.reshape(-1, gh, gw).float()
