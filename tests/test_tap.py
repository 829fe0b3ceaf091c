"""AttentionTap against a manual non-fused attention computation, for every architecture family."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from attnflow.tap import AttentionTap, HookNotFiredError
from attnflow.vit import UnsupportedModelError
from conftest import tiny_model

FAMILIES = {
    "vit": ("vit_small_patch16_224", {}, 1, True),
    "deit_distilled": ("deit_small_distilled_patch16_224", {}, 2, True),
    "beit": ("beit_base_patch16_224", {}, 1, True),
    "beitv2_shared_relpos": ("beitv2_base_patch16_224",
                             {"use_rel_pos_bias": False, "use_shared_rel_pos_bias": True}, 1, True),
    "eva02_rope": ("eva02_tiny_patch14_224", {}, 1, True),
    "dinov2": ("vit_small_patch14_dinov2", {}, 1, True),
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", {}, 5, True),
    "no_cls_gap": ("vit_small_patch16_224", {"class_token": False, "global_pool": "avg"}, 0, False),
}


def _reference_maps(model: nn.Module, x: torch.Tensor, monkeypatch) -> list[torch.Tensor]:
    """Run the model with timm's *fused* path and recompute softmax(q k^T * scale + mask) by hand."""
    original = F.scaled_dot_product_attention
    maps = []

    def recording_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        s = q.shape[-1] ** -0.5 if scale is None else scale
        logits = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * s
        if attn_mask is not None:
            logits = logits + attn_mask.double()
        maps.append(torch.exp(logits - logits.amax(-1, keepdim=True)))
        maps[-1] = maps[-1] / maps[-1].sum(-1, keepdim=True)
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    with torch.no_grad():
        model(x)
    monkeypatch.setattr(F, "scaled_dot_product_attention", original)
    return maps


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tap_matches_manual_attention(family, monkeypatch):
    arch, kwargs, n_prefix, has_cls = FAMILIES[family]
    model = tiny_model(arch, **kwargs)
    assert all(blk.attn.fused_attn for blk in model.blocks), "timm should default to fused attention"
    x = torch.randn(2, 3, 64, 64)
    reference = _reference_maps(model, x, monkeypatch)
    assert len(reference) == len(model.blocks)

    with AttentionTap(model) as tap, torch.no_grad():
        out = model(x)
        assert not any(blk.attn.fused_attn for blk in model.blocks)
    maps = tap.maps
    assert all(blk.attn.fused_attn for blk in model.blocks), "fused attention must be restored"
    assert len(maps) == len(model.blocks)
    for got, ref in zip(maps, reference):
        assert got.shape == (2, 4, n_prefix + 16, n_prefix + 16)
        torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=1e-5)
    assert tap.layout.num_prefix == n_prefix and tap.layout.has_cls == has_cls
    assert tap.layout.grid == (4, 4)
    with torch.no_grad():  # the tap does not change what the model computes
        torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)


def test_manual_qkv_softmax_vit():
    """Fully manual: q, k from the block's own weights, softmax written out."""
    model = tiny_model("vit_small_patch16_224")
    x = torch.randn(1, 3, 64, 64)
    inputs = []
    handle = model.blocks[1].attn.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    with AttentionTap(model, blocks=[-1]) as tap, torch.no_grad():
        model(x)
    handle.remove()
    attn = model.blocks[1].attn
    tokens = inputs[0][0]  # [N, D]
    N, D = tokens.shape
    H = attn.num_heads
    qkv = tokens @ attn.qkv.weight.T + attn.qkv.bias
    q, k = qkv[:, :D].reshape(N, H, D // H), qkv[:, D:2 * D].reshape(N, H, D // H)
    for h in range(H):
        logits = (q[:, h] @ k[:, h].T) / (D // H) ** 0.5
        expected = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
        torch.testing.assert_close(tap.maps[0][0, h], expected, atol=1e-6, rtol=1e-5)
    assert tap.block_indices == [1]


def test_hooks_removed_when_forward_raises():
    model = tiny_model()
    with pytest.raises(RuntimeError):
        with AttentionTap(model):
            model(torch.randn(1, 5, 64, 64))  # wrong channel count
    assert all(blk.attn.fused_attn for blk in model.blocks)
    assert not any(blk.attn.attn_drop._forward_pre_hooks for blk in model.blocks)
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_silent_hook_is_an_error():
    model = tiny_model()

    class Bypass(nn.Module):  # an attention that never calls attn_drop
        def __init__(self, inner):
            super().__init__()
            self.inner, self.attn_drop, self.fused_attn, self.num_heads = inner, nn.Identity(), True, 4

        def forward(self, x, **kw):
            self.inner.fused_attn = True
            return self.inner(x, **kw)

    model.blocks[1].attn = Bypass(model.blocks[1].attn)
    with pytest.raises(HookNotFiredError, match=r"blocks \[1\] did not fire"):
        with AttentionTap(model), torch.no_grad():
            model(torch.randn(1, 3, 64, 64))


def test_callback_mode_streams_without_storing():
    model = tiny_model()
    seen = []
    with AttentionTap(model, callback=lambda i, a: seen.append((i, a.sum(-1)))) as tap, torch.no_grad():
        model(torch.randn(3, 3, 64, 64))
    assert [i for i, _ in seen] == [0, 1]
    for _, rowsum in seen:
        torch.testing.assert_close(rowsum, torch.ones_like(rowsum))
    with pytest.raises(RuntimeError, match="not stored"):
        tap.maps


def test_unsupported_models_rejected():
    with pytest.raises(UnsupportedModelError, match="no `blocks`"):
        AttentionTap(nn.Sequential(nn.Conv2d(3, 8, 3)))
    model = tiny_model()
    model.blocks[0].attn = nn.MultiheadAttention(32, 4)
    with pytest.raises(UnsupportedModelError, match="block 0"):
        AttentionTap(model)
