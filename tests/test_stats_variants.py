"""attention_stats on timm ViT variants, both routes, against a brute-force reference that never uses the tap.

The reference records ``softmax(q k^T * scale + mask)`` in float64 from the *fused* ``scaled_dot_product_attention``
call inside each block's attention (what the model really computes: relative position bias and rope
included, the attention-pooling head of SigLIP not), evaluates every metric with the Python loops of
``brute_force.py`` on the geometry written out here, and takes mean and std over images. The q/k projections
are scaled up so that random-init maps are peaky: near-uniform maps hide swapped indices.
"""

import math

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import torch.nn.functional as F

from attnflow.stats import attention_stats
from attnflow.errors import AttnflowError
from attnflow.metrics import METRICS
from attnflow.tap import AttentionTap
from attnflow.vit import UnsupportedModelError
from brute_force import brute_force_metrics
from conftest import tiny_model


def _sharpen(model: torch.nn.Module, factor: float = 25.0) -> torch.nn.Module:
    """Scale every block's q/k projection so that the random-init attention is far from uniform."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("attn.qkv", "attn.q_proj", "attn.k_proj")) and isinstance(module, torch.nn.Linear):
                module.weight.mul_(factor)
    return model


def _recorded_maps(model: torch.nn.Module, images: torch.Tensor, monkeypatch) -> list[torch.Tensor]:
    """float64 maps ``[B, H, N, N]`` of every block, recomputed from the fused SDPA calls inside ``blocks[i].attn``."""
    original = F.scaled_dot_product_attention
    inside: list[int] = []
    maps: dict[int, torch.Tensor] = {}

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if inside:
            logits = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double())
            logits = logits * (q.shape[-1] ** -0.5 if scale is None else scale)
            if attn_mask is not None:
                logits = logits + attn_mask.double()
            maps[inside[-1]] = torch.softmax(logits, -1)
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)

    def enter(index: int):
        def hook(module, args) -> None:
            inside.append(index)
        return hook

    def leave(module, args, output) -> None:  # returns None: the block's output is left alone
        inside.pop()

    handles = []
    for i, block in enumerate(model.blocks):
        handles.append(block.attn.register_forward_pre_hook(enter(i)))
        handles.append(block.attn.register_forward_hook(leave))
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    try:
        with torch.no_grad():
            model(images)
    finally:
        monkeypatch.setattr(F, "scaled_dot_product_attention", original)
        for handle in handles:
            handle.remove()
    assert sorted(maps) == list(range(len(model.blocks)))
    return [maps[b] for b in range(len(model.blocks))]


def _check_against_reference(model, batches, n_prefix, has_cls, grid, stride, monkeypatch):
    """Both routes of attention_stats == per-image brute force (mean, std ddof 1, count) for every cell."""
    per_image = torch.cat([torch.stack([brute_force_metrics(a, n_prefix, has_cls, grid, stride)
                                        for a in _recorded_maps(model, x, monkeypatch)]) for x in batches], dim=1)
    mean, std = per_image.mean(1).numpy(), per_image.std(1).numpy()        # [L, H, M]
    L, H, M = mean.shape
    expected_count = np.where(np.isnan(mean), 0, per_image.shape[1])
    for fast_qk in (False, True):
        result = attention_stats(model, batches, device="cpu", progress=False, fast_qk=fast_qk, compile=False)
        frame = result.frame.set_index(["block", "head", "metric"]).sort_index()
        index = [(b, h, m) for b in range(L) for h in range(H) for m in METRICS]
        got = frame.loc[index]
        ref_mean = np.array([mean[b, h, METRICS.index(m)] for b, h, m in index])
        ref_std = np.array([std[b, h, METRICS.index(m)] for b, h, m in index])
        ref_count = np.array([expected_count[b, h, METRICS.index(m)] for b, h, m in index])
        assert len(frame) == len(index), f"fast_qk={fast_qk}: {len(frame)} rows, expected {len(index)}"
        np.testing.assert_array_equal(got["count"].to_numpy(), ref_count, err_msg=f"fast_qk={fast_qk}")
        np.testing.assert_allclose(got["mean"].to_numpy(), ref_mean, rtol=1e-4, atol=1e-6,
                                   err_msg=f"fast_qk={fast_qk}")
        np.testing.assert_allclose(got["std"].to_numpy(), ref_std, rtol=1e-3, atol=1e-5,
                                   err_msg=f"fast_qk={fast_qk}")
        assert result.meta["grid"] == list(grid) and result.meta["num_prefix_tokens"] == n_prefix


def _batches(height: int, width: int, n: int = 3) -> list[torch.Tensor]:
    images = torch.randn(n, 3, height, width, generator=torch.Generator().manual_seed(0))
    return [images[:2], images[2:]]


VARIANTS = {  # arch, model kwargs, input (h, w), prefix tokens, has [cls], patch grid, pixels per patch
    "vit_qk_norm": ("vit_small_patch16_224", {"qk_norm": True}, (64, 64), 1, True, (4, 4), (16, 16)),
    "vit_dynamic_64x96": ("vit_small_patch16_224", {"dynamic_img_size": True}, (64, 96), 1, True, (4, 6), (16, 16)),
    "vit_reg4_no_cls": ("vit_small_patch16_224", {"reg_tokens": 4, "class_token": False, "global_pool": "avg"},
                        (64, 64), 4, False, (4, 4), (16, 16)),
    "deit_distilled": ("deit_small_distilled_patch16_224", {}, (64, 64), 2, True, (4, 4), (16, 16)),
    "siglip_map_head": ("vit_base_patch16_siglip_224", {}, (64, 64), 0, False, (4, 4), (16, 16)),
    "beit_relpos": ("beit_base_patch16_224", {}, (64, 64), 1, True, (4, 4), (16, 16)),
    "eva02_rope": ("eva02_tiny_patch14_224", {"img_size": 56}, (56, 56), 1, True, (4, 4), (14, 14)),
    "naflex_reg4_64x96": ("naflexvit_base_patch16_gap", {}, (64, 96), 4, False, (4, 6), (16, 16)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_stats_match_brute_force(variant, monkeypatch):
    arch, kwargs, (h, w), n_prefix, has_cls, grid, stride = VARIANTS[variant]
    model = _sharpen(tiny_model(arch, **{"img_size": h, **kwargs}))
    _check_against_reference(model, _batches(h, w), n_prefix, has_cls, grid, stride, monkeypatch)


def test_hybrid_vit_grid_comes_from_the_cnn_stem(monkeypatch):
    """ResNet stem + ViT: a token covers the stem's stride (32 px here), not the 1-px patch of its embedding."""
    model = _sharpen(tiny_model("vit_small_r26_s32_224", img_size=128))
    with torch.no_grad():
        features = model.patch_embed.backbone(torch.zeros(1, 3, 128, 128))  # [1, C, h, w]
    grid = tuple(features.shape[-2:])
    assert grid == (4, 4) and model.patch_embed.patch_size == (1, 1)
    _check_against_reference(model, _batches(128, 128), 1, True, grid, (128 // grid[0], 128 // grid[1]), monkeypatch)


def test_differential_attention_is_unsupported():
    """timm's DiffAttention passes 2 softmax maps per head through attn_drop; their difference is the map."""
    model = tiny_model(attn_layer="diff")
    with pytest.raises(UnsupportedModelError, match=r"block 0: .*\(1, 8, 17, 17\).*\[B, 4, 17, 17\]"):
        with AttentionTap(model), torch.no_grad():
            model(torch.randn(1, 3, 64, 64))
    for fast_qk in (False, True):
        with pytest.raises(UnsupportedModelError):
            attention_stats(model, [torch.randn(1, 3, 64, 64)], device="cpu", progress=False, fast_qk=fast_qk)


def test_cross_covariance_attention_is_unsupported():
    """XCiT's attention map is channel x channel, not token x token: not a shape error, an unsupported model."""
    model = timm.create_model("xcit_nano_12_p16_224", pretrained=False, num_classes=0, img_size=64, depth=2).eval()
    with pytest.raises(UnsupportedModelError, match="block 0"):
        attention_stats(model, [torch.randn(1, 3, 64, 64)], device="cpu", progress=False)


def test_model_without_patch_embedding_is_unsupported():
    model = tiny_model()
    del model.patch_embed
    with pytest.raises(UnsupportedModelError, match="patch_embed"):
        AttentionTap(model)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_low_precision_autocast_refused_on_cpu(amp):
    """CPU autocast runs timm's softmax in bf16 (CUDA keeps it fp32): the maps would be rounded."""
    model = tiny_model()
    x = torch.randn(1, 3, 64, 64)
    with AttentionTap(model) as tap, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    assert tap.maps[0].dtype == torch.bfloat16  # the reason for the refusal (torch 2.x CPU autocast)
    with pytest.raises(AttnflowError, match=f"amp {amp} is not supported on the CPU"):
        attention_stats(model, [x], device="cpu", progress=False, amp=amp)
    assert math.isfinite(attention_stats(model, [x], device="cpu", progress=False, amp="fp32")
                         .frame["mean"].dropna().sum())


def test_a_broken_compiler_falls_back_to_the_same_numbers(monkeypatch, caplog):
    """A compile cache left broken by a killed run made every later compiled run fail: now the statistics are
    computed eagerly, with one warning, and equal the eager run."""
    import attnflow.stats as stats

    def broken_compile(fn):
        def compiled(*args):
            raise ImportError("/tmp/torchinductor_root/x.main.so: file too short")
        return compiled
    model, images = tiny_model(), torch.randn(3, 3, 64, 64)
    eager = attention_stats(model, images, device="cpu", progress=False, compile=False)
    monkeypatch.setattr(stats.torch, "compile", broken_compile)
    fallen = attention_stats(model, images, device="cpu", progress=False, compile=True)
    pd.testing.assert_frame_equal(fallen.frame, eager.frame)
    assert sum("torch.compile failed (ImportError" in r.getMessage() for r in caplog.records) == 1
