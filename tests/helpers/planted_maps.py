"""Planted attention maps for the per-image map tests: softmax rows with peaks where planted."""

from __future__ import annotations

from types import SimpleNamespace

import torch

GRID = (4, 6)  # not square: catches row/column mix-ups


def layout(num_prefix: int = 3, has_cls: bool = True, grid=GRID):
    return SimpleNamespace(num_prefix=num_prefix, has_cls=has_cls, grid=grid, patch_size=(16, 16))


def planted_attention(n_heads: int = 5, num_prefix: int = 3, seed: int = 0, cls_peak=None, central_peak=None):
    """Softmax of random logits ``[H, N, N]``; ``cls_peak = (head, row, col)`` makes that head's [cls] row
    peak at that patch, ``central_peak = (row, col)`` makes every head's central-patch row peak there."""
    gh, gw = GRID
    n = num_prefix + gh * gw
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_heads, n, n, generator=g, dtype=torch.float64)
    logits[:, :, :num_prefix] += 2.0  # heavy prefix attention (registers), which the maps must ignore
    if cls_peak is not None:
        h, r, c = cls_peak
        logits[h, 0, num_prefix + r * gw + c] += 9.0
    if central_peak is not None:
        r, c = central_peak
        logits[:, num_prefix + ((gh - 1) // 2) * gw + (gw - 1) // 2, num_prefix + r * gw + c] += 9.0
    return logits.softmax(-1)
