"""Table 5's non-trainable aggregations against the paper's official code (github.com/gmum/beyond_cls,
``models_vit.py``, ``VisionTransformer.forward_features``): its ``caK`` / ``cpK`` / ``dino`` branches are
written out below as it computes them, on tiny tensors and on a tiny ViT, and attnflow must give the same windows,
vectors and features (``central`` = ``ca1``, ``reference:NAME`` = ``dino``)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from attnflow.aggregation.capture import FixedAggregationEncoder, fixed_aggregation_features
from attnflow.aggregation.sources import AggregationError, Source, parse_source, source_label
from attnflow.aggregation.statistics import AggregationStats
from attnflow.aggregation.vectors import aggregation_vectors, central_window, feature_weights
from attnflow.encode import TokenEncoder
from attnflow.maps import patch_maps
from attnflow.tap import AttentionTap
from conftest import tiny_model
from probe_data import one_thread  # noqa: F401  (autouse fixture)


# ---- the official code, as written in models_vit.py (square grids, [cls] first, no registers) ----------------

def official_window(hw: int, k: int) -> range:
    """Rows (and columns) of the official ``cpK`` / ``caK`` window: ``c = hw // 2``,
    ``s = c - ceil(K/2)``, ``e = c + floor(K/2)``, ``fm[:, s:e, s:e]``."""
    c = hw // 2
    return range(c - math.ceil(k / 2), c + math.floor(k / 2))


def official_ca(attn: torch.Tensor, fm: torch.Tensor, k: int, start: int | None = None) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """The official ``caK`` branch: ``(ret, attn_ss)``. ``start`` overrides the window's first row/column (the
    odd-grid case, see :func:`expected_window`)."""
    b, t = fm.shape[0], fm.shape[1]
    hw = int(np.sqrt(t))
    s = official_window(hw, k).start if start is None else start
    e = s + k
    a = attn.mean(dim=1)[:, 1:, 1:].reshape(b, hw, hw, hw ** 2)
    attn_ss = a[:, s:e, s:e].mean(dim=[1, 2])
    attn_ss_denom = attn_ss.sum(dim=1, keepdim=True)
    attn_ss = attn_ss / (attn_ss_denom + 1e-6)
    return (fm * attn_ss.unsqueeze(2)).mean(dim=1), attn_ss


def official_cp(fm: torch.Tensor, k: int, start: int | None = None) -> torch.Tensor:
    """The official ``cpK`` branch (``start`` as in :func:`official_ca`)."""
    b, t, d = fm.shape
    hw = int(np.sqrt(t))
    s = official_window(hw, k).start if start is None else start
    return fm.reshape(b, hw, hw, d)[:, s:s + k, s:s + k].mean(dim=[1, 2])


def official_dino(oracle_attn: torch.Tensor, fm: torch.Tensor) -> torch.Tensor:
    """The official ``dino`` branch: the oracle's last-block [cls] -> patch attention, per head, weighs the
    patch tokens and everything is averaged over heads and patches."""
    d_attn = oracle_attn[:, :, 0, 1:].unsqueeze(3)
    return (fm.unsqueeze(1) * d_attn).mean(dim=[1, 2])


def expected_window(hw: int, k: int) -> int:
    """The window attnflow documents: the official one, except for odd K on an odd grid, where the official
    window sits one patch up-left of the centre and attnflow's is centred (one patch down-right of it)."""
    start = official_window(hw, k).start
    return start + 1 if hw % 2 and k % 2 else start


# ---- helpers -------------------------------------------------------------------------------------------------

def layout(hw: int, num_prefix: int = 1, has_cls: bool = True):
    return SimpleNamespace(num_prefix=num_prefix, has_cls=has_cls, grid=(hw, hw), patch_size=(16, 16))


def random_attention(b: int, h: int, n: int, seed: int = 0, cls_self: list[float] | None = None) -> torch.Tensor:
    """Softmax of random logits ``[b, h, n, n]`` in float64; ``cls_self[i]`` raises image i's [cls] -> [cls]
    logit so that its [cls] -> patch mass is well below 1."""
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(b, h, n, n, generator=g, dtype=torch.float64)
    for i, boost in enumerate(cls_self or []):
        logits[i, :, 0, 0] += boost
    return logits.softmax(-1)


def tokens(b: int, t: int, d: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, t, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def weighted(weights: torch.Tensor, fm: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bp,bpd->bd", weights, fm)


# ---- 1. the central patch -------------------------------------------------------------------------------------

@pytest.mark.parametrize("hw", [14, 16, 15])
def test_central_patch_and_windows_on_even_and_odd_grids(hw):
    for k in (1, 2, 3, 4):
        start = expected_window(hw, k)
        assert central_window((hw, hw), k) == (start, start)
        if hw % 2 == 0 or k % 2 == 0:  # the official window itself
            assert start == official_window(hw, k).start
        else:  # odd K on an odd grid: centred, where the official one is one patch up-left
            assert start + (k - 1) / 2 == (hw - 1) / 2
    # the central patch: the official ca1's (6, 6) / (7, 7) on even grids, the true centre (7, 7) of 15x15
    assert central_window((hw, hw), 1) == {14: (6, 6), 16: (7, 7), 15: (7, 7)}[hw]
    attn = random_attention(1, 2, 1 + hw * hw, seed=hw)
    maps = patch_maps(attn[0], layout(hw))
    assert maps.central_patch == central_window((hw, hw), 1)
    fm = tokens(1, hw * hw)
    _, want = official_ca(attn, fm, 1, start=expected_window(hw, 1))
    np.testing.assert_allclose(maps.central.reshape(-1), (want / want.sum()).numpy()[0], rtol=0, atol=1e-14)


def test_central_on_a_non_square_grid_takes_each_axis_alone():
    lay = SimpleNamespace(num_prefix=1, has_cls=True, grid=(4, 7))
    assert central_window((4, 7), 1) == (1, 3) and central_window((4, 7), 2) == (1, 2)
    attn = random_attention(2, 3, 1 + 28)
    want = attn[:, :, 1 + 1 * 7 + 3, 1:].mean(dim=1)
    got = aggregation_vectors(attn, lay, "central", dtype=torch.float64)
    np.testing.assert_allclose(got.numpy(), (want / want.sum(1, keepdim=True)).numpy(), rtol=0, atol=1e-14)
    with pytest.raises(AggregationError, match="does not fit a 4x7 patch grid"):
        aggregation_vectors(attn, lay, "ca5")


# ---- 2. the feature scale --------------------------------------------------------------------------------------

@pytest.mark.parametrize("hw", [14, 15])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_ca_and_cp_features_equal_the_official_branches(hw, k):
    attn = random_attention(3, 2, 1 + hw * hw, seed=k)
    fm = tokens(3, hw * hw)
    start = expected_window(hw, k)
    want_ca, attn_ss = official_ca(attn, fm, k, start=start)
    lay = layout(hw)
    got = weighted(feature_weights(attn, lay, f"ca{k}", dtype=torch.float64), fm)
    np.testing.assert_allclose(got.numpy(), want_ca.numpy(), rtol=1e-12, atol=1e-15)
    # the vector (statistics, maps) is the official window attention renormalised exactly
    vec = aggregation_vectors(attn, lay, f"ca{k}", dtype=torch.float64)
    np.testing.assert_allclose(vec.numpy(), (attn_ss / attn_ss.sum(1, keepdim=True)).numpy(), rtol=0, atol=1e-14)
    # cpK: the plain mean of the window's tokens, vector 1/K^2 on the window
    got_cp = weighted(feature_weights(attn, lay, f"cp{k}", dtype=torch.float64), fm)
    np.testing.assert_allclose(got_cp.numpy(), official_cp(fm, k, start=start).numpy(), rtol=1e-12, atol=1e-15)
    cp = aggregation_vectors(attn, lay, f"cp{k}", dtype=torch.float64).reshape(3, hw, hw)
    assert torch.equal(cp[:, start:start + k, start:start + k], torch.full((3, k, k), 1 / k ** 2, dtype=cp.dtype))
    assert cp.sum() == pytest.approx(3.0) and (cp > 0).sum() == 3 * k * k
    # central is ca1; its summed variant is the old scale: N (s + 1e-6) / s times the official feature
    if k == 1:
        np.testing.assert_allclose(weighted(feature_weights(attn, lay, "central", dtype=torch.float64), fm).numpy(),
                                   want_ca.numpy(), rtol=1e-12, atol=1e-15)
        summed = weighted(feature_weights(attn, lay, "central_sum", dtype=torch.float64), fm)
        np.testing.assert_allclose(summed.numpy(), weighted(vec, fm).numpy(), rtol=1e-12, atol=1e-15)
        assert not np.allclose(summed.numpy(), want_ca.numpy(), rtol=1e-3)


def test_reference_feature_keeps_each_images_cls_mass():
    hw = 14
    oracle = random_attention(3, 4, 1 + hw * hw, seed=5, cls_self=[0.0, 4.0, 8.0])   # [cls] -> patch mass falls
    mass = oracle[:, :, 0, 1:].sum(-1).mean(-1)                                         # per image, below 1
    assert (mass < 0.999).all() and mass[2] < 0.5 * mass[0]
    fm = tokens(3, hw * hw)
    want = official_dino(oracle, fm)
    source = parse_source("reference:dino-vit-b16")
    got = weighted(feature_weights(oracle, layout(hw), source, dtype=torch.float64), fm)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-12, atol=1e-15)
    # the renormalised, summed variant is the official feature times N / mass, image by image
    summed = weighted(feature_weights(oracle, layout(hw), "reference_sum:dino-vit-b16", dtype=torch.float64), fm)
    np.testing.assert_allclose(summed.numpy(), (want * (hw * hw) / mass[:, None]).numpy(), rtol=1e-12)


def test_official_scale_is_not_absorbed_by_the_batchnorm():
    """BatchNorm1d(affine=False, eps=1e-6) of a feature N times smaller is that of the summed feature with eps
    N^2 times larger: the scale changes the normalised inputs of the classifier."""
    hw = 14
    attn = random_attention(8, 2, 1 + hw * hw, seed=3)
    fm = tokens(8, hw * hw, d=4) * 1e-2
    bn = torch.nn.BatchNorm1d(4, affine=False, eps=1e-6).double().train()
    official = bn(weighted(feature_weights(attn, layout(hw), "central", dtype=torch.float64), fm))
    summed = weighted(feature_weights(attn, layout(hw), "central_sum", dtype=torch.float64), fm)
    assert not torch.allclose(official, bn(summed), atol=1e-3)
    big_eps = torch.nn.BatchNorm1d(4, affine=False, eps=1e-6 * (hw * hw) ** 2).double().train()
    torch.testing.assert_close(official, big_eps(summed), rtol=1e-4, atol=1e-6)  # up to the +1e-6 of attn_ss


def test_old_central_stays_reachable_as_patch_7_7():
    """attnflow's previous ``central`` on 14x14 (patch (7, 7), renormalised sum) is ``patch:7,7``."""
    hw = 14
    attn = random_attention(2, 3, 1 + hw * hw, seed=9)
    fm = tokens(2, hw * hw)
    row = attn[:, :, 1 + 7 * hw + 7, 1:].mean(dim=1)
    old = weighted(row / row.sum(1, keepdim=True), fm)
    np.testing.assert_allclose(weighted(feature_weights(attn, layout(hw), "patch:7,7", dtype=torch.float64),
                                        fm).numpy(), old.numpy(), rtol=1e-12)
    with pytest.raises(AggregationError, match="outside the 14x14 patch grid"):
        aggregation_vectors(attn, layout(hw), "patch:14,0")


# ---- on a tiny ViT, through the probe's encoder ----------------------------------------------------------------

def tiny_forward(model, images):
    """Tokens of the last block ([cls] first, no final norm, as the official code) and its attention."""
    with AttentionTap(model, blocks=[-1]) as tap, torch.no_grad():
        fm = TokenEncoder(model)(images)
        return fm, tap.maps[0]


@pytest.mark.parametrize("img_size", [64, 80])  # 4x4 (even) and 5x5 (odd) grids
def test_fixed_features_of_a_tiny_vit_equal_the_official_code(img_size):
    model = tiny_model(img_size=img_size)
    images = torch.randn(3, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    x, attn = tiny_forward(model, images)
    hw = img_size // 16
    fm = x[:, 1:]
    for k in range(1, hw + 1):
        start = expected_window(hw, k)
        for name, want in ((f"ca{k}", official_ca(attn, fm, k, start=start)[0]),
                           (f"cp{k}", official_cp(fm, k, start=start))):
            got = fixed_aggregation_features(model, images, name)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(fixed_aggregation_features(model, images, "central"),
                               official_ca(attn, fm, 1, start=expected_window(hw, 1))[0], rtol=1e-5, atol=1e-6)
    # attn-mn / attn-lcte (unchanged): renormalised [cls] rows, summed
    mean_map = attn[:, :, 0, 1:].mean(dim=1).unsqueeze(2)
    torch.testing.assert_close(fixed_aggregation_features(model, images, "cls_mean"),
                               (mean_map / mean_map.sum(dim=1, keepdim=True) * fm).sum(dim=1), rtol=1e-5, atol=1e-6)


def test_reference_feature_of_a_tiny_vit_equals_the_official_dino_branch():
    model, oracle = tiny_model(img_size=64), tiny_model(img_size=64, seed=3)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    x, _ = tiny_forward(model, images)
    _, oracle_attn = tiny_forward(oracle, images)
    assert (oracle_attn[:, :, 0, 1:].sum(-1) < 0.999).all()  # the oracle's [cls] keeps some mass on itself
    want = official_dino(oracle_attn, x[:, 1:])
    got = fixed_aggregation_features(model, images, "reference:oracle", reference=oracle)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    encoder = FixedAggregationEncoder(model, "reference:oracle", reference=oracle)
    torch.testing.assert_close(encoder(images)[:, 0], want, rtol=1e-5, atol=1e-7)
    assert encoder.describe()["feature"] == "official scale"


def test_new_windows_have_entropy_and_kld():
    """caK and cpK have vectors: entropy ln(K^2) for cpK, KL(cpK || caK) by hand."""
    hw = 6
    attn = random_attention(2, 2, 1 + hw * hw, seed=4)
    lay = layout(hw)
    names = ["cp2", "ca2", "central"]
    vectors = {s: aggregation_vectors(attn, lay, s, dtype=torch.float64) for s in names}
    stats = AggregationStats(names)
    stats.update(vectors)
    out = stats.compute()
    assert out["entropy"][0] == pytest.approx(math.log(4), abs=1e-12)
    q = vectors["ca2"]
    window = [r * hw + c for r in (2, 3) for c in (2, 3)]
    kl = [sum(0.25 * math.log(0.25 / float(q[i, j])) for j in window) for i in range(2)]
    assert out["kld"][0, 1] == pytest.approx(sum(kl) / 2, rel=1e-12)
    assert out["q_zero"][1, 0] == 2  # KL(ca2 || cp2): cp2 is 0 off its window, floored and counted


def test_source_names_and_labels():
    assert parse_source("central") == Source("central", "ca", size=1, summed=False)
    assert parse_source("ca3-sum") == Source("ca3_sum", "ca", size=3, summed=True)
    assert parse_source("ca3").official_scale
    assert parse_source("cp4").summed and not parse_source("cp4").official_scale
    assert parse_source("reference_sum:dino-vit-b16").summed
    assert parse_source("reference-sum:x").name == "reference_sum:x"
    assert parse_source("patch: 7 , 7").name == "patch:7,7"
    with pytest.raises(AggregationError, match="already the plain mean"):
        parse_source("cp2_sum")
    with pytest.raises(AggregationError, match="patch:<row>,<col>"):
        parse_source("patch:7")
    with pytest.raises(AggregationError, match="did you mean ca2"):
        parse_source("ca2x")
    assert source_label("central", "MAE") == "MAE central patch token attention"
    assert source_label("central_sum", "MAE") == "MAE central patch token attention (renormalised sum)"
    assert source_label("ca2", "MAE") == "MAE central 2x2 patch token attention"
    assert source_label("cp3", "MAE") == "Mean of MAE's central 3x3 patch tokens"
    assert source_label("reference_sum:d", "MAE", "DINO") == "Average DINO [cls] token attention (renormalised sum)"
