"""Every converter: a file written in the official key layout round-trips into the timm model, strictly.

Each test takes a tiny random model of the preset's architecture, fills every tensor with random values,
renames its keys to the official layout (``shared/checkpoints.md``), adds what the official file also holds
(momentum encoders, predictors, decoders, heads, mask tokens, optimizer state, config objects), saves it
with ``torch.save`` and loads it through ``load_model(preset, checkpoint=path)``. Every tensor of the loaded
model must equal the original one.
"""

from __future__ import annotations

import argparse
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from attnflow.models.converters import CONVERTERS, CheckpointError
from attnflow.models.load import load_model
from attnflow.models.registry import list_specs

TINY = dict(depth=2, embed_dim=32, num_heads=4, mlp_ratio=2.0)


def tiny_weights(name: str, img_size: int = 64, seed: int = 0, **kw) -> dict[str, torch.Tensor]:
    """The state dict of a tiny ``name`` model with every float tensor drawn at random (nothing left at a
    constant init, so a tensor that is not loaded cannot equal the original by chance)."""
    model = load_model(name, random_init=True, img_size=img_size, **{**TINY, **kw})
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone()
            for k, v in model.state_dict().items()}


def assert_loaded(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert sorted(got) == sorted(expected), "loaded model and original have different keys"
    blocks = [k for k in got if k.startswith("blocks.")]
    assert len(blocks) >= 2 * 8, "the model should have block tensors"
    for key, value in expected.items():
        assert torch.equal(got[key], value), f"{key} differs from the original"


def save(tmp_path: Path, obj: object, name: str = "ckpt.pth") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def fake_cfg_node() -> object:
    """A config object of a class from a module that is not installed (like yacs' CfgNode in SlowFast/SimMIM
    files): the module exists only while the object is pickled."""
    module = types.ModuleType("fake_yacs_config")

    class CfgNode(dict):
        pass

    CfgNode.__module__ = "fake_yacs_config"
    CfgNode.__qualname__ = "CfgNode"
    module.CfgNode = CfgNode
    sys.modules["fake_yacs_config"] = module
    cfg = CfgNode(MODEL=CfgNode(ARCH="vit"), SOLVER=CfgNode(BASE_LR=1e-4))
    return cfg


@pytest.fixture()
def cfg_node():
    cfg = fake_cfg_node()
    yield cfg
    sys.modules.pop("fake_yacs_config", None)


def prefixed(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


# ------------------------------------------------------------------------------------------------ MAE

def test_mae_pretrained_file(tmp_path):
    sd = tiny_weights("mae-vit-b16")
    path = save(tmp_path, {"model": sd})
    assert_loaded(load_model("mae-vit-b16", checkpoint=path, img_size=64, **TINY), sd)


def test_mae_finetuned_file_keeps_fc_norm_and_drops_the_classifier(tmp_path):
    sd = tiny_weights("mae-ft-vit-b16")
    assert "fc_norm.weight" in sd and "norm.weight" not in sd  # global pool: fc_norm replaces norm
    official = {**sd, "head.weight": torch.randn(1000, 32), "head.bias": torch.randn(1000)}
    path = save(tmp_path, {"model": official, "epoch": 99, "args": argparse.Namespace(model="vit_base")})
    model = load_model("mae-ft-vit-b16", checkpoint=path, img_size=64, **TINY)
    assert_loaded(model, sd)
    assert model.attnflow_info.family == "MIM+FT"


# ----------------------------------------------------------------------------------------------- DINO

def test_dino_backbone_file(tmp_path):
    sd = tiny_weights("dino-vit-s16")
    assert_loaded(load_model("dino-vit-s16", checkpoint=save(tmp_path, sd), img_size=64, **TINY), sd)


def test_dino_full_checkpoint_teacher_and_student(tmp_path):
    teacher, student = tiny_weights("dino-vit-b16", seed=1), tiny_weights("dino-vit-b16", seed=2)
    head = {"head.mlp.0.weight": torch.randn(64, 32), "head.last_layer.weight_g": torch.randn(100, 1)}
    full = {
        "teacher": {**prefixed(teacher, "backbone."), **head},
        "student": {**prefixed(student, "module.backbone."), **prefixed(head, "module.")},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}, "epoch": 100,
        "args": argparse.Namespace(arch="vit_base"), "dino_loss": {"center": torch.zeros(1, 100)},
    }
    path = save(tmp_path, full)
    assert_loaded(load_model("dino-vit-b16", checkpoint=path, img_size=64, **TINY), teacher)
    assert_loaded(load_model("dino-vit-b16", checkpoint=path, img_size=64, checkpoint_key="student", **TINY),
                  student)


# -------------------------------------------------------------------------------------------- MoCo-v3

def test_mocov3_keeps_base_encoder_without_its_projector(tmp_path):
    base, momentum = tiny_weights("mocov3-vit-s16", seed=1), tiny_weights("mocov3-vit-s16", seed=2)
    projector = {"head.0.weight": torch.randn(64, 32), "head.1.weight": torch.randn(64),
                 "head.3.weight": torch.randn(16, 64)}
    state = {**prefixed({**base, **projector}, "module.base_encoder."),
             **prefixed({**momentum, **projector}, "module.momentum_encoder."),
             "module.predictor.0.weight": torch.randn(64, 16), "module.predictor.1.running_mean": torch.zeros(64)}
    path = save(tmp_path, {"epoch": 300, "arch": "vit_small", "state_dict": state,
                           "optimizer": {"state": {}, "param_groups": []}, "scaler": {"scale": 1024.0}},
                "vit-s-300ep.pth.tar")
    assert_loaded(load_model("mocov3-vit-s16", checkpoint=path, img_size=64, **TINY), base)


def mocov3_table(grid: int, dim: int) -> torch.Tensor:
    """MoCo-v3's fixed position table, written out from vits.py: a zero [cls] row, then for patch (i, j) of the
    row-major grid ``[sin(i w_d)..., cos(i w_d)..., sin(j w_d)..., cos(j w_d)...]``, ``w_d = 10000^(-d/(dim/4))``
    (``torch.meshgrid(grid_w, grid_h)`` with "ij" indexing: the first coordinate varies slowest)."""
    q = dim // 4
    rows = [[0.0] * dim]
    for i in range(grid):
        for j in range(grid):
            rows.append([fn(x / 10000 ** (d / q)) for fn, x in ((math.sin, i), (math.cos, i), (math.sin, j),
                                                                 (math.cos, j)) for d in range(q)])
    return torch.tensor([rows])


def test_mocov3_converted_file_with_the_fixed_position_table_loads(tmp_path):
    # moco-v3 convert_to_deit.py output: {'model': encoder without the projector}, pos_embed never trained
    sd = {**tiny_weights("mocov3-vit-b16"), "pos_embed": mocov3_table(4, 32)}
    path = save(tmp_path, {"model": sd}, "vit-b-300ep-deit.pth")
    assert_loaded(load_model("mocov3-vit-b16", checkpoint=path, img_size=64, **TINY), sd)
    half = save(tmp_path, {"model": {k: v.to(torch.bfloat16) for k, v in sd.items()}}, "half.pth")
    model = load_model("mocov3-vit-b16", checkpoint=half, img_size=64, **TINY)  # bf16 file: same table
    torch.testing.assert_close(model.pos_embed.detach(), sd["pos_embed"], rtol=0, atol=1e-2)


def test_a_dino_file_passed_as_mocov3_is_refused_not_run_with_12_heads(tmp_path):
    # DINO ViT-S/16 (6 heads, learned position table) has exactly MoCo-v3 ViT-S's keys and shapes
    sd = tiny_weights("dino-vit-s16")
    with pytest.raises(CheckpointError, match="not MoCo-v3's fixed 2-D sin-cos table"):
        load_model("mocov3-vit-s16", checkpoint=save(tmp_path, sd, "dino_deitsmall16_pretrain.pth"),
                   img_size=64, **TINY)


# ----------------------------------------------------------------------------------------------- iBOT

def test_ibot_teacher_file(tmp_path):
    sd = tiny_weights("ibot-vit-b16")
    path = save(tmp_path, {"state_dict": sd}, "checkpoint_teacher.pth")
    assert_loaded(load_model("ibot-vit-b16", checkpoint=path, img_size=64, **TINY), sd)


def test_ibot_full_checkpoint(tmp_path):
    teacher, student = tiny_weights("ibot-vit-l16", seed=3), tiny_weights("ibot-vit-l16", seed=4)
    head = {"head.mlp.0.weight": torch.randn(64, 32), "head.last_layer2.weight_g": torch.randn(10, 1)}
    full = {"teacher": {**prefixed(teacher, "backbone."), **head},
            "student": {**prefixed(student, "module.backbone."),
                        "module.backbone.masked_embed": torch.randn(1, 32),
                        **prefixed(head, "module.")},
            "optimizer": {}, "epoch": 250, "args": argparse.Namespace(arch="vit_large")}
    path = save(tmp_path, full, "checkpoint.pth")
    assert_loaded(load_model("ibot-vit-l16", checkpoint=path, img_size=64, **TINY), teacher)
    assert_loaded(load_model("ibot-vit-l16", checkpoint=path, img_size=64, checkpoint_key="student", **TINY),
                  student)


# -------------------------------------------------------------------------------------------- BEiT-v2

@pytest.mark.parametrize("top_key", ["model", "module"])
def test_beitv2_pretraining_file(tmp_path, top_key):
    sd = tiny_weights("beitv2-vit-b16")
    assert "rel_pos_bias.relative_position_bias_table" in sd  # one table shared by all blocks
    assert not any("blocks.0.attn.relative_position_bias_table" in k for k in sd)
    official = {**sd, "mask_token": torch.randn(1, 1, 32),
                "rel_pos_bias.relative_position_index": torch.zeros(17, 17, dtype=torch.long),
                "lm_head.weight": torch.randn(8192, 32), "lm_head.bias": torch.randn(8192),
                "cls_pt_layers.0.norm1.weight": torch.randn(32), "cls_pt_layers.1.mlp.fc2.bias": torch.randn(32)}
    path = save(tmp_path, {top_key: official, "epoch": 1599})
    assert_loaded(load_model("beitv2-vit-b16", checkpoint=path, img_size=64, **TINY), sd)


# --------------------------------------------------------------------------------------------- SimMIM

def test_simmim_file_with_decoder_and_config_object(tmp_path, cfg_node):
    sd = tiny_weights("simmim-vit-b16")
    assert "pos_embed" not in sd and "rel_pos_bias.relative_position_bias_table" in sd
    state = {**prefixed(sd, "encoder."), "encoder.mask_token": torch.randn(1, 1, 32),
             "encoder.rel_pos_bias.relative_position_index": torch.zeros(17, 17, dtype=torch.long),
             "decoder.0.weight": torch.randn(768, 32, 1, 1), "decoder.0.bias": torch.randn(768)}
    path = save(tmp_path, {"model": state, "optimizer": {}, "lr_scheduler": {}, "max_accuracy": 0.0,
                           "epoch": 799, "config": cfg_node})
    sys.modules.pop("fake_yacs_config")  # as on a machine without yacs
    assert_loaded(load_model("simmim-vit-b16", checkpoint=path, img_size=64, **TINY), sd)


# ------------------------------------------------------------------------------------------- MaskFeat

def test_maskfeat_file_maps_the_prediction_norm_to_the_final_norm(tmp_path, cfg_node):
    sd = tiny_weights("maskfeat-vit-b16")
    state = {k: v for k, v in sd.items() if not k.startswith("norm.")}  # MaskMViT deletes the final norm
    state.update({"mask_token": torch.randn(1, 1, 32),
                  "pred_head.transforms.0.0.weight": sd["norm.weight"],
                  "pred_head.transforms.0.0.bias": sd["norm.bias"],
                  "pred_head.projections.0.weight": torch.randn(108, 32),
                  "pred_head.projections.0.bias": torch.randn(108),
                  "hogs.0.weight_x": torch.randn(1, 1, 3, 3), "hogs.0.weight_y": torch.randn(1, 1, 3, 3)})
    path = save(tmp_path, {"epoch": 1600, "model_state": state, "optimizer_state": {}, "cfg": cfg_node},
                "in1k_VIT_B_MaskFeat_PT_epoch_01600.pyth")
    sys.modules.pop("fake_yacs_config")
    assert_loaded(load_model("maskfeat-vit-b16", checkpoint=path, img_size=64, **TINY), sd)


# ------------------------------------------------------------------------------------------- I-JEPA

def test_ijepa_context_and_target_encoders(tmp_path):
    context, target = tiny_weights("ijepa-vit-h14", img_size=56, seed=5), tiny_weights("ijepa-vit-h14", 56, 6)
    assert "cls_token" not in context and context["pos_embed"].shape == (1, 16, 32)
    predictor = {"module.predictor_embed.weight": torch.randn(16, 32), "module.mask_token": torch.randn(1, 1, 16),
                 "module.predictor_pos_embed": torch.randn(1, 16, 16),
                 "module.predictor_norm.weight": torch.randn(16),
                 "module.predictor_blocks.0.attn.qkv.weight": torch.randn(48, 16),
                 "module.predictor_proj.weight": torch.randn(32, 16)}
    path = save(tmp_path, {"encoder": prefixed(context, "module."), "predictor": predictor,
                           "target_encoder": prefixed(target, "module."), "opt": {}, "scaler": None,
                           "epoch": 300, "loss": 0.1, "batch_size": 128, "world_size": 16, "lr": 1e-3},
                "IN1K-vit.h.14-300e.pth.tar")
    assert_loaded(load_model("ijepa-vit-h14", checkpoint=path, img_size=56, **TINY), context)
    assert_loaded(load_model("ijepa-vit-h14", checkpoint=path, img_size=56, checkpoint_key="target_encoder",
                             **TINY), target)


# ------------------------------------------------------------------------------------------- DINOv2

def test_dinov2_file(tmp_path):
    sd = tiny_weights("dinov2-vit-s14", img_size=56)
    assert sd["pos_embed"].shape == (1, 1 + 16, 32) and "blocks.0.ls1.gamma" in sd
    path = save(tmp_path, {**sd, "mask_token": torch.randn(1, 32)})
    assert_loaded(load_model("dinov2-vit-s14", checkpoint=path, img_size=56, **TINY), sd)


def test_dinov2_registers_file_folds_the_cls_position_into_the_cls_token(tmp_path):
    sd = tiny_weights("dinov2-reg4-vit-b14", img_size=56)
    assert sd["pos_embed"].shape == (1, 16, 32) and sd["reg_token"].shape == (1, 4, 32)
    cls_pos = torch.randn(1, 1, 32)
    official = {k: v for k, v in sd.items() if k not in ("reg_token", "pos_embed", "cls_token")}
    official.update({"register_tokens": sd["reg_token"], "mask_token": torch.randn(1, 32),
                     "pos_embed": torch.cat([cls_pos, sd["pos_embed"]], dim=1),  # DINOv2 keeps a [cls] row
                     "cls_token": sd["cls_token"] - cls_pos[:, 0]})
    model = load_model("dinov2-reg4-vit-b14", checkpoint=save(tmp_path, official), img_size=56, **TINY)
    got = model.state_dict()
    torch.testing.assert_close(got["cls_token"], sd["cls_token"], rtol=0, atol=1e-6)
    assert_loaded(model, {**sd, "cls_token": got["cls_token"]})


# --------------------------------------------------------------------------------------------- CAPI

def capi_official_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """attnflow's CAPI keys -> the keys of CAPI's released file (``backbone.`` + EncoderDecoder names)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            rest = (rest.replace("norm1.", "residual1.norm.").replace("attn.", "residual1.fn.")
                    .replace("norm2.", "residual2.norm.").replace("mlp.", "residual2.fn."))
            k = f"encoder.blocks.{i}.{rest}"
        elif k.startswith("patch_embed.proj."):
            k = k.replace("patch_embed.proj.", "patch_embed.")
        elif k == "reg_token":
            k = "registers"
        out["backbone." + k] = v
    return out


def test_capi_file(tmp_path):
    sd = tiny_weights("capi-vit-l14", img_size=56)
    assert sd["reg_token"].shape == (1, 16, 32) and sd["blocks.1.attn.rope.freqs"].shape == (2, 8)
    official = capi_official_layout(sd)
    assert "backbone.encoder.blocks.0.residual1.fn.rope.freqs" in official
    assert "backbone.encoder.blocks.1.residual2.fn.fc2.weight" in official
    official.update({"backbone.mask_token": torch.randn(1, 32),
                     "backbone.decoder.blocks.0.residual1.fn.q_proj.weight": torch.randn(32, 32),
                     "backbone.decoder.blocks.0.residual1.fn.rope.freqs": torch.randn(2, 8),
                     "clustering.layer.weight": torch.randn(64, 32)})
    assert_loaded(load_model("capi-vit-l14", checkpoint=save(tmp_path, official), img_size=56, **TINY), sd)


# ---------------------------------------------------------------------------------------------- timm

def test_generic_timm_file_for_a_bare_timm_name(tmp_path):
    from conftest import tiny_model

    model = tiny_model("deit_small_patch16_224", img_size=64)
    gen = torch.Generator().manual_seed(7)
    sd = {k: torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}
    path = save(tmp_path, {"state_dict": prefixed(sd, "module."), "epoch": 3})
    loaded = load_model("deit_small_patch16_224", checkpoint=path, img_size=64, **TINY)
    assert_loaded(loaded, sd)
    assert loaded.attnflow_info.preset is None and loaded.attnflow_info.source == "file"


def test_every_preset_converter_is_registered():
    assert {spec.converter for spec in list_specs()} <= set(CONVERTERS)


ROUND_TRIP_TESTS = {
    "mae": test_mae_pretrained_file, "dino": test_dino_backbone_file,
    "mocov3": test_mocov3_keeps_base_encoder_without_its_projector,
    "ibot": test_ibot_teacher_file, "beitv2": test_beitv2_pretraining_file,
    "simmim": test_simmim_file_with_decoder_and_config_object,
    "maskfeat": test_maskfeat_file_maps_the_prediction_norm_to_the_final_norm,
    "ijepa": test_ijepa_context_and_target_encoders, "dinov2": test_dinov2_file, "capi": test_capi_file,
    "timm": test_generic_timm_file_for_a_bare_timm_name,
}


def test_every_converter_has_a_round_trip_test():
    missing = set(CONVERTERS) - set(ROUND_TRIP_TESTS)
    assert not missing, f"converters without a round-trip test: {missing}"


# ----------------------------------------------------------------- official files given to a bare timm name

def fit_error(name: str, path: Path, img_size: int = 64) -> str:
    """The one-line error of loading ``path`` into ``name`` (which must fail on its keys)."""
    with pytest.raises(CheckpointError) as err:
        load_model(name, checkpoint=path, img_size=img_size, **TINY)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_official_dinov2_file_given_the_timm_name_names_the_preset(tmp_path):
    sd = tiny_weights("dinov2-vit-s14", img_size=56)
    path = save(tmp_path, {**sd, "mask_token": torch.randn(1, 32)}, "dinov2_vits14_pretrain.pth")
    msg = fit_error("vit_small_patch14_dinov2", path, img_size=56)
    assert "unexpected key(s): mask_token" in msg
    assert "use the model dinov2-vit-s14" in msg
    for other in ("dinov2-vit-b14", "dinov2-reg4-vit-s14", "dinov2-reg4-vit-b14"):
        assert other not in msg
    assert_loaded(load_model("dinov2-vit-s14", checkpoint=path, img_size=56, **TINY), sd)


def test_official_dinov2_registers_file_names_only_the_register_presets(tmp_path):
    sd = tiny_weights("dinov2-vit-s14", img_size=56)
    path = save(tmp_path, {**sd, "mask_token": torch.randn(1, 32), "register_tokens": torch.randn(1, 4, 32)})
    msg = fit_error("vit_small_patch14_dinov2", path, img_size=56)
    assert "dinov2-reg4-vit-s14" in msg and "dinov2-reg4-vit-b14" in msg
    assert msg.endswith("use one of them as the model")
    assert " dinov2-vit-s14" not in msg and "dinov2-vit-b14" not in msg


def test_official_mocov3_file_given_the_timm_name_names_the_preset_of_that_size(tmp_path):
    base = tiny_weights("mocov3-vit-b16")
    state = {**prefixed(base, "module.base_encoder."), **prefixed(base, "module.momentum_encoder.")}
    path = save(tmp_path, {"epoch": 300, "state_dict": state}, "vit-b-300ep.pth.tar")
    msg = fit_error("vit_base_patch16_224", path)
    assert "use the model mocov3-vit-b16" in msg and "mocov3-vit-s16" not in msg


def test_official_ijepa_file_given_the_timm_name_names_the_preset(tmp_path):
    context = tiny_weights("ijepa-vit-h14", img_size=56)
    path = save(tmp_path, {"encoder": prefixed(context, "module."), "target_encoder": prefixed(context, "module."),
                           "predictor": {"module.mask_token": torch.randn(1, 1, 16)}, "epoch": 300})
    assert "use the model ijepa-vit-h14" in fit_error("vit_huge_patch14_gap_224", path, img_size=56)


def test_full_dino_checkpoint_given_the_timm_name_names_dino_and_ibot(tmp_path):
    # DINO's and iBOT's full checkpoints share the {'teacher': {'backbone.*', 'head.*'}} layout
    sd = tiny_weights("dino-vit-s16")
    path = save(tmp_path, {"teacher": prefixed(sd, "backbone."), "student": prefixed(sd, "module.backbone."),
                           "epoch": 100})
    msg = fit_error("vit_small_patch16_224", path)
    assert "dino-vit-s16" in msg and "ibot-vit-s16" in msg
    assert "dino-vit-b16" not in msg and "ibot-vit-b16" not in msg


def test_official_file_given_another_preset_names_the_right_one(tmp_path):
    base = tiny_weights("mocov3-vit-b16")
    path = save(tmp_path, {"state_dict": prefixed(base, "module.base_encoder.")})
    assert fit_error("mae-vit-b16", path).endswith("the file has the official layout of mocov3-vit-b16: use the model "
                                                   "mocov3-vit-b16")


def test_a_plain_timm_file_that_does_not_fit_suggests_no_preset(tmp_path):
    sd = tiny_weights("dino-vit-s16")
    sd["blocks.0.attn.qkv_weight"] = sd.pop("blocks.0.attn.qkv.weight")
    msg = fit_error("vit_small_patch16_224", save(tmp_path, {"model": sd}))
    assert "missing key(s): blocks.0.attn.qkv.weight" in msg and "the file has the official layout of" not in msg


@pytest.mark.parametrize("layout, expected", [
    ({"cls_token": 0, "mask_token": 0, "blocks.0.ls1.gamma": 0}, ["dinov2"]),
    ({"epoch": 1, "state_dict": {"module.base_encoder.cls_token": 0, "module.predictor.0.weight": 0}}, ["mocov3"]),
    ({"teacher": {"backbone.cls_token": 0, "head.last_layer.weight": 0}}, ["dino", "ibot"]),
    ({"encoder": {"module.pos_embed": 0}, "predictor": {}}, ["ijepa"]),
    ({"target_encoder": {"module.pos_embed": 0}}, ["ijepa"]),
    ({"model": {"cls_token": 0, "lm_head.weight": 0, "cls_pt_layers.0.norm1.weight": 0}}, ["beitv2"]),
    ({"module": {"cls_token": 0, "cls_pt_layers.0.norm1.weight": 0}}, ["beitv2"]),
    ({"model": {"encoder.cls_token": 0, "decoder.0.weight": 0}, "config": {}}, ["simmim"]),
    ({"model_state": {"cls_token": 0, "pred_head.transforms.0.0.weight": 0}}, ["maskfeat"]),
    ({"backbone.registers": 0, "backbone.encoder.blocks.0.residual1.norm.weight": 0}, ["capi"]),
    # layouts the generic timm converter reads as they are: nothing to suggest
    ({"model": {"cls_token": 0, "blocks.0.norm1.weight": 0, "norm.weight": 0}}, []),
    ({"model": {"cls_token": 0, "decoder_embed.weight": 0, "mask_token": 0}}, []),  # MAE's visualisation file
    ({"cls_token": 0, "blocks.0.norm1.weight": 0}, []),
    ([0, 1], []),
])
def test_official_formats_recognise_each_layout(layout, expected):
    from attnflow.models.converters import official_formats

    assert official_formats(layout) == expected
