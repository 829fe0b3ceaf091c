"""Fixed aggregation vectors and feature weights, from one block's attention or from a trained head.

* :func:`aggregation_vectors`: each source's vector ``w`` (``[B, n_patches]``, non-negative, each row summing
  to 1), the one definition used by the Table 5 statistics (entropy, Fig. 7's KL divergences), the per-image maps
  (:mod:`attnflow.maps`, Fig. 9) and localization (Table 7).
* :func:`feature_weights`: the weights of the representation ``sum_i w_i x_i`` the probe trains on (Table 5's
  accuracy), scaled as the paper's official code scales it (``caK`` and ``reference:`` features are
  ``mean_i(w_i x_i)``; see :mod:`attnflow.aggregation.sources`).
* :func:`central_window`: where the central patch / KxK window lies on a patch grid.

The ``rollout`` source reads every block's attention, not one block's: its vectors are
:func:`attnflow.aggregation.rollout.rollout_vectors` of the streamed rollout product.
"""

from __future__ import annotations

from typing import Any

import torch

from ..metrics import row_entropy
from .sources import OWN_KINDS, AggregationError, Source, check_source_fits, parse_source

OFFICIAL_EPS: float = 1e-6
"""The official code's ``caK`` renormalises its window attention as ``a / (sum(a) + 1e-6)``; the features of
``caK`` / ``central`` keep that term (:func:`feature_weights`); the vectors are renormalised exactly."""


def central_window(grid: tuple[int, int], size: int = 1) -> tuple[int, int]:
    """Top-left ``(row, col)`` of the central ``size x size`` window of a ``gh x gw`` patch grid (0-based).

    The window starts at ``((gh - K) // 2, (gw - K) // 2)``: exactly centred where ``gh - K`` (``gw - K``) is
    even, else half a patch up (left) of the centre. The central patch (``K = 1``) is thus
    ``((gh - 1) // 2, (gw - 1) // 2)``: ``(6, 6)`` on 14x14 and ``(7, 7)`` on 16x16, the patch the official code's
    ``ca1`` takes (it uses rows ``[c - ceil(K/2), c + floor(K/2))`` with ``c = side // 2``), and the true centre
    ``(7, 7)`` on 15x15. This rule equals the official window on every even grid for every K, and on odd grids for
    even K; for odd K on an odd grid the official window is one patch up-left of the centre and this one is centred
    (the official code only ran on the even 14x14 and 16x16 grids).

    Raises:
        AggregationError: ``size`` below 1 or larger than the grid.
    """
    gh, gw = int(grid[0]), int(grid[1])
    if not 1 <= size <= min(gh, gw):
        raise AggregationError(f"a central {size}x{size} window does not fit a {gh}x{gw} patch grid")
    return (gh - size) // 2, (gw - size) // 2


def window_indices(grid: tuple[int, int], size: int) -> list[int]:
    """Row-major patch indices of the central ``size x size`` window (see :func:`central_window`)."""
    r0, c0 = central_window(grid, size)
    return [r * int(grid[1]) + c for r in range(r0, r0 + size) for c in range(c0, c0 + size)]


def _layout_fields(layout: Any) -> tuple[int, bool, tuple[int, int]]:
    try:
        return int(layout.num_prefix), bool(layout.has_cls), (int(layout.grid[0]), int(layout.grid[1]))
    except AttributeError as err:
        raise TypeError("layout needs num_prefix, has_cls and grid (an attnflow.tap.TokenLayout)") from err


def _checked(attn: torch.Tensor, layout: Any, src: Source) -> tuple[torch.Tensor, int, tuple[int, int]]:
    """``attn`` in float64 after the shape and [cls] checks, the number of prefix tokens and the grid."""
    num_prefix, has_cls, (gh, gw) = _layout_fields(layout)
    n = num_prefix + gh * gw
    if attn.dim() != 4 or tuple(attn.shape[-2:]) != (n, n):
        raise AggregationError(f"attention of shape {tuple(attn.shape)} does not match the token layout "
                               f"({num_prefix} prefix + {gh}x{gw} patches = [B, H, {n}, {n}])")
    check_source_fits(src, has_cls)
    return attn.detach().to(torch.float64), num_prefix, (gh, gw)


def _rows(a: torch.Tensor, num_prefix: int, grid: tuple[int, int], src: Source) -> torch.Tensor:
    """The un-normalised ``[B, P]`` weights of an own-attention source (float64)."""
    gh, gw = grid
    if src.kind == "ca":  # mean over heads and over the window's patch queries, patch keys only
        queries = [num_prefix + i for i in window_indices(grid, src.size)]
        return a[:, :, queries, num_prefix:].mean(dim=(1, 2))                          # [B, P]
    if src.kind == "patch":
        assert src.patch is not None
        row, col = src.patch
        if not (0 <= row < gh and 0 <= col < gw):
            raise AggregationError(f"{src.name} is outside the {gh}x{gw} patch grid (0-based row, col)")
        return a[:, :, num_prefix + row * gw + col, num_prefix:].mean(dim=1)           # [B, P]
    if src.kind == "cp":
        rows = a.new_zeros(a.shape[0], gh * gw)
        rows[:, window_indices(grid, src.size)] = 1.0
        return rows
    if src.kind == "cls_mean":
        return a[:, :, 0, num_prefix:].mean(dim=1)                                      # [B, P]
    heads = a[:, :, 0, num_prefix:]                                                     # [B, H, P]
    best = row_entropy(heads).argmin(dim=1)                                             # [B] (first minimum)
    return heads[torch.arange(heads.shape[0], device=heads.device), best]              # [B, P]


def aggregation_vectors(attn: torch.Tensor, layout: Any, source: str | Source, *,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Batched fixed aggregation vectors from one block's attention (the last block in the paper).

    Computed in float64 (the lowest-entropy head is chosen on float64 entropies), returned in ``dtype``. A
    ``*_sum`` source has the vector of its base (``central_sum`` that of ``central``).

    Args:
        attn: ``[B, H, N, N]`` post-softmax attention (rows = queries), ``N = num_prefix + gh * gw``.
        layout: the :class:`attnflow.tap.TokenLayout` of the forward (tokens ``[cls?, registers..., patches]``).
        source: a source of the model's own attention: ``cls_mean``, ``cls_min_entropy``, ``central``, ``caK``,
            ``cpK``, ``patch:R,C`` (or a ``*_sum`` name); a reference model's vector is the reference's own
            ``cls_mean``: call this on the reference's attention.
        dtype: output dtype.

    Returns:
        ``[B, gh * gw]`` non-negative weights over the patches (row-major), each row summing to 1.

    Raises:
        AggregationError: an unknown source, a [cls] source for a model without [cls], a window or patch outside
            the grid, or ``attn`` that does not match the layout.
    """
    src = parse_source(source) if isinstance(source, str) else source
    if src.needs_every_block:
        raise AggregationError(f"{src.name} needs every block's attention, not one block's: use "
                               "attnflow.aggregation.rollout.rollout_vectors on the rollout product")
    if src.kind not in OWN_KINDS:
        raise AggregationError(f"{src.name} is not computed from the model's own attention; use cls_mean, "
                               "cls_min_entropy, central, caK, cpK or patch:R,C")
    a, num_prefix, grid = _checked(attn, layout, src)
    rows = _rows(a, num_prefix, grid, src)
    return (rows / rows.sum(dim=1, keepdim=True)).to(dtype)


def feature_weights(attn: torch.Tensor, layout: Any, source: str | Source, *,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weights ``w`` of a source's representation ``sum_i w_i x_i``, as the official code scales it.

    * ``central`` / ``caK``: ``w = a / (sum(a) + 1e-6) / P`` with ``a`` the window's head- and query-averaged
      attention over the ``P`` patch keys: the official ``(fm * attn_ss).mean(dim=1)``.
    * ``reference:NAME`` (call on the *reference's* attention): ``w = a / P`` with ``a`` its [cls] -> patch
      attention averaged over heads, not renormalised: the official ``(fm * d_attn).mean(dim=[1, 2])``.
    * every other source, and the ``*_sum`` names: the vector itself (:func:`aggregation_vectors`), i.e. a sum
      with weights summing to 1 (``cpK``: ``1/K^2`` on the window, the window's mean).

    ``P`` counts the patches only (registers are not tokens of the official code's ViTs).

    Args:
        attn: ``[B, H, N, N]`` post-softmax attention of the aggregated model (of the reference for
            ``reference:`` sources).
        layout: the token layout of that forward.
        source: the source.
        dtype: output dtype (computed in float64).

    Returns:
        ``[B, gh * gw]`` non-negative weights (rows sum to 1 for summed sources, to about ``1/P`` or less for the
        official ``caK`` and ``reference:`` scales).
    """
    src = parse_source(source) if isinstance(source, str) else source
    if src.kind == "reference":
        ref_layout = layout
        if not bool(getattr(ref_layout, "has_cls", False)):
            raise AggregationError(f"{src.name}: the reference has no [cls] token")
        cls_mean = Source("cls_mean", "cls_mean")
        if src.summed:
            return aggregation_vectors(attn, ref_layout, cls_mean, dtype=dtype)
        a, num_prefix, grid = _checked(attn, ref_layout, cls_mean)
        return (_rows(a, num_prefix, grid, cls_mean) / (grid[0] * grid[1])).to(dtype)
    if src.kind == "ca" and not src.summed:
        a, num_prefix, grid = _checked(attn, layout, src)
        rows = _rows(a, num_prefix, grid, src)
        return (rows / (rows.sum(dim=1, keepdim=True) + OFFICIAL_EPS) / (grid[0] * grid[1])).to(dtype)
    return aggregation_vectors(attn, layout, src, dtype=dtype)


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
