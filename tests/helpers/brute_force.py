"""Brute-force references shared by the metric and kernel tests: Python loops over one map at a time."""

import math

import numpy as np
import pytest
import torch

from attnflow.metrics import METRICS


def brute_force_head(a: np.ndarray, P: int, has_cls: bool, grid, patch) -> dict[str, float]:
    """One head of one image, written out with Python loops."""
    N = a.shape[0]
    patches = range(P, N)
    gw = grid[1]

    def entropy(row):
        s = sum(row[j] for j in patches)
        return -sum((row[j] / s) * math.log(row[j] / s) for j in patches if row[j] > 0)

    def dist(i, j):
        (ri, ci), (rj, cj) = divmod(i - P, gw), divmod(j - P, gw)
        return math.hypot((ri - rj) * patch[0], (ci - cj) * patch[1])

    out = {}
    n_p = len(patches)
    out["patch_self"] = sum(a[i, i] / sum(a[i, j] for j in patches) for i in patches) / n_p
    out["patch_patch_entropy"] = sum(entropy(a[i]) for i in patches) / n_p
    out["attention_distance"] = sum(
        sum(a[i, j] * dist(i, j) for j in patches) / sum(a[i, j] for j in patches) for i in patches) / n_p
    if has_cls:
        out["cls_self"] = a[0, 0]
        out["cls_patch_entropy"] = entropy(a[0])
        out["cls_patch_mass"] = sum(a[0, j] for j in patches)
        out["patch_cls"] = sum(a[i, 0] for i in patches) / n_p
    return out


def brute_force_metrics(attn: torch.Tensor, P: int, has_cls: bool, grid, patch) -> torch.Tensor:
    """:func:`brute_force_head` for every image and head of ``attn`` ``[B, H, N, N]`` (float64):
    ``[B, H, M]`` float64 in METRICS order, NaN where a metric is missing."""
    B, H = attn.shape[:2]
    out = torch.full((B, H, len(METRICS)), float("nan"), dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for name, value in brute_force_head(attn[b, h].double().numpy(), P, has_cls, grid, patch).items():
                out[b, h, METRICS.index(name)] = value
    return out


def published_rollout(maps: list[np.ndarray]) -> np.ndarray:
    """Attention rollout as Abnar & Zuidema's published code computes it (samiraabnar/attention_flow,
    ``compute_joint_attention(att_mat, add_residual=True)``; the ViT ports average the heads first), in numpy:
    ``att = mean over heads``, ``aug = att + I`` with each row divided by its sum, ``joint[0] = aug[0]``,
    ``joint[l] = aug[l] @ joint[l - 1]``; returns ``joint[-1]``.

    Args:
        maps: one ``[B, H, N, N]`` array per block, first block first.

    Returns:
        ``[B, N, N]`` float64.
    """
    att_mat = np.stack([np.asarray(m, np.float64).mean(axis=1) for m in maps])          # [L, B, N, N]
    aug = att_mat + np.eye(att_mat.shape[-1])[None, None]
    aug = aug / aug.sum(axis=-1)[..., None]
    joint = aug[0]
    for layer in range(1, aug.shape[0]):
        joint = np.einsum("bij,bjk->bik", aug[layer], joint)
    return joint


def brute_entropy(p) -> float:
    """Entropy (nats) of non-negative weights ``p`` renormalised to sum 1, ``0 log 0 = 0``, one term at a time."""
    s = sum(p)
    return -sum((x / s) * math.log(x / s) for x in p if x > 0)


def brute_kl(p, q, floor: float) -> float:
    """KL(p || q) of weights renormalised to sum 1, q floored at ``floor`` where it is smaller, one term at a time."""
    sp, sq = sum(p), sum(q)
    return sum(a / sp * (math.log(a / sp) - math.log(max(c / sq, floor))) for a, c in zip(p, q) if a > 0)


def assert_matches_brute_statistics(frame, vectors: dict[str, list], floor: float, *, abs_entropy: float,
                                     rel_kld: float, abs_kld: float) -> tuple:
    """Assert that ``frame``'s mean entropy of each source and mean KL of each (source, target) pair equal the
    means of :func:`brute_entropy` / :func:`brute_kl` over the per-image ``vectors`` of every source.

    Returns:
        The frame's entropy means by source and KL means by (source, target).
    """
    ent = frame[frame.metric == "entropy"].set_index("source")["mean"]
    kld = frame[frame.metric == "kld"].set_index(["source", "target"])["mean"]
    for s in vectors:
        assert ent[s] == pytest.approx(np.mean([brute_entropy(v) for v in vectors[s]]), abs=abs_entropy), s
        for t in vectors:
            want = np.mean([brute_kl(p, q, floor) for p, q in zip(vectors[s], vectors[t])])
            assert kld[(s, t)] == pytest.approx(want, rel=rel_kld, abs=abs_kld), (s, t)
    return ent, kld


def block_attention_by_hand(model: torch.nn.Module, x: torch.Tensor, b: int = -1) -> torch.Tensor:
    """Block ``b``'s attention ``[B, H, N, N]`` of a plain timm ViT (no rel-pos, no rope), recomputed by hand as
    ``softmax(q k^T * scale)`` from the block's input."""
    seen = {}
    blk = model.blocks[b]
    handle = blk.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    with torch.inference_mode():
        model(x)
        handle.remove()
        y = blk.norm1(seen["x"])
        B, N, C = y.shape
        heads = blk.attn.num_heads
        qkv = blk.attn.qkv(y).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        return ((qkv[0] * blk.attn.scale) @ qkv[1].transpose(-2, -1)).softmax(-1)


def blocks_by_hand(model: torch.nn.Module, images: torch.Tensor, upto: int) -> torch.Tensor:
    """The tokens after block ``upto`` (inclusive) of a timm ViT, its stages run one by one, without the final
    norm: ``[B, P + N, D]``."""
    x = model._pos_embed(model.patch_embed(images))
    x = model.norm_pre(model.patch_drop(x))
    for blk in model.blocks[:upto + 1]:
        x = blk(x)
    return x
