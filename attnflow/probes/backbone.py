"""The backbone a probe head was trained on: what a saved head records of it, and the check that a head fits the
model it is applied to (the Table 5 statistics, localization and the per-image maps read trained heads).
"""

from __future__ import annotations

import logging

import torch.nn as nn

from ..encode import TokenEncoder
from ..errors import AttnflowError
from ..models.record import model_record
from ..provenance import weights_fingerprint
from .heads import ProbeHead

log = logging.getLogger(__name__)


class HeadMismatchError(AttnflowError, ValueError):
    """A trained head that cannot be applied to this model's tokens."""


def check_head(head: ProbeHead, encoder: TokenEncoder, path: str = "the head", model_name: str = "the model"
               ) -> None:
    """Refuse a head whose weights are not an aggregation over this model's patch tokens, in one line: a head of
    a fixed aggregation or a ``cls`` head, a head saved for another model (``head.meta["model"]`` against the
    model's preset or architecture; a preset and its timm hub tag are the same model), or one
    of another token width."""
    meta = getattr(head, "meta", {}) or {}
    if meta.get("aggregation"):
        raise HeadMismatchError(f"{path} was trained on the fixed aggregation {meta['aggregation']}, not on the "
                               "tokens: pass a selective-aggregation head (abmilp, apK, ...)")
    if head.spec.kind == "cls":
        raise HeadMismatchError(f"{path} is a 'cls' head: its weights sit on [cls], not on the patches; pass an "
                               "AbMILP or attentive-probing head")
    if not head.spec.has_vector:
        raise HeadMismatchError(f"{path} is a '{head.spec.name}' head: it concatenates [cls] and the patch average "
                               "and has no aggregation vector; pass an AbMILP or attentive-probing head")
    trained_on = meta.get("model")
    record = model_record(encoder.model)
    this = record.preset or record.arch
    if trained_on and this and _model_identity(str(trained_on)) != _model_identity(str(this)):
        raise HeadMismatchError(f"{path} was trained on {trained_on}, not on {model_name} ({this}): a head's "
                               "weights only mean something on the tokens of the model it was trained on")
    enc = encoder
    if head.has_cls != enc.has_cls or head.dim != enc.dim:
        raise HeadMismatchError(f"{path} was trained on tokens of width {head.dim} (has_cls={head.has_cls}); this "
                               f"model gives width {enc.dim} (has_cls={enc.has_cls})")
    other = _other_weights(meta, encoder.model)
    if other:
        log.warning("%s was trained on %s of %s; this run uses %s: its weights over the patches were learned on "
                    "other tokens", path, other[0], trained_on or "this model", other[1])


def backbone_record(model: nn.Module) -> dict:
    """What a saved head records of the weights it was trained on (see :func:`check_head`): checkpoint sha256,
    checkpoint key, random init (from the model's record), the weights fingerprint and the input size it was taken
    at."""
    record = model_record(model)
    return {"checkpoint_sha256": record.sha256, "checkpoint_key": record.checkpoint_key,
            "random_init": record.random_init, "weights": weights_fingerprint(model), "img_size": _input_size(model)}


def _input_size(model: nn.Module) -> list[int] | None:
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    return [int(v) for v in size] if isinstance(size, (tuple, list)) else None


def _other_weights(head_meta: dict, model: nn.Module) -> tuple[str, str] | None:
    """``(the head's backbone weights, this model's)`` in words when a saved head records other weights than
    ``model`` has: random against trained weights, another checkpoint file (sha256), another checkpoint key
    (e.g. a teacher's head on the student), or, at the same input size, another weights fingerprint; else
    ``None``. Heads saved before weights were recorded, and models not built by :func:`attnflow.load_model`,
    pass."""
    record = model_record(model)
    if "random_init" not in head_meta or not record.known:
        return None
    if bool(head_meta["random_init"]) != record.random_init:
        return (("random weights", "trained weights") if head_meta["random_init"]
                else ("trained weights", "random weights"))
    theirs, mine = head_meta.get("checkpoint_sha256"), record.sha256
    if theirs and mine and theirs != mine:
        return f"the checkpoint with sha256 {theirs[:12]}", f"the checkpoint with sha256 {mine[:12]}"
    if "checkpoint_key" in head_meta and head_meta["checkpoint_key"] != record.checkpoint_key:
        return (f"the checkpoint key {head_meta['checkpoint_key'] or '(default)'}",
                f"the checkpoint key {record.checkpoint_key or '(default)'}")
    if head_meta.get("weights") and head_meta.get("img_size") == _input_size(model):
        fingerprint = weights_fingerprint(model)
        if head_meta["weights"] != fingerprint:
            return f"weights with fingerprint {head_meta['weights']}", f"weights with fingerprint {fingerprint}"
    return None


def _model_identity(name: str) -> str:
    """A preset's name for a preset or its timm hub tag (``vit_base_patch16_224.mae`` -> ``mae-vit-b16``), else the
    name itself."""
    from ..models.registry import find_spec, list_specs

    spec = find_spec(name) or next((s for s in list_specs() if s.hub_tag == name), None)
    return spec.name if spec is not None else name
