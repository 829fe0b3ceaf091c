"""Every metric against a brute-force per-image, per-head Python loop."""

import math

import pytest
import torch

from attnflow.metrics import METRICS, attention_metrics, attention_metrics_from_logits, max_entropy, patch_distances
from brute_force import brute_force_head


def _random_attention(B, H, N, seed=0, peaky=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(B, H, N, N, generator=g, dtype=torch.float64) * peaky, dim=-1)


@pytest.mark.parametrize("P,has_cls", [(1, True), (5, True), (0, False)])
def test_metrics_matchbrute_force_head(P, has_cls):
    grid, patch = (3, 4), (16, 16)
    B, H, N = 2, 3, P + 12
    attn = _random_attention(B, H, N, seed=P)
    got = attention_metrics(attn.float(), P, has_cls, patch_distances(grid, patch)).double()
    assert got.shape == (B, H, len(METRICS))
    for b in range(B):
        for h in range(H):
            ref = brute_force_head(attn[b, h].numpy(), P, has_cls, grid, patch)
            for m, name in enumerate(METRICS):
                if name in ref:
                    assert got[b, h, m].item() == pytest.approx(ref[name], rel=2e-5, abs=1e-6), name
                else:
                    assert math.isnan(got[b, h, m].item()), f"{name} must be missing, not {got[b, h, m]}"


def test_uniform_attention_has_maximal_entropy():
    n_patches = 196
    N = 1 + n_patches
    attn = torch.full((1, 2, N, N), 1.0 / N)
    got = attention_metrics(attn, 1, True, patch_distances((14, 14), (16, 16)))
    ent = got[..., METRICS.index("cls_patch_entropy")]
    torch.testing.assert_close(ent, torch.full_like(ent, math.log(196)), atol=1e-5, rtol=0)
    assert max_entropy(196) == pytest.approx(5.278, abs=1e-3)
    pp = got[..., METRICS.index("patch_patch_entropy")]
    torch.testing.assert_close(pp, torch.full_like(pp, math.log(196)), atol=1e-5, rtol=0)
    torch.testing.assert_close(got[..., METRICS.index("cls_self")], torch.full((1, 2), 1.0 / N))
    torch.testing.assert_close(got[..., METRICS.index("patch_self")], torch.full((1, 2), 1.0 / 196))


def test_one_hot_attention():
    """Each token attends only to itself: zero entropy, patch_self 1, zero distance - with no epsilon NaNs."""
    N = 1 + 9
    attn = torch.eye(N).expand(1, 1, N, N).clone()
    attn[0, 0, 0] = torch.tensor([0.5] + [0.5] + [0.0] * 8)  # [cls]: half self, half patch 1
    got = dict(zip(METRICS, attention_metrics(attn, 1, True, patch_distances((3, 3), (14, 14)))[0, 0].tolist()))
    assert got["cls_self"] == 0.5 and got["cls_patch_mass"] == 0.5
    assert got["cls_patch_entropy"] == 0.0
    assert got["patch_self"] == 1.0 and got["patch_patch_entropy"] == 0.0
    assert got["attention_distance"] == 0.0 and got["patch_cls"] == 0.0


def test_patch_distances_in_pixels():
    d = patch_distances((2, 3), (16, 16))
    assert d.shape == (6, 6)
    assert d[0, 1].item() == 16.0 and d[0, 3].item() == 16.0
    assert d[0, 5].item() == pytest.approx(math.hypot(16, 32))


@pytest.mark.parametrize("P,has_cls", [(1, True), (5, True), (0, False)])
def test_metrics_from_logits_matchbrute_force_head(P, has_cls):
    """The fused-softmax formulation gives the same numbers as loops over softmax(logits)."""
    grid, patch = (3, 4), (14, 14)
    g = torch.Generator().manual_seed(7 + P)
    logits = torch.randn(2, 3, P + 12, P + 12, generator=g, dtype=torch.float64) * 4  # peaky rows
    got = attention_metrics_from_logits(logits.float(), P, has_cls, patch_distances(grid, patch)).double()
    attn = torch.softmax(logits, -1)
    for b in range(2):
        for h in range(3):
            ref = brute_force_head(attn[b, h].numpy(), P, has_cls, grid, patch)
            for m, name in enumerate(METRICS):
                if name in ref:
                    assert got[b, h, m].item() == pytest.approx(ref[name], rel=1e-5, abs=1e-6), name
                else:
                    assert math.isnan(got[b, h, m].item())
