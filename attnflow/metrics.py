"""Per-image, per-head attention metrics of one block: pure functions of one attention map.

Definitions (paper Sec. 4, Eq. 3 and Eq. 6, Appendix C.1). ``a`` is the post-softmax map of one head,
token 0 is [cls] (when present), tokens ``P..N-1`` are the patches (``P`` prefix tokens), and for a query
``i`` the patch mass is ``s_i = sum_{j in patches} a[i, j]``:

========================  ============================================================================
``cls_self``              ``a[cls, cls]`` - attention the [cls] token pays to itself (Fig. 3).
``cls_patch_entropy``     Shannon entropy (nats) of the [cls] row renormalised over patch keys (Fig. 4).
                          Bounded by ``ln(n_patches)`` (5.278 for 196 patches).
``cls_patch_mass``        ``s_cls``: total attention of [cls] to patches.
``patch_cls``             ``a[i, cls]`` averaged over patch queries ``i``.
``patch_self``            ``a[i, i] / s_i`` averaged over patch queries (Fig. 5).
``patch_patch_entropy``   entropy of each patch row renormalised over patch keys, averaged over patch
                          queries (Fig. 6).
``attention_distance``    ``sum_j a[i, j] d(i, j) / s_i`` averaged over patch queries, with ``d`` the
                          Euclidean distance between patch centres in input pixels (the "mean attention
                          distance" of Dosovitskiy et al. and Park et al. 2023), over patch keys only.
========================  ============================================================================

Entropies are exact, without an epsilon: ``H = log s - sum_j xlogy(a_j, a_j) / s``. Models without [cls]
(I-JEPA, CAPI) report the [cls] metrics as NaN, which the reducer records as missing (count 0).
"""

from __future__ import annotations

import math

import torch

METRICS: tuple[str, ...] = (
    "cls_self",
    "cls_patch_entropy",
    "cls_patch_mass",
    "patch_cls",
    "patch_self",
    "patch_patch_entropy",
    "attention_distance",
)
"""Every metric, in the column order of :func:`attention_metrics`."""

CLS_METRICS: frozenset[str] = frozenset({"cls_self", "cls_patch_entropy", "cls_patch_mass", "patch_cls"})
"""Metrics that need a [cls] token."""

PAPER_METRICS: tuple[str, ...] = ("cls_self", "cls_patch_entropy", "patch_self", "patch_patch_entropy")
"""The four metrics of the paper's Figs. 3-6 (and 10-13)."""

ENTROPY_METRICS: frozenset[str] = frozenset({"cls_patch_entropy", "patch_patch_entropy"})
"""Metrics bounded by ``ln(n_patches)``."""


def max_entropy(n_patches: int) -> float:
    """Upper bound of the patch entropies: ``ln(n_patches)`` nats (5.278 for 196 patches)."""
    return math.log(n_patches)


def valid_metrics(has_cls: bool) -> torch.Tensor:
    """``[M]`` bool mask of the metrics a model reports (all but the [cls] ones when it has no [cls])."""
    return torch.tensor([has_cls or m not in CLS_METRICS for m in METRICS])


def patch_distances(grid: tuple[int, int], patch_size: tuple[float, float],
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Euclidean distances between patch centres, in input pixels.

    Returns:
        ``[n_patches, n_patches]`` float32 tensor, patches in row-major order.
    """
    gh, gw = grid
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float64) * patch_size[0],
                            torch.arange(gw, dtype=torch.float64) * patch_size[1], indexing="ij")
    centres = torch.stack([ys.flatten(), xs.flatten()], dim=-1)  # [Np, 2]
    return torch.cdist(centres, centres).to(device=device, dtype=torch.float32)


def attention_metrics(attn: torch.Tensor, num_prefix: int, has_cls: bool,
                      distances: torch.Tensor) -> torch.Tensor:
    """Every metric of :data:`METRICS` for each image and head of one block.

    Args:
        attn: post-softmax attention ``[B, H, N, N]`` with ``N = num_prefix + n_patches``.
        num_prefix: number of prefix tokens ([cls] and registers), which precede the patches.
        has_cls: whether token 0 is [cls]; if not, the [cls] metrics are NaN.
        distances: ``[n_patches, n_patches]`` from :func:`patch_distances`.

    Returns:
        ``[B, H, M]`` float32 tensor, column ``m`` holding ``METRICS[m]``.
    """
    attn = attn.float()
    P = num_prefix
    to_patches = attn[..., P:]                                   # [B, H, N, Np]
    mass = to_patches.sum(-1)                                    # [B, H, N]
    entropy = row_entropy(to_patches, mass)                      # [B, H, N]

    pp = attn[..., P:, P:]                                       # [B, H, Np, Np]
    pmass = mass[..., P:]                                        # [B, H, Np]
    patch_self = (pp.diagonal(dim1=-2, dim2=-1) / pmass).mean(-1)
    patch_entropy = entropy[..., P:].mean(-1)
    distance = ((pp * distances).sum(-1) / pmass).mean(-1)

    patch_metrics = {"patch_self": patch_self, "patch_patch_entropy": patch_entropy, "attention_distance": distance}
    if not has_cls:
        return _stack(patch_metrics, None)
    return _stack(patch_metrics, {"cls_self": attn[..., 0, 0], "cls_patch_entropy": entropy[..., 0],
                                  "cls_patch_mass": mass[..., 0], "patch_cls": attn[..., P:, 0].mean(-1)})


def _stack(patch_metrics: dict[str, torch.Tensor], cls_metrics: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """``[B, H, M]`` in :data:`METRICS` order; the [cls] columns are NaN when ``cls_metrics`` is ``None``."""
    nan = torch.full_like(patch_metrics["patch_self"], float("nan"))
    columns = patch_metrics | (cls_metrics or {m: nan for m in CLS_METRICS})
    return torch.stack([columns[m] for m in METRICS], dim=-1)


def attention_metrics_from_logits(logits: torch.Tensor, num_prefix: int, has_cls: bool,
                                  distances: torch.Tensor) -> torch.Tensor:
    """:func:`attention_metrics` of ``softmax(logits)``, from row sums of exponentials.

    Mathematically identical to ``attention_metrics(logits.softmax(-1), ...)`` (agreement ~1e-6 relative in
    fp32), but every quantity is a row reduction, so a compiler fuses the softmax and all metrics into passes
    over the logits without materialising the fp32 map; one exp per logit. The patch keys use
    ``u_j = l_j - max_{patches} l``: with ``ep = sum_{patches} exp(u_j)`` the entropy is
    ``log(ep) - sum exp(u_j) u_j / ep``, and as ``ep >= 1`` these stay exact even when a prefix token takes all
    but ~e^-100 of a row (where the fp32 map itself underflows to zero over the patches). The few prefix keys
    are exponentiated apart, relative to the row max. The Triton kernel (:mod:`attnflow.kernels.qk_metrics`)
    uses the same algebra.

    Args:
        logits: pre-softmax scores ``[B, H, N, N]`` (any float dtype; computed in fp32).
        num_prefix, has_cls, distances: as for :func:`attention_metrics`.

    Returns:
        ``[B, H, M]`` float32, columns in :data:`METRICS` order.
    """
    P = num_prefix
    if has_cls and P < 1:
        raise ValueError("has_cls needs num_prefix >= 1: [cls] is the first prefix token")
    logits = logits.float()
    to_patches = logits[..., P:]                                    # [B, H, N, Np]
    patch_max = to_patches.amax(-1)                                 # [B, H, N]
    u = to_patches - patch_max[..., None]                           # <= 0
    e_patch = u.exp()
    ep = e_patch.sum(-1)                                            # >= 1
    entropy = ep.log() - (e_patch * u).sum(-1) / ep
    if P:  # the few prefix keys apart; z is the softmax denominator relative to the row max
        prefix = logits[..., :P]                                    # [B, H, N, P]
        row_max = torch.maximum(prefix.amax(-1), patch_max)
        e_prefix = (prefix - row_max[..., None]).exp()
        patch_share = ep * (patch_max - row_max).exp()
        z = e_prefix.sum(-1) + patch_share
    else:
        patch_share = z = ep
    mass = patch_share / z

    ep_rows = ep[..., P:]                                           # [B, H, Np]
    patch_self = (e_patch[..., P:, :].diagonal(dim1=-2, dim2=-1) / ep_rows).mean(-1)
    distance = ((e_patch[..., P:, :] * distances).sum(-1) / ep_rows).mean(-1)
    patch_entropy = entropy[..., P:].mean(-1)
    patch_metrics = {"patch_self": patch_self, "patch_patch_entropy": patch_entropy, "attention_distance": distance}
    if not has_cls:
        return _stack(patch_metrics, None)
    to_cls = e_prefix[..., 0] / z                                   # [B, H, N]
    return _stack(patch_metrics, {"cls_self": to_cls[..., 0], "cls_patch_entropy": entropy[..., 0],
                                  "cls_patch_mass": mass[..., 0], "patch_cls": to_cls[..., P:].mean(-1)})


def row_entropy(weights: torch.Tensor, total: torch.Tensor | None = None) -> torch.Tensor:
    """Exact Shannon entropy (nats) of non-negative rows renormalised to sum to 1, ``0 log 0 = 0``: the one
    definition behind every entropy attnflow reports (attention rows, aggregation vectors, map titles).

    ``H = log s - sum(a log a) / s`` with ``s = sum(a)`` (``total``, when the caller has it), in the input's dtype
    (pass float64 for exactness).

    Shape:
        ``[..., K] -> [...]`` (``total``: ``[...]``).
    """
    s = weights.sum(dim=-1) if total is None else total
    return torch.log(s) - sum_xlogx(weights) / s


def sum_xlogx(weights: torch.Tensor) -> torch.Tensor:
    """``torch.special.xlogy(w, w).sum(-1)``: ``sum_j w_j log w_j`` with ``0 log 0 = 0``, in the input's dtype.

    Computed as a vectorised ``log`` whose ``-inf`` (from ``w = 0``) is clamped to the dtype's lowest finite value
    (so that ``0 * log 0`` is 0; every finite log, subnormal weights' included, is kept), then multiplied and
    summed: the same per-element product as ``xlogy`` to within one ulp of the log (NaN and negative weights
    still give NaN), about 3x faster on the CPU, where ``xlogy`` is not vectorised. Without autograd the log's
    buffer takes the product in place (one ``[..., K]`` temporary instead of two).

    Shape:
        ``[..., K] -> [...]``.
    """
    log_w = torch.log(weights)
    log_w = log_w.clamp_min_(torch.finfo(log_w.dtype).min)
    if log_w.requires_grad:
        return (weights * log_w).sum(dim=-1)
    return log_w.mul_(weights).sum(dim=-1)
