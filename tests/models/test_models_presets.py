"""Every preset at full size matches the official architecture of its checkpoint (``shared/checkpoints.md``).

The models are built on the meta device (no memory, no weights) at 224 px. The expected values are written out
by hand from the authors' model definitions, cited per row in ``shared/checkpoints.md``: width, depth, heads,
patch, prefix tokens, the position table's rows at 224 px (``None``: no absolute table), which final norm holds
weights (``norm``, or ``fc_norm`` for global-pool fine-tuned models), layer scale, and the norm epsilon.
A wrong preset keyword (MoCo-v3 ViT-S with 6 heads, MAE-FT without its fc_norm, BEiT-v2 with timm's default
average pool) loads a real checkpoint into the wrong computation, often without any key error.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from attnflow.models.load import load_model
from attnflow.models.registry import list_specs

# name: (dim, depth, heads, patch, prefix tokens, has [cls], pos_embed rows at 224, final norm, layer scale)
OFFICIAL: dict[str, tuple[int, int, int, int, int, bool, int | None, str, bool]] = {
    "mae-vit-b16": (768, 12, 12, 16, 1, True, 197, "norm", False),
    "mae-ft-vit-b16": (768, 12, 12, 16, 1, True, 197, "fc_norm", False),
    "mae-vit-l16": (1024, 24, 16, 16, 1, True, 197, "norm", False),
    "mae-ft-vit-l16": (1024, 24, 16, 16, 1, True, 197, "fc_norm", False),
    "mae-vit-h14": (1280, 32, 16, 14, 1, True, 257, "norm", False),
    "mae-ft-vit-h14": (1280, 32, 16, 14, 1, True, 257, "fc_norm", False),
    "dino-vit-s16": (384, 12, 6, 16, 1, True, 197, "norm", False),
    "dino-vit-b16": (768, 12, 12, 16, 1, True, 197, "norm", False),
    "mocov3-vit-s16": (384, 12, 12, 16, 1, True, 197, "norm", False),  # 12 heads of 32, not DeiT-S's 6
    "mocov3-vit-b16": (768, 12, 12, 16, 1, True, 197, "norm", False),
    "ibot-vit-s16": (384, 12, 6, 16, 1, True, 197, "norm", False),
    "ibot-vit-b16": (768, 12, 12, 16, 1, True, 197, "norm", False),
    "ibot-vit-l16": (1024, 24, 16, 16, 1, True, 197, "norm", False),
    "beitv2-vit-b16": (768, 12, 12, 16, 1, True, None, "norm", True),  # relative position bias only
    "ijepa-vit-h14": (1280, 32, 16, 14, 0, False, 256, "norm", False),
    "dinov2-vit-s14": (384, 12, 6, 14, 1, True, 257, "norm", True),
    "dinov2-reg4-vit-s14": (384, 12, 6, 14, 5, True, 256, "norm", True),  # patch rows only (no_embed_class)
    "dinov2-vit-b14": (768, 12, 12, 14, 1, True, 257, "norm", True),
    "dinov2-reg4-vit-b14": (768, 12, 12, 14, 5, True, 256, "norm", True),
    "simmim-vit-b16": (768, 12, 12, 16, 1, True, None, "norm", True),
    "maskfeat-vit-b16": (768, 12, 12, 16, 1, True, 197, "norm", False),
    "capi-vit-l14": (1024, 24, 16, 14, 16, False, None, "norm", False),
}


def build(name: str) -> nn.Module:
    with torch.device("meta"):
        return load_model(name, random_init=True, img_size=224)


def test_every_preset_has_an_official_row():
    assert sorted(OFFICIAL) == sorted(spec.name for spec in list_specs())


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_full_size_architecture_matches_the_official_model(name):
    dim, depth, heads, patch, prefix, has_cls, pos_rows, final_norm, layer_scale = OFFICIAL[name]
    model = build(name)
    sd = model.state_dict()
    assert model.embed_dim == dim and len(model.blocks) == depth
    assert model.blocks[0].attn.num_heads == heads
    assert tuple(model.patch_embed.patch_size) == (patch, patch)
    assert model.num_prefix_tokens == prefix and (model.cls_token is not None) == has_cls
    assert (tuple(sd["pos_embed"].shape) if "pos_embed" in sd else None) == (
        None if pos_rows is None else (1, pos_rows, dim))
    other = "fc_norm" if final_norm == "norm" else "norm"
    assert not isinstance(getattr(model, final_norm), nn.Identity), final_norm
    assert isinstance(getattr(model, other, None), (nn.Identity, type(None))), other
    assert not any(k.startswith(f"{other}.") for k in sd), other
    assert any(k.startswith("blocks.0.") and ("gamma" in k) for k in sd) == layer_scale
    assert not any(k.startswith("head.") for k in sd)  # features only


def test_final_token_norms_and_pooling_follow_the_authors():
    # LayerNorm eps 1e-6 everywhere except CAPI (RMSNorm 1e-5, no weight in the final one)
    for name in OFFICIAL:
        model = build(name)
        norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
        if name == "capi-vit-l14":
            assert not norms and model.norm.eps == 1e-5 and "norm.weight" not in model.state_dict()
        else:
            assert norms and {m.eps for m in norms} == {1e-6}, name
    # MAE fine-tuned: mean over patches without [cls], then fc_norm (mae models_vit.py global_pool=True)
    assert build("mae-ft-vit-b16").global_pool == "avg"
    # BEiT-v2 / SimMIM pretraining keep the final norm and a [cls] readout (timm's Beit default is 'avg')
    assert build("beitv2-vit-b16").global_pool == "token" and build("simmim-vit-b16").global_pool == "token"
    # I-JEPA: norm, then mean over all tokens (no [cls]); no fc_norm
    assert build("ijepa-vit-h14").global_pool == "avg"


@pytest.mark.parametrize("name", ["beitv2-vit-b16", "simmim-vit-b16"])
def test_beit_family_presets_have_one_shared_relative_position_table(name):
    sd = build(name).state_dict()
    assert tuple(sd["rel_pos_bias.relative_position_bias_table"].shape) == ((2 * 14 - 1) ** 2 + 3, 12)
    assert not any(k.startswith("blocks.") and k.endswith("relative_position_bias_table") for k in sd)
    assert {"blocks.0.attn.q_bias", "blocks.0.attn.v_bias"} <= set(sd) and "blocks.0.attn.qkv.bias" not in sd


def test_capi_keys_have_the_official_shapes():
    sd = build("capi-vit-l14").state_dict()
    assert tuple(sd["reg_token"].shape) == (1, 16, 1024)
    assert tuple(sd["blocks.0.attn.rope.freqs"].shape) == (2, 64)
    assert tuple(sd["patch_embed.proj.weight"].shape) == (1024, 3, 14, 14) and "patch_embed.proj.bias" in sd
    assert not any(k.endswith(".bias") for k in sd if k.startswith("blocks."))  # no qkv/proj/MLP biases
