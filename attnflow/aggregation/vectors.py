"""Fixed aggregation vectors: the weights ``w`` (``[B, n_patches]``, non-negative, each row summing to 1) that turn an
image's patch tokens ``x_i`` into one representation ``sum_i w_i x_i``, from one block's attention or from a
trained head.

One definition each, used by the Table 5 statistics, the probe's fixed aggregations, the per-image maps
(:mod:`attnflow.maps`, Fig. 9) and localization (Table 7).
"""

from __future__ import annotations

from typing import Any

import torch

from ..metrics import row_entropy
from .sources import SOURCES, AggregationError, Source, check_source_fits, parse_source


def _layout_fields(layout: Any) -> tuple[int, bool, tuple[int, int]]:
    try:
        return int(layout.num_prefix), bool(layout.has_cls), (int(layout.grid[0]), int(layout.grid[1]))
    except AttributeError as err:
        raise TypeError("layout needs num_prefix, has_cls and grid (an attnflow.tap.TokenLayout)") from err


def aggregation_vectors(attn: torch.Tensor, layout: Any, source: str | Source, *,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Batched fixed aggregation vectors from one block's attention (the last block in the paper).

    Computed in float64 (the lowest-entropy head is chosen on float64 entropies, as
    :func:`attnflow.plot.patch_maps` does), returned in ``dtype``.

    Args:
        attn: ``[B, H, N, N]`` post-softmax attention (rows = queries), ``N = num_prefix + gh * gw``.
        layout: the :class:`attnflow.tap.TokenLayout` of the forward (tokens ``[cls?, registers..., patches]``).
        source: ``"cls_mean"``, ``"cls_min_entropy"`` or ``"central"`` (a reference model's vector is the
            reference's own ``cls_mean``: call this on the reference's attention).
        dtype: output dtype.

    Returns:
        ``[B, gh * gw]`` non-negative weights over the patches (row-major), each row summing to 1.

    Raises:
        AggregationError: an unknown source, a [cls] source for a model without [cls], or ``attn`` that does
            not match the layout.
    """
    src = parse_source(source) if isinstance(source, str) else source
    if src.kind not in SOURCES:
        raise AggregationError(f"{src.name} is not computed from the model's own attention; "
                               f"use one of {', '.join(SOURCES)}")
    num_prefix, has_cls, (gh, gw) = _layout_fields(layout)
    n = num_prefix + gh * gw
    if attn.dim() != 4 or tuple(attn.shape[-2:]) != (n, n):
        raise AggregationError(f"attention of shape {tuple(attn.shape)} does not match the token layout "
                               f"({num_prefix} prefix + {gh}x{gw} patches = [B, H, {n}, {n}])")
    check_source_fits(src, has_cls)
    a = attn.detach().to(torch.float64)
    if src.kind == "central":
        query = num_prefix + (gh // 2) * gw + gw // 2
        rows = a[:, :, query, num_prefix:].mean(dim=1)                                  # [B, P]
    elif src.kind == "cls_mean":
        rows = a[:, :, 0, num_prefix:].mean(dim=1)                                      # [B, P]
    else:
        heads = a[:, :, 0, num_prefix:]                                                 # [B, H, P]
        best = row_entropy(heads).argmin(dim=1)                                         # [B] (first minimum)
        rows = heads[torch.arange(heads.shape[0], device=heads.device), best]          # [B, P]
    return (rows / rows.sum(dim=1, keepdim=True)).to(dtype)


def aggregate_tokens(weights: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """The fixed-weight representation ``sum_i w_i x_i`` (float32).

    Shape:
        weights ``[B, P]``, patch tokens ``[B, P, D]`` -> ``[B, D]``.
    """
    if weights.shape != patches.shape[:2]:
        raise AggregationError(f"{tuple(weights.shape)} weights do not fit {tuple(patches.shape)} patch tokens")
    return torch.einsum("bp,bpd->bd", weights.float(), patches.float())


def head_vectors(head: Any, tokens: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A trained head's aggregation map: its weights over the patch tokens, renormalised to sum to 1 (a ``+cls``
    head's share of [cls] is left out, the rest renormalised, so every map is a distribution over the patches).

    Args:
        head: a trained :class:`~attnflow.probes.heads.ProbeHead` (AbMILP or attentive probing).
        tokens: ``[B, P + N, D]`` tokens as the head was trained on them ([cls] first when ``head.has_cls``).
        dtype: output dtype (the renormalisation runs in float64).

    Shape:
        ``[B, N]``.
    """
    weights = head.scores(tokens.float())[:, int(head.has_cls):].to(torch.float64)        # [B, N]
    return (weights / weights.sum(dim=1, keepdim=True)).to(dtype)
