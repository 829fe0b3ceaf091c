"""Sources of non-trainable token aggregation (paper Appendix C.2, Table 5 and Fig. 7).

A fixed aggregation vector ``w`` (``[n_patches]``, non-negative, sums to 1) turns an image's patch tokens
``x_i`` into one representation ``sum_i w_i x_i`` without any trainable pooling. The sources, each computed
from the last block's post-softmax attention ``[B, H, N, N]`` of one forward pass:

==================  ===================================================================================
``cls_mean``        the [cls] -> patch row averaged over heads, renormalised over the patch keys
                    (Table 5: "Average MAE [cls] token attention")
``cls_min_entropy`` per image, the head whose renormalised [cls] -> patch row has the lowest entropy
                    (Table 5: "Lowest-entropy MAE [cls] token attention")
``central``         the central patch's row ``(gh // 2, gw // 2)`` averaged over heads, renormalised over the
                    patch keys (Table 5: "MAE central patch token attention")
``reference:NAME``  ``cls_mean`` of another (reference) model on the same image, used to weigh this model's
                    tokens (Table 5: "Average DINO [cls] token attention"); same patch grid required
==================  ===================================================================================

This module names and parses the sources and labels them as the paper does; the vectors themselves are
computed in :mod:`attnflow.aggregation.vectors`, the forwards in :mod:`attnflow.aggregation.capture`, the
dataset statistics (entropy, pairwise KL) in :mod:`attnflow.aggregation.statistics`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from ..errors import AttnflowError
from ..models.record import model_record

SOURCES: tuple[str, ...] = ("cls_mean", "cls_min_entropy", "central")
"""Sources computed from the aggregated model's own attention."""

CLS_SOURCES: frozenset[str] = frozenset({"cls_mean", "cls_min_entropy"})
"""Sources that need a [cls] token."""

REFERENCE_PREFIX = "reference:"
HEAD_PREFIX = "head:"


class AggregationError(AttnflowError, ValueError):
    """A fixed-aggregation source that does not parse or does not fit the model(s)."""


@dataclass(frozen=True)
class Source:
    """A parsed aggregation source.

    Attributes:
        name: the canonical string (``"cls_mean"``, ``"reference:dino-vit-b16"``, ...).
        kind: one of :data:`SOURCES`, ``"reference"`` or ``"head"``.
        target: the reference model name (``kind == "reference"``) or the head spec (``kind == "head"``).
    """

    name: str
    kind: str
    target: str | None = None

    @property
    def needs_cls(self) -> bool:
        """Whether the aggregated model itself must have a [cls] token."""
        return self.kind in CLS_SOURCES


def parse_source(text: str, *, allow_head: bool = False) -> Source:
    """Parse ``cls_mean``, ``cls_min_entropy``, ``central`` or ``reference:<model-name>``.

    Args:
        text: the source string (dashes are accepted for underscores: ``cls-mean``).
        allow_head: also accept ``head:<spec>`` (the statistics' name of a trained head's weights).

    Raises:
        AggregationError: for an unknown source (close names suggested) or a reference without a name.
    """
    raw = str(text).strip()
    if raw.startswith(REFERENCE_PREFIX):
        target = raw[len(REFERENCE_PREFIX):].strip()
        if not target:
            raise AggregationError("reference: needs a model name, e.g. reference:dino-vit-b16")
        return Source(f"{REFERENCE_PREFIX}{target}", "reference", target)
    if allow_head and raw.startswith(HEAD_PREFIX):
        return Source(raw, "head", raw[len(HEAD_PREFIX):])
    name = raw.replace("-", "_")
    if name in SOURCES:
        return Source(name, name)
    valid = [*SOURCES, "reference:<model-name>"]
    close = difflib.get_close_matches(name, [*SOURCES, "reference"], n=3, cutoff=0.5)
    close = [c if c != "reference" else "reference:<model-name>" for c in close]
    hint = f"; did you mean {', '.join(close)}?" if close else f"; choose from {', '.join(valid)}"
    raise AggregationError(f"unknown aggregation source {raw!r}{hint}")


def check_source_fits(source: Source, has_cls: bool, model_name: str = "the model") -> None:
    """Raise one line when ``source`` needs a [cls] token that the model lacks."""
    if source.needs_cls and not has_cls:
        raise AggregationError(f"aggregation {source.name} needs a [cls] token and {model_name} has none; "
                               f"use central or reference:<model-name>")


def model_label(model: nn.Module, name: str | None = None) -> str:
    """Short model name for source labels: the preset's method (``MAE``, ``DINO``; a preset's timm hub tag such as
    ``vit_base_patch16_224.mae`` counts too), else the given name."""
    from ..models.registry import find_spec, list_specs

    spec = find_spec(name) if name else None
    if spec is None:
        preset = model_record(model).preset
        spec = find_spec(preset) if preset else None
    if spec is None and name:
        spec = next((s for s in list_specs() if s.hub_tag == name), None)
    return spec.method if spec is not None else (name or type(model).__name__)


def head_label(spec_name: str) -> str:
    """Display name of a trained head's aggregation (``abmilp`` -> ``AbMILP``)."""
    from ..probes.specs import parse_head_spec

    spec = parse_head_spec(spec_name)
    if spec.kind == "abmilp":
        label = {"none": "", "both": "SA-", "map": "SA(map)-"}[spec.sa_apply] + "AbMILP"
        scorer = "" if spec.scorer == "linear" else (spec.scorer if spec.depth == 2
                                                     else spec.scorer.replace("mlp", f"mlp{spec.depth}"))
        extra = [x for x in ("+[cls]" if spec.include_cls else "", scorer, "PE" if spec.cond == "pe" else "") if x]
        return label + (f" ({', '.join(extra)})" if extra else "")
    if spec.kind == "attentive":
        return f"Attentive probing ({spec.num_heads} head{'s' if spec.num_heads > 1 else ''})"
    return {"avg": "Average pooling", "cls": "[cls] token", "both": "[cls] and average pooling"}.get(spec.kind,
                                                                                                 spec.name)


def source_label(source: str | Source, model: str, reference: str | None = None) -> str:
    """The paper's Table 5 name of a source, e.g. ``"Average MAE [cls] token attention"``.

    Args:
        source: the source.
        model: the aggregated model's label (``"MAE"``).
        reference: the reference model's label (``"DINO"``) for ``reference:`` sources.
    """
    src = parse_source(source, allow_head=True) if isinstance(source, str) else source
    if src.kind == "cls_mean":
        return f"Average {model} [cls] token attention"
    if src.kind == "cls_min_entropy":
        return f"Lowest-entropy {model} [cls] token attention"
    if src.kind == "central":
        return f"{model} central patch token attention"
    if src.kind == "reference":
        return f"Average {reference or src.target} [cls] token attention"
    return head_label(src.target or "")


def default_sources(has_cls: bool, reference_name: str | None = None, head: Any = None) -> list[str]:
    """Every source that fits: the model's own (the [cls] ones only with [cls]), the reference's, the head's."""
    out = [s for s in SOURCES if has_cls or s == "central"]
    if reference_name is not None:
        out.append(f"reference:{reference_name}")
    if head is not None:
        out.append(f"{HEAD_PREFIX}{head.spec.name}")
    return out


def reference_mismatch(source: Source, reference_name: str) -> str:
    """The error line for a ``reference:<name>`` source that names another model than the reference given."""
    return (f"source {source.name} names {source.target} but --reference is {reference_name}: its vectors would "
            f"be {reference_name}'s; use reference:{reference_name}")
