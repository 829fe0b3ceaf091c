"""attnflow's CAPI encoder vs a reference written from CAPI's model.py, and the attention tap contract.

The reference below reads the official key layout (``backbone.encoder.blocks.{i}.residual1.fn.q_proj``...)
and computes the encoder step by step: patchify with ``unfold`` and a matrix product, registers placed on
the border of the unit square, 2-D RoPE ``x cos(c F) + rotate_half(x) sin(c F)``, one softmax per head,
RMSNorm by hand, a parameter-free final RMSNorm.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnflow.models.load import load_model

D, H, DEPTH, P, R = 32, 4, 2, 14, 16
ARCH = dict(depth=DEPTH, embed_dim=D, num_heads=H, mlp_ratio=4.0)


def official_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict in the layout of CAPI's released files (RoPE frequencies as initialised)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    hd = D // H
    base = 7 * (7 / 7e-4) ** torch.linspace(0, -1, hd // 4)
    freqs = torch.zeros(2, hd)
    freqs[0, : hd // 2] = torch.cat([base, base])
    freqs[1, hd // 2:] = torch.cat([base, base])
    sd = {"backbone.patch_embed.weight": rnd(D, 3, P, P, scale=0.05), "backbone.patch_embed.bias": rnd(D),
          "backbone.registers": rnd(1, R, D), "backbone.mask_token": rnd(1, D)}
    for i in range(DEPTH):
        pre = f"backbone.encoder.blocks.{i}."
        sd[pre + "residual1.norm.weight"] = 1 + rnd(D)
        for name in ("q_proj", "k_proj", "v_proj", "proj"):
            sd[pre + f"residual1.fn.{name}.weight"] = rnd(D, D)
        sd[pre + "residual1.fn.rope.freqs"] = freqs * 2 * math.pi * (1 + rnd(2, hd, scale=0.01))
        sd[pre + "residual2.norm.weight"] = 1 + rnd(D)
        sd[pre + "residual2.fn.fc1.weight"] = rnd(4 * D, D)
        sd[pre + "residual2.fn.fc2.weight"] = rnd(D, 4 * D)
    sd["backbone.decoder.blocks.0.residual1.fn.q_proj.weight"] = rnd(D, D)  # not used by the encoder
    return sd


def rotate_half(t: torch.Tensor) -> torch.Tensor:
    half = t.shape[-1] // 2
    return torch.cat([-t[..., half:], t[..., :half]], -1)


def rms(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    x = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    return x if weight is None else x * weight


def reference_encoder(sd: dict[str, torch.Tensor], img: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """CAPI's encoder output ``[B, R + N, D]`` and each block's attention ``[B, H, N, N]``."""
    b, _, h_img, w_img = img.shape
    h, w = h_img // P, w_img // P
    g = lambda k: sd["backbone." + k]  # noqa: E731
    patches = F.unfold(img, kernel_size=P, stride=P).transpose(1, 2)  # [B, N, 3*P*P], row-major
    x = patches @ g("patch_embed.weight").reshape(D, -1).T + g("patch_embed.bias")
    coords = [[r / (h - 1), c / (w - 1)] for r in range(h) for c in range(w)]  # linspace(0, 1) per axis
    side = R // 4
    border = ([[k / side, 0.0] for k in range(side)] + [[1.0, k / side] for k in range(side)]
              + [[1 - k / side, 1.0] for k in range(side)] + [[0.0, 1 - k / side] for k in range(side)])
    c = torch.tensor(border + coords)  # [R + N, 2]; the patches span [0, 1]^2, so no rescaling
    x = torch.cat([g("registers").expand(b, -1, -1), x], dim=1)
    maps = []
    hd = D // H
    for i in range(DEPTH):
        pre = f"encoder.blocks.{i}."
        y = rms(x, g(pre + "residual1.norm.weight"))
        angle = c @ g(pre + "residual1.fn.rope.freqs")  # [R + N, hd]
        attn, outs = [], []
        for head in range(H):
            cols = slice(head * hd, (head + 1) * hd)
            q = (y @ g(pre + "residual1.fn.q_proj.weight").T)[..., cols]
            k = (y @ g(pre + "residual1.fn.k_proj.weight").T)[..., cols]
            v = (y @ g(pre + "residual1.fn.v_proj.weight").T)[..., cols]
            q = q * angle.cos() + rotate_half(q) * angle.sin()
            k = k * angle.cos() + rotate_half(k) * angle.sin()
            a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), dim=-1)  # [B, N, N]
            attn.append(a)
            outs.append(a @ v)
        maps.append(torch.stack(attn, 1))  # [B, H, N, N]
        x = x + torch.cat(outs, -1) @ g(pre + "residual1.fn.proj.weight").T
        y = rms(x, g(pre + "residual2.norm.weight"))
        x = x + F.gelu(y @ g(pre + "residual2.fn.fc1.weight").T) @ g(pre + "residual2.fn.fc2.weight").T
    return rms(x, None), maps


@pytest.fixture(scope="module")
def capi_file(tmp_path_factory) -> tuple:
    path = tmp_path_factory.mktemp("capi") / "capi_vitl14_in1k.pth"
    sd = official_state()
    torch.save(sd, path)
    return path, sd


@pytest.mark.parametrize("size", [(56, 56), (42, 70)])
def test_encoder_matches_the_reference(capi_file, size):
    path, sd = capi_file
    model = load_model("capi-vit-l14", checkpoint=path, img_size=size, **ARCH)
    img = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    ref, _ = reference_encoder(sd, img)
    with torch.no_grad():
        out = model.forward_features(img)
    assert out.shape == (2, R + (size[0] // P) * (size[1] // P), D)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        pooled = model(img)
    torch.testing.assert_close(pooled, ref[:, R:].mean(1), rtol=1e-4, atol=1e-4)


def test_attn_drop_sees_the_post_softmax_maps(capi_file):
    path, sd = capi_file
    model = load_model("capi-vit-l14", checkpoint=path, img_size=56, **ARCH)
    img = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    _, ref_maps = reference_encoder(sd, img)
    seen: list[torch.Tensor] = []
    handles = []
    for blk in model.blocks:
        blk.attn.fused_attn = False
        handles.append(blk.attn.attn_drop.register_forward_pre_hook(lambda m, args: seen.append(args[0])))
    with torch.no_grad():
        model.forward_features(img)
    for handle in handles:
        handle.remove()
    assert len(seen) == DEPTH
    for got, ref in zip(seen, ref_maps):
        assert got.shape == (1, H, R + 16, R + 16)
        torch.testing.assert_close(got.sum(-1), torch.ones(1, H, R + 16))
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_fused_and_explicit_attention_agree(capi_file):
    path, _ = capi_file
    model = load_model("capi-vit-l14", checkpoint=path, img_size=56, **ARCH)
    img = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.fused_attn = True
        fused = model.forward_features(img)
        for blk in model.blocks:
            blk.attn.fused_attn = False
        explicit = model.forward_features(img)
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-5)


def test_attention_tap_layout():
    from attnflow.tap import AttentionTap

    model = load_model("capi-vit-l14", random_init=True, img_size=56, **ARCH)
    assert model.has_class_token is False and model.cls_token is None and model.num_prefix_tokens == R
    assert tuple(model.patch_embed.grid_size) == (4, 4) and tuple(model.patch_embed.patch_size) == (P, P)
    with AttentionTap(model) as tap, torch.no_grad():
        model(torch.randn(2, 3, 56, 56))
    assert len(tap.maps) == DEPTH and tap.maps[0].shape == (2, H, R + 16, R + 16)
    assert tap.layout.num_prefix == R and tap.layout.has_cls is False and tuple(tap.layout.grid) == (4, 4)
    assert all(blk.attn.fused_attn == model.blocks[0].attn.fused_attn for blk in model.blocks)


def test_full_size_preset_has_the_released_shape():
    model = load_model("capi-vit-l14", random_init=True, depth=1)
    sd = model.state_dict()
    assert sd["reg_token"].shape == (1, 16, 1024) and sd["patch_embed.proj.weight"].shape == (1024, 3, 14, 14)
    assert sd["blocks.0.attn.rope.freqs"].shape == (2, 64) and "blocks.0.attn.q_proj.bias" not in sd
    assert "blocks.0.norm1.bias" not in sd and "norm.weight" not in sd  # RMSNorm; final norm without affine
    assert model.blocks[0].attn.num_heads == 16 and model.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)
