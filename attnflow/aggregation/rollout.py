"""Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020) as a token-selection
source: the one definition used by the Table 5 statistics (:mod:`attnflow.aggregation.analysis`), the per-image
maps (:mod:`attnflow.maps`) and localization (:mod:`attnflow.localize.evaluate`).

Definition, for the post-softmax maps ``A_l`` (``[B, H, N, N]``, rows = queries) of blocks ``l = 0 .. L-1``:

1. **Head fusion: the mean.** ``Abar_l = mean_h A_l[:, h]`` (``[B, N, N]``), as the published code
   (``att_mat.mean(dim=1)``) and its ViT ports do.
2. **Residual: the published ``0.5 * A + 0.5 * I``, rows renormalised.** ``R_l = (Abar_l + I) / rowsum(Abar_l + I)``:
   the published ``aug_att_mat = att_mat + eye; aug_att_mat /= aug_att_mat.sum(-1)``. A softmax row sums to 1,
   so this is ``0.5 * Abar_l + 0.5 * I`` up to the float rounding of the softmax, which the renormalisation
   removes.
3. **Product from the first block to the last.** ``J_0 = R_0``, ``J_l = R_l @ J_{l-1}``, so
   ``J = R_{L-1} @ ... @ R_1 @ R_0``: row ``i`` of ``J`` is how much each *input* token flows into token ``i`` of the
   last block's output (the published ``joint_attentions[n] = aug_att_mat[n] @ joint_attentions[n - 1]``).
4. **The query row.** With a [cls] token: ``J[0]``, the [cls] output's row (the published ViT rollout). Without
   one (I-JEPA, CAPI): the mean of the patch rows, ``mean_{i in patches} J[i]``, which is exactly the rollout of
   the average-pooled patch output that such models use as their representation (rollout is linear in the
   output token), so the source exists for every model instead of being refused.
5. **Prefix tokens and renormalisation.** [cls], registers and distillation tokens stay *in the product*
   (information flows through them from block to block) but are *not* in the output vector: the row is restricted
   to the patch columns and renormalised to sum to 1 over the patches, as every other source's vector.

Precision: each block's map arrives as the model computes it (a float32 softmax, also under bf16/fp16 autocast);
the head mean, the residual, the renormalisation and the product run in float64, the vector is cast at the end.

Memory: :class:`RolloutStream` is an :data:`attnflow.tap.AttentionCallback`: it multiplies each block's
``R_l`` into the running ``[B, N, N]`` float64 product as the block runs, so only one block's ``[B, H, N, N]`` map
is alive at a time (plus, if asked, the one block's map the other sources read). Cost per image:
``L * N^3`` multiply-adds in float64 (ViT-B/16 at 224 px: 12 x 197^3 = 92 M), beside a forward whose attention
is un-fused in every block.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..errors import AttnflowError
from .sources import AggregationError

RESIDUAL_WEIGHT: float = 0.5
"""The weight of the identity in ``R = (1 - w) * Abar + w * I`` (the published rollout: 0.5)."""

FUSION = "mean"
"""How the heads of one block are fused before the residual (the published rollout: the mean)."""


def rollout_matrix(attn: torch.Tensor) -> torch.Tensor:
    """One block's rollout factor ``R = 0.5 * mean_h(A) + 0.5 * I``, rows renormalised to sum to 1 (float64).

    Args:
        attn: ``[B, H, N, N]`` post-softmax attention of one block (rows = queries).

    Returns:
        ``[B, N, N]`` float64, each row summing to 1.

    Raises:
        AggregationError: ``attn`` is not ``[B, H, N, N]``.
    """
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise AggregationError(f"rollout needs one block's attention [B, H, N, N], got shape {tuple(attn.shape)}")
    fused = attn.detach().mean(dim=1, dtype=torch.float64)                                  # [B, N, N]
    eye = torch.eye(fused.shape[-1], dtype=torch.float64, device=fused.device)
    mixed = (1.0 - RESIDUAL_WEIGHT) * fused + RESIDUAL_WEIGHT * eye                         # [B, N, N]
    return mixed / mixed.sum(dim=-1, keepdim=True)


class RolloutStream:
    """Streaming attention rollout: call it with each block's map, first block first; :attr:`product` is
    ``R_{l} @ ... @ R_0`` of the blocks seen so far.

    It is an :data:`attnflow.tap.AttentionCallback`: ``AttentionTap(model, callback=RolloutStream(keep=-1))``
    hooks every block, and the stream multiplies each map in as the block runs (nothing else holds the maps).

    Args:
        keep: also keep this block's map (``[B, H, N, N]``, detached, as the model computed it) in :attr:`kept`,
            for the sources that read one block; negative counts from the end, given ``blocks``.
        blocks: the number of blocks the stream will see (needed for a negative ``keep``).

    Attributes:
        product: ``[B, N, N]`` float64 rollout of the blocks seen (``None`` before the first).
        seen: how many blocks were multiplied in.
        kept: the kept block's map (``None`` unless ``keep`` was seen).
    """

    def __init__(self, keep: int | None = None, blocks: int | None = None) -> None:
        if keep is not None and keep < 0:
            if blocks is None:
                raise ValueError("a negative keep needs the number of blocks")
            keep += blocks
        self.keep = keep
        self.product: torch.Tensor | None = None
        self.seen = 0
        self.kept: torch.Tensor | None = None

    def __call__(self, index: int, attn: Any) -> None:
        """Multiply block ``index``'s map ``[B, H, N, N]`` into the product.

        Raises:
            AttnflowError: the blocks do not arrive in order from block 0 (the product would skip a block), or a
                block gave queries and keys instead of its map (the tap's fast route).
        """
        if not isinstance(attn, torch.Tensor):
            raise AttnflowError("attention rollout needs each block's map; tap the blocks without the fast "
                                "queries-and-keys route")
        if index != self.seen:
            raise AttnflowError(f"attention rollout got block {index} after {self.seen} block(s): it needs every "
                                "block from block 0, in order")
        factor = rollout_matrix(attn)                                                          # [B, N, N]
        if self.product is not None and self.product.shape != factor.shape:
            raise AttnflowError(f"block {index} has {factor.shape[-1]} tokens where block {index - 1} had "
                                f"{self.product.shape[-1]}: attention rollout needs the same tokens in every block")
        self.product = factor if self.product is None else torch.bmm(factor, self.product)
        if index == self.keep:
            self.kept = attn.detach()
        self.seen += 1


def attention_rollout(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """The rollout product of stored maps (first block first), e.g. ``AttentionTap(model).maps``.

    Args:
        maps: ``L`` tensors ``[B, H, N, N]``, blocks ``0 .. L-1`` in order.

    Returns:
        ``[B, N, N]`` float64 ``R_{L-1} @ ... @ R_0``.
    """
    stream = RolloutStream()
    for index, attn in enumerate(maps):
        stream(index, attn)
    if stream.product is None:
        raise AggregationError("attention rollout needs at least one block's map")
    return stream.product


def rollout_query(has_cls: bool) -> str:
    """Which row of the product the rollout vector reads: ``"[cls]"`` or ``"mean of the patch rows"``."""
    return "[cls]" if has_cls else "mean of the patch rows"


def rollout_vectors(product: torch.Tensor, layout: Any, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``rollout`` source's vectors: the [cls] row of the rollout product (without [cls]: the mean of the patch
    rows), restricted to the patch columns and renormalised (float64 inside).

    Args:
        product: ``[B, N, N]`` rollout product (:class:`RolloutStream`, :func:`attention_rollout`),
            ``N = num_prefix + gh * gw``.
        layout: the forward's :class:`attnflow.vit.TokenLayout` (tokens ``[cls?, registers..., patches]``).
        dtype: output dtype.

    Returns:
        ``[B, gh * gw]`` non-negative weights over the patches (row-major), each row summing to 1.

    Raises:
        AggregationError: ``product`` does not match the layout.
    """
    num_prefix, grid = int(layout.num_prefix), (int(layout.grid[0]), int(layout.grid[1]))
    n = num_prefix + grid[0] * grid[1]
    if product.dim() != 3 or tuple(product.shape[-2:]) != (n, n):
        raise AggregationError(f"a rollout product of shape {tuple(product.shape)} does not match the token layout "
                               f"({num_prefix} prefix + {grid[0]}x{grid[1]} patches = [B, {n}, {n}])")
    j = product.detach().to(torch.float64)
    rows = j[:, 0, num_prefix:] if bool(layout.has_cls) else j[:, num_prefix:, num_prefix:].mean(dim=1)  # [B, P]
    return (rows / rows.sum(dim=1, keepdim=True)).to(dtype)


def describe_rollout(has_cls: bool, blocks: int) -> dict[str, Any]:
    """Provenance of the rollout source for result sidecars (``blocks``: how many blocks the product spans)."""
    return {"definition": "Abnar & Zuidema 2020", "fusion": FUSION, "residual": f"{1 - RESIDUAL_WEIGHT} * A + "
            f"{RESIDUAL_WEIGHT} * I, rows renormalised", "blocks": blocks, "query": rollout_query(has_cls),
            "prefix_tokens": "in the product, not in the vector", "precision": "float64"}
