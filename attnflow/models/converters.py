"""Converters from each official checkpoint format to the state dict of the matching timm model.

A converter takes the object stored in the official file (what ``torch.load`` returns) and gives a flat
``{timm_key: tensor}`` dict: it unwraps the top-level key, strips prefixes, renames keys and drops what the
encoder does not use (decoders, predictors, momentum encoders, projection heads, mask tokens). Which keys
each format holds, and why, is documented in ``shared/checkpoints.md``.

Resolution-dependent adaptation (position embeddings, relative position bias tables) and the strict load
that names missing and unexpected keys live in :func:`adapt_state_dict` and :func:`load_converted`.

Converters are registered explicitly with the :func:`converter` decorator::

    @converter("mae", "MAE: {'model': encoder state dict}")
    def convert_mae(checkpoint, key=None): ...
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..errors import AttnflowError

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
ConverterFn = Callable[..., StateDict]


class CheckpointError(AttnflowError):
    """A checkpoint file cannot be read, or its keys do not fit the model it should load into."""


@dataclass(frozen=True)
class Converter:
    """One registered official file format.

    Attributes:
        name: registry name, used by :attr:`ModelSpec.converter`.
        fn: ``fn(checkpoint, key=None) -> state_dict``; ``key`` overrides the top-level key to read.
        description: one line: the layout the converter expects.
    """

    name: str
    fn: ConverterFn
    description: str

    def __call__(self, checkpoint: Any, key: str | None = None) -> StateDict:
        return self.fn(checkpoint, key=key)


CONVERTERS: dict[str, Converter] = {}


def converter(name: str, description: str) -> Callable[[ConverterFn], ConverterFn]:
    """Decorator that registers ``fn`` as the converter called ``name``."""

    def wrap(fn: ConverterFn) -> ConverterFn:
        if name in CONVERTERS:
            raise ValueError(f"converter {name!r} is registered twice")
        CONVERTERS[name] = Converter(name, fn, description)
        return fn

    return wrap


def get_converter(name: str) -> Converter:
    """The converter called ``name``; raises :class:`CheckpointError` listing the known ones."""
    try:
        return CONVERTERS[name]
    except KeyError:
        raise CheckpointError(f"unknown checkpoint format {name!r}; known: {', '.join(CONVERTERS)}") from None


# ----------------------------------------------------------------------------------------------- helpers

def unwrap(checkpoint: Any, keys: tuple[str, ...], key: str | None = None, fmt: str = "") -> StateDict:
    """The state dict inside ``checkpoint``: ``checkpoint[key]`` if given, else the first of ``keys`` present,
    else ``checkpoint`` itself when it is already flat.

    Raises:
        CheckpointError: the requested key is absent, or no tensor dict is found; names the top-level keys.
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{fmt} checkpoint: expected a dict, got {type(checkpoint).__name__}")
    top = [str(k) for k in checkpoint]
    if key is not None:
        if key not in checkpoint:
            raise CheckpointError(f"{fmt} checkpoint has no key {key!r}; top-level keys: {_head(top)}")
        found = checkpoint[key]
    else:
        found = next((checkpoint[k] for k in keys if isinstance(checkpoint.get(k), Mapping)), checkpoint)
    if not isinstance(found, Mapping):
        raise CheckpointError(f"{fmt} checkpoint: {key!r} is not a state dict")
    out = {k: v for k, v in found.items() if isinstance(v, torch.Tensor)}
    if not out:
        expect = f"one of {list(keys)} or a flat state dict" if keys else "a flat state dict"
        raise CheckpointError(f"{fmt} checkpoint holds no tensors where {expect} was expected; "
                              f"top-level keys: {_head(top)}")
    return out


def strip_prefix(state_dict: StateDict, prefix: str) -> StateDict:
    """Remove a leading ``prefix`` from every key that has it (other keys are kept unchanged)."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def keep_prefix(state_dict: StateDict, prefix: str) -> StateDict:
    """Keep only the keys that start with ``prefix``, without it."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def drop(state_dict: StateDict, *patterns: str) -> StateDict:
    """Remove keys matching any regular expression in ``patterns`` (``re.match``, anchored at the start)."""
    regex = re.compile("|".join(f"(?:{p})" for p in patterns))
    dropped = [k for k in state_dict if regex.match(k)]
    if dropped:
        logger.debug("dropped %d checkpoint keys: %s", len(dropped), _head(dropped))
    return {k: v for k, v in state_dict.items() if not regex.match(k)}


def _head(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > n else shown


# ---------------------------------------------------------------------------------------------- formats

@converter("timm", "a timm state dict, flat or under 'model'/'state_dict'/'model_state'/'module'; "
                   "'module.' stripped")
def convert_timm(checkpoint: Any, key: str | None = None) -> StateDict:
    sd = unwrap(checkpoint, ("model", "state_dict", "model_state", "module"), key, "timm")
    return strip_prefix(sd, "module.")


@converter("mae", "MAE: {'model': encoder state dict} (pretrained: norm; fine-tuned: fc_norm + head)")
def convert_mae(checkpoint: Any, key: str | None = None) -> StateDict:
    sd = unwrap(checkpoint, ("model",), key, "MAE")
    # the full pretraining model (demo "visualize" file) also holds the decoder and the mask token
    return drop(sd, r"decoder_", r"mask_token$")


@converter("dino", "DINO: flat backbone file, or full checkpoint {'teacher': backbone.* + head.*}")
def convert_dino(checkpoint: Any, key: str | None = None) -> StateDict:
    sd = unwrap(checkpoint, ("teacher",), key, "DINO")
    sd = strip_prefix(strip_prefix(sd, "module."), "backbone.")
    return drop(sd, r"head\.")  # DINOHead projector of the full checkpoint


def mocov3_sincos_pos_embed(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """MoCo-v3's fixed position table ``[1, 1 + grid**2, dim]``: a zero [cls] row, then per patch (row-major)
    ``[sin(r w), cos(r w), sin(c w), cos(c w)]`` with ``w = temperature ** -(arange(dim/4) / (dim/4))``, ``r``
    the patch row and ``c`` its column (moco-v3 ``vits.py``, ``build_2d_sincos_position_embedding``)."""
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)  # [dim/4]
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                                indexing="ij")
    out_r, out_c = rows.flatten()[:, None] * omega, cols.flatten()[:, None] * omega  # [grid**2, dim/4]
    table = torch.cat([out_r.sin(), out_r.cos(), out_c.sin(), out_c.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), table])[None]


def _check_mocov3_pos_embed(sd: StateDict, atol: float = 1e-2) -> None:
    """Refuse a file whose ``pos_embed`` is not MoCo-v3's fixed sin-cos table (it is never trained).

    A flat ViT file of another method (DINO, iBOT: learned position tables) has MoCo-v3's key names and
    shapes, and MoCo-v3 ViT-S's 12 heads have the same parameter shapes as their 6, so only this table
    tells such a file from a MoCo-v3 one. ``atol`` tolerates files stored in half precision.
    """
    pos = sd.get("pos_embed")
    if pos is None or pos.ndim != 3 or pos.shape[-1] % 4:
        return
    grid = math.isqrt(pos.shape[1] - 1)
    if grid * grid != pos.shape[1] - 1:
        return  # not a [cls] row plus a square grid: the strict load names the shape mismatch
    expected = mocov3_sincos_pos_embed(grid, pos.shape[-1])
    if not torch.allclose(pos.float(), expected, rtol=0, atol=atol):
        raise CheckpointError(
            "MoCo-v3 checkpoint: pos_embed is not MoCo-v3's fixed 2-D sin-cos table, so this is not a MoCo-v3 "
            "ViT (a DINO or iBOT file has the same keys and shapes, and would silently run with MoCo-v3 "
            "ViT-S's 12 heads); pass the official vit-*-300ep.pth.tar or choose the file's own preset")


@converter("mocov3", "MoCo-v3: {'state_dict': module.base_encoder.* (+ momentum_encoder, predictor)}")
def convert_mocov3(checkpoint: Any, key: str | None = None) -> StateDict:
    sd = unwrap(checkpoint, ("state_dict", "model"), key, "MoCo-v3")
    for prefix in ("module.base_encoder.", "base_encoder."):
        if any(k.startswith(prefix) for k in sd):
            # the encoder's head is MoCo's 3-layer projector, not a classifier (main_lincls.py:177-189)
            return drop(keep_prefix(sd, prefix), r"head\.")
    sd = strip_prefix(sd, "module.")  # already converted (e.g. convert_to_deit.py output)
    _check_mocov3_pos_embed(sd)
    return sd


@converter("ibot", "iBOT: {'state_dict': backbone} (checkpoint_teacher.pth), full {'teacher': backbone.*} "
                   "or flat")
def convert_ibot(checkpoint: Any, key: str | None = None) -> StateDict:
    sd = unwrap(checkpoint, ("state_dict", "teacher"), key, "iBOT")
    sd = strip_prefix(strip_prefix(sd, "module."), "backbone.")
    return drop(sd, r"head\.", r"masked_embed$")


@converter("beitv2", "BEiT-v2 pretraining: {'model'|'module': ...} with a shared rel-pos bias, lm_head, "
                     "cls_pt_layers")
def convert_beitv2(checkpoint: Any, key: str | None = None) -> StateDict:
    sd = unwrap(checkpoint, ("model", "module"), key, "BEiT-v2")
    return drop(sd, r"mask_token$", r"lm_head\.", r"cls_pt_layers\.", r".*relative_position_index$")


@converter("simmim", "SimMIM: {'model': encoder.* + decoder.*}")
def convert_simmim(checkpoint: Any, key: str | None = None) -> StateDict:
    sd = unwrap(checkpoint, ("model",), key, "SimMIM")
    if any(k.startswith("encoder.") for k in sd):
        sd = keep_prefix(sd, "encoder.")  # the decoder (1x1 conv + pixel shuffle) is left behind
    return drop(sd, r"mask_token$", r".*relative_position_index$")


@converter("maskfeat", "MaskFeat (SlowFast): {'model_state': ...} without a final norm; "
                       "pred_head.transforms.0.0 -> norm")
def convert_maskfeat(checkpoint: Any, key: str | None = None) -> StateDict:
    sd = unwrap(checkpoint, ("model_state",), key, "MaskFeat")
    # MaskMViT deletes the final norm; the LayerNorm the pretraining head applies to the last block's output
    # plays its role, so it becomes timm's final `norm` (documented choice, checkpoints.md "MaskFeat").
    norm = {k.replace("pred_head.transforms.0.0.", "norm.", 1): v
            for k, v in sd.items() if k.startswith("pred_head.transforms.0.0.")}
    sd = drop(sd, r"mask_token$", r"pred_head\.", r"hogs\.")
    if "norm.weight" not in sd:
        sd.update(norm)
    return sd


@converter("ijepa", "I-JEPA: {'encoder'|'target_encoder': module.*, 'predictor': ...}")
def convert_ijepa(checkpoint: Any, key: str | None = None) -> StateDict:
    sd = unwrap(checkpoint, ("encoder",), key, "I-JEPA")
    return strip_prefix(sd, "module.")


@converter("dinov2", "DINOv2: flat, pos_embed with a [cls] row, register_tokens, mask_token")
def convert_dinov2(checkpoint: Any, key: str | None = None) -> StateDict:
    from timm.models.vision_transformer import _convert_dinov2

    sd = strip_prefix(unwrap(checkpoint, ("model", "teacher"), key, "DINOv2"), "backbone.")
    if "mask_token" in sd or "register_tokens" in sd:
        # drops mask_token; with registers: reg_token <- register_tokens and the [cls] row of pos_embed is
        # folded into cls_token, because timm's reg4 models have no_embed_class=True
        # timm annotates the model argument but never reads it
        sd = _convert_dinov2(dict(sd), model=None)  # type: ignore[arg-type]
    return sd


_CAPI_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^encoder\.blocks\.(\d+)\.residual1\.norm\.", r"blocks.\1.norm1."),
    (r"^encoder\.blocks\.(\d+)\.residual1\.fn\.", r"blocks.\1.attn."),
    (r"^encoder\.blocks\.(\d+)\.residual2\.norm\.", r"blocks.\1.norm2."),
    (r"^encoder\.blocks\.(\d+)\.residual2\.fn\.", r"blocks.\1.mlp."),
    (r"^patch_embed\.(weight|bias)$", r"patch_embed.proj.\1"),
    (r"^registers$", "reg_token"),
)


@converter("capi", "CAPI: flat backbone.* (encoder.blocks.*.residual{1,2}, registers, decoder, mask_token)")
def convert_capi(checkpoint: Any, key: str | None = None) -> StateDict:
    sd = unwrap(checkpoint, (), key, "CAPI")
    if any(k.startswith("backbone.") for k in sd):
        sd = keep_prefix(sd, "backbone.")  # the file also holds training heads outside the backbone
    sd = drop(sd, r"decoder\.", r"mask_token$")  # the decoder is not part of attnflow's CAPI encoder
    out: StateDict = {}
    for k, v in sd.items():
        for pattern, repl in _CAPI_RENAMES:
            k, n = re.subn(pattern, repl, k)
            if n:
                break
        out[k] = v
    return out


# ------------------------------------------------------------------------------ adaptation and loading

DINOV2_INTERPOLATE_OFFSET = 0.1
"""DINOv2's ``interpolate_offset`` for its models without registers (dinov2 ``hub/backbones.py``)."""


# ------------------------------------------------------------------------------------- recognising a file

OFFICIAL_LAYOUTS: tuple[tuple[str, str | None, str], ...] = (
    ("dinov2", None, r"mask_token$|register_tokens$"),
    ("mocov3", "state_dict", r"module\.base_encoder\."),
    ("dino", "teacher", r"(module\.)?backbone\."),
    ("ibot", "teacher", r"(module\.)?backbone\."),
    ("ijepa", "encoder", r"module\."),
    ("ijepa", "target_encoder", r"module\."),
    ("beitv2", "model", r"lm_head\.|cls_pt_layers\."),
    ("beitv2", "module", r"lm_head\.|cls_pt_layers\."),
    ("simmim", "model", r"encoder\.|decoder\."),
    ("maskfeat", "model_state", r"pred_head\."),
    ("capi", None, r"backbone\.encoder\.blocks\."),
)
"""Distinctive marks of official files, ``(converter, top-level key (None: a flat file), regex that one of
the keys under it matches)`` (``shared/checkpoints.md``): used to name the right preset when a file does not
fit the model it was given to."""


def official_formats(checkpoint: Any) -> list[str]:
    """Names of the converters whose official layout ``checkpoint`` shows (:data:`OFFICIAL_LAYOUTS`), e.g.
    ``["dinov2"]`` for a flat dict holding ``mask_token``, ``["dino", "ibot"]`` for a full DINO checkpoint."""
    if not isinstance(checkpoint, Mapping):
        return []
    found: list[str] = []
    for name, top, pattern in OFFICIAL_LAYOUTS:
        inner = checkpoint if top is None else checkpoint.get(top)
        if name not in found and isinstance(inner, Mapping) and \
                any(isinstance(k, str) and re.match(pattern, k) for k in inner):
            found.append(name)
    return found


def resample_pos_embed_dinov2(patch_table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resample a square patch position table as DINOv2's ``interpolate_pos_encoding`` does at run time.

    Bicubic without antialias, with scale factors ``(grid + 0.1) / M`` instead of an output size (the
    offset DINOv2 keeps for its models without registers), computed in fp32.

    Args:
        patch_table: ``[1, M * M, D]`` patch rows only (no prefix rows), row-major.
        grid: ``(rows, cols)`` of the run's patch grid.

    Returns:
        ``[1, rows * cols, D]`` in the dtype of ``patch_table``.
    """
    side = math.isqrt(patch_table.shape[1])
    dim = patch_table.shape[-1]
    scale = tuple(float(g + DINOV2_INTERPOLATE_OFFSET) / side for g in grid)
    image = patch_table.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)  # [1, D, M, M]
    out = torch.nn.functional.interpolate(image, scale_factor=scale, mode="bicubic", antialias=False)
    if tuple(out.shape[-2:]) != tuple(grid):
        raise CheckpointError(f"DINOv2 resampling of a {side}x{side} position table gave a "
                              f"{tuple(out.shape[-2:])} grid, not {tuple(grid)}")
    return out.permute(0, 2, 3, 1).reshape(1, -1, dim).to(patch_table.dtype)


def adapt_state_dict(state_dict: StateDict, model: nn.Module, *, pos_resample: str = "timm") -> StateDict:
    """Resample what depends on the input resolution to ``model``'s patch grid.

    - ``pos_embed``: bicubic resampling of the patch rows, by timm's ``resample_abs_pos_embed``
      (``pos_resample="timm"``) or by DINOv2's run-time rule (``"dinov2"``, see
      :func:`resample_pos_embed_dinov2`); the rows of prefix tokens are kept when the model stores them
      (``no_embed_class=False``).
    - ``*relative_position_bias_table`` (BEiT family): timm's ``resize_rel_pos_bias_table`` to the model's
      window.

    Args:
        state_dict: converted state dict (timm key names).
        model: the model it will be loaded into.
        pos_resample: ``"timm"`` or ``"dinov2"`` (a preset's ``pos_resample``).

    Returns:
        A new dict; tensors that need no change are shared, not copied.
    """
    from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table

    out = dict(state_dict)
    target = getattr(model, "pos_embed", None)
    pos = out.get("pos_embed")
    if isinstance(target, torch.Tensor) and pos is not None and pos.ndim == 3 and pos.shape != target.shape \
            and pos.shape[-1] == target.shape[-1]:
        num_prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
        n_old = pos.shape[1] - num_prefix
        side = math.isqrt(max(n_old, 0))
        if side * side != n_old:
            raise CheckpointError(
                f"pos_embed {tuple(pos.shape)} does not hold {num_prefix} prefix row(s) plus a square patch grid; "
                f"the model expects {tuple(target.shape)}")
        patch_embed: Any = model.patch_embed  # timm PatchEmbed (the model has an absolute pos_embed)
        grid = tuple(patch_embed.grid_size)
        logger.info("resampling pos_embed from a %dx%d to a %dx%d patch grid (%s)", side, side, *grid, pos_resample)
        if pos_resample == "dinov2":
            patches = resample_pos_embed_dinov2(pos[:, num_prefix:], grid)
            out["pos_embed"] = torch.cat([pos[:, :num_prefix], patches], dim=1)
        else:
            out["pos_embed"] = resample_abs_pos_embed(pos, new_size=list(grid), old_size=[side, side],
                                                      num_prefix_tokens=num_prefix, verbose=False)
    for key, value in state_dict.items():
        if not key.endswith("relative_position_bias_table"):
            continue
        try:
            module = model.get_submodule(key[: -len(".relative_position_bias_table")])
        except AttributeError:
            continue  # not in the model: reported as unexpected by load_converted
        table = getattr(module, "relative_position_bias_table", None)
        if isinstance(table, torch.Tensor) and table.shape != value.shape and value.shape[-1] == table.shape[-1]:
            window_size: Any = module.window_size  # (rows, cols) of timm's relative-position attention
            out[key] = resize_rel_pos_bias_table(value, new_window_size=window_size,
                                                 new_bias_shape=table.shape)
    return out


def _features_only(model: nn.Module) -> bool:
    head = getattr(model, "head", None)
    return head is None or isinstance(head, nn.Identity)


def load_converted(model: nn.Module, state_dict: StateDict, *, expected: str, pos_resample: str = "timm") -> None:
    """Load ``state_dict`` into ``model`` strictly, after resolution adaptation.

    The only tolerated difference: ``head.*`` classifier keys in the file when the model is built without a
    classifier (``num_classes=0``: attnflow takes features, e.g. of MAE fine-tuned), which are dropped.

    Args:
        model: target module (modified in place).
        state_dict: converted state dict (timm key names).
        expected: what was expected, for the error, e.g. ``"preset mocov3-vit-b16 (format mocov3)"``.
        pos_resample: how the position table is resampled (:func:`adapt_state_dict`).

    Raises:
        CheckpointError: naming the first missing and unexpected keys and their counts, or shape mismatches.
    """
    sd = dict(state_dict)
    if _features_only(model):
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:  # before any resampling, which could only fail on a table of another layout
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_head(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_head(unexpected)}")
        raise CheckpointError(f"checkpoint does not fit {expected}: {'; '.join(parts)}")
    _check_shapes(own, sd, expected, skip=_resolution_keys(sd))  # the rest: the tables are resampled first
    sd = adapt_state_dict(sd, model, pos_resample=pos_resample)
    _check_shapes(own, sd, expected)
    model.load_state_dict(sd, strict=True)


def _resolution_keys(state_dict: StateDict) -> set[str]:
    """The keys whose shape follows the input resolution (resampled by :func:`adapt_state_dict`)."""
    return {k for k in state_dict if k == "pos_embed" or k.endswith("relative_position_bias_table")}


def _check_shapes(own: StateDict, sd: StateDict, expected: str, skip: Collection[str] = ()) -> None:
    wrong = [f"{k} {tuple(sd[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
             if k not in skip and tuple(sd[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(f"checkpoint does not fit {expected}: {len(wrong)} shape mismatch(es): "
                              f"{_head(wrong, 3)}")
