"""Registered presets of the paper's models ("Beyond [cls]", Sec. 4 and Appendix B.1).

Every URL, hub tag, file layout and architecture keyword below comes from ``shared/checkpoints.md``, which
cites the authors' code for each fact. All models normalise inputs with the ImageNet mean/std.

The converter named by each preset (see :mod:`attnflow.models.converters`) reads the official file format
from ``url``; a ``hub_tag`` means timm also hosts converted weights (tried first, when cached or online).
"""

from __future__ import annotations

from .registry import ModelSpec, register

_FB = "https://dl.fbaipublicfiles.com"
_IBOT = "https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot"

# ------------------------------------------------------------------------------------------------ MAE
for _size, _arch, _file, _patch in (
    ("B", "vit_base_patch16_224", "base", 16),
    ("L", "vit_large_patch16_224", "large", 16),
    ("H", "vit_huge_patch14_224", "huge", 14),
):
    register(ModelSpec(
        name=f"mae-vit-{_size.lower()}{_patch}", arch=_arch, method="MAE", family="MIM", size=_size,
        patch_size=_patch, hub_tag=f"{_arch}.mae", url=f"{_FB}/mae/pretrain/mae_pretrain_vit_{_file}.pth",
        converter="mae", notes="encoder-only pretraining file {'model': ...}"))
    register(ModelSpec(
        name=f"mae-ft-vit-{_size.lower()}{_patch}", arch=_arch, method="MAE-FT", family="MIM+FT", size=_size,
        patch_size=_patch, arch_kwargs={"global_pool": "avg"},
        url=f"{_FB}/mae/finetune/mae_finetuned_vit_{_file}.pth", converter="mae",
        notes="authors' ImageNet-1k fine-tuned MAE (global pool: fc_norm, no final norm); the 1000-class "
              "head is dropped, features are taken before it. The paper fine-tuned its own MAE-FT on [cls]."))

# ----------------------------------------------------------------------------------------------- DINO
register(ModelSpec(
    name="dino-vit-s16", arch="vit_small_patch16_224", method="DINO", family="JEA", size="S", patch_size=16,
    hub_tag="vit_small_patch16_224.dino",
    url=f"{_FB}/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth", converter="dino",
    notes="backbone-only file; the full checkpoint (teacher) is accepted too"))
register(ModelSpec(
    name="dino-vit-b16", arch="vit_base_patch16_224", method="DINO", family="JEA", size="B", patch_size=16,
    hub_tag="vit_base_patch16_224.dino",
    url=f"{_FB}/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth", converter="dino",
    notes="backbone-only file; the full checkpoint (teacher) is accepted too"))

# -------------------------------------------------------------------------------------------- MoCo-v3
register(ModelSpec(
    name="mocov3-vit-s16", arch="vit_small_patch16_224", method="MoCo-v3", family="JEA", size="S",
    patch_size=16, arch_kwargs={"num_heads": 12}, url=f"{_FB}/moco-v3/vit-s-300ep/vit-s-300ep.pth.tar",
    converter="mocov3", notes="MoCo-v3 ViT-S uses 12 heads of dim 32 (timm's ViT-S has 6)"))
register(ModelSpec(
    name="mocov3-vit-b16", arch="vit_base_patch16_224", method="MoCo-v3", family="JEA", size="B",
    patch_size=16, url=f"{_FB}/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar", converter="mocov3"))

# ----------------------------------------------------------------------------------------------- iBOT
for _size, _arch, _folder in (
    ("S", "vit_small_patch16_224", "vits_16"),
    ("B", "vit_base_patch16_224", "vitb_16"),
    ("L", "vit_large_patch16_224", "vitl_16"),
):
    register(ModelSpec(
        name=f"ibot-vit-{_size.lower()}16", arch=_arch, method="iBOT", family="JEA", size=_size, patch_size=16,
        url=f"{_IBOT}/{_folder}/checkpoint_teacher.pth", converter="ibot",
        filename=f"ibot_{_folder}_checkpoint_teacher.pth",
        notes="teacher backbone, block masking" + ("" if _size == "S" else
              f"; the random-masking variant ({_folder}_rand_mask/) loads when passed as checkpoint")))

# -------------------------------------------------------------------------------------------- BEiT-v2
register(ModelSpec(
    name="beitv2-vit-b16", arch="beitv2_base_patch16_224", method="BEiT-v2", family="MIM", size="B",
    patch_size=16,
    arch_kwargs={"use_rel_pos_bias": False, "use_shared_rel_pos_bias": True, "global_pool": "token"},
    url="https://github.com/addf400/files/releases/download/BEiT-v2/beitv2_base_patch16_224_pt1k.pth",
    converter="beitv2",
    notes="ImageNet-1k pretraining without the IN-21k intermediate fine-tuning; one relative position "
          "bias table shared by all blocks"))

# ------------------------------------------------------------------------------------------- I-JEPA
register(ModelSpec(
    name="ijepa-vit-h14", arch="vit_huge_patch14_gap_224", method="I-JEPA", family="MIM", size="H",
    patch_size=14, has_cls=False, hub_tag="vit_huge_patch14_gap_224.in1k_ijepa",
    url=f"{_FB}/ijepa/IN1K-vit.h.14-300e.pth.tar", converter="ijepa",
    notes="no [cls] token; loads the context encoder ('encoder', as timm and CAPI do); the I-JEPA "
          "paper (Appendix A.1) evaluates the target encoder: pass checkpoint_key='target_encoder'"))

# -------------------------------------------------------------------------------------------- DINOv2
for _size, _arch_size, _s in (("S", "small", "s"), ("B", "base", "b")):
    for _reg in (False, True):
        _arch = f"vit_{_arch_size}_patch14_{'reg4_' if _reg else ''}dinov2"
        register(ModelSpec(
            name=f"dinov2-{'reg4-' if _reg else ''}vit-{_s}14", arch=_arch,
            method="DINOv2+reg4" if _reg else "DINOv2", family="JEA", size=_size, patch_size=14,
            hub_tag=f"{_arch}.lvd142m",
            url=f"{_FB}/dinov2/dinov2_vit{_s}14/dinov2_vit{_s}14{'_reg4' if _reg else ''}_pretrain.pth",
            converter="dinov2", pos_resample="timm" if _reg else "dinov2",
            notes="LVD-142M pretraining; built at the run's resolution (timm's default is 518 px), the "
                  "position embedding is resampled by DINOv2's own rule for this model"
                  + ("; 4 register tokens" if _reg else "")))

# ------------------------------------------------------------------------------------------- SimMIM
register(ModelSpec(
    name="simmim-vit-b16", arch="beit_base_patch16_224", method="SimMIM", family="MIM", size="B", patch_size=16,
    arch_kwargs={"use_abs_pos_emb": False, "use_rel_pos_bias": False, "use_shared_rel_pos_bias": True,
                 "init_values": 0.1, "global_pool": "token"},
    url="https://drive.google.com/file/d/1dJn6GYkwMIcoP3zqOEyW1_iQfpBi8UOw",
    filename="simmim_pretrain__vit_base__img224__800ep.pth", converter="simmim",
    notes="only hosted on Google Drive: download it by hand and pass it as checkpoint; the paper probes "
          "SimMIM at the 8th block (block 7, counted from 0)"))

# ----------------------------------------------------------------------------------------- MaskFeat
register(ModelSpec(
    name="maskfeat-vit-b16", arch="vit_base_patch16_224", method="MaskFeat", family="MIM", size="B",
    patch_size=16, url=f"{_FB}/pyslowfast/masked_models/in1k_VIT_B_MaskFeat_PT_epoch_01600.pyth",
    converter="maskfeat",
    notes="the file has no final norm: the pretraining head's LayerNorm (pred_head.transforms.0.0) "
          "is used as the final norm"))

# --------------------------------------------------------------------------------------------- CAPI
register(ModelSpec(
    name="capi-vit-l14", arch="capi_vit_large_patch14", method="CAPI", family="MIM", size="L", patch_size=14,
    has_cls=False, url=f"{_FB}/capi/capi_vitl14_in1k.pth", converter="capi",
    notes="attnflow's own CAPI encoder (RMSNorm, 2-D RoPE, 16 registers, no [cls]); ImageNet-1k file "
          "(the i22k, lvd and p205 files load when passed as checkpoint); the decoder is not loaded"))
