"""Sources of non-trainable token aggregation (paper Appendix C.2, Table 5 and Fig. 7).

A fixed aggregation turns an image's patch tokens ``x_i`` into one representation ``sum_i w_i x_i`` without any
trainable pooling. Each source has a *vector* (``[n_patches]``, non-negative, sums to 1: the Table 5 entropy,
the Fig. 7 KL divergences and the Fig. 9 maps) and a *feature* (the representation the probe trains on, Table 5's
accuracy). Both come from the last block's post-softmax attention ``[B, H, N, N]`` of one forward pass; the
features are those of the paper's official code (github.com/gmum/beyond_cls, ``models_vit.py``), name for name:

=====================  ==============================================================================================
``cls_mean``           the [cls] -> patch row averaged over heads, renormalised over the patch keys; feature
                       ``sum_i w_i x_i`` (Table 5: "Average MAE [cls] token attention"; official ``attn-mn``)
``cls_min_entropy``    per image, the head whose renormalised [cls] -> patch row has the lowest entropy; feature
                       ``sum_i w_i x_i`` (Table 5: "Lowest-entropy MAE [cls] token attention"; official ``attn-lcte``)
``central``            the same as ``ca1`` (Table 5: "MAE central patch token attention")
``caK``                the attention of the central KxK window of patch queries (see :func:`central_window`),
                       averaged over heads and window queries, restricted to patch keys and renormalised; feature
                       ``mean_i(w_i x_i) = (1/N) sum_i w_i x_i`` with the official ``+1e-6`` in the renormalisation
                       (official ``caK``, K = 1..4 there; any K >= 1 here)
``cpK``                the plain mean of the central KxK patch tokens: vector ``1/K^2`` on the window, 0 elsewhere;
                       feature the window's mean (official ``cpK``)
``reference:NAME``     the [cls] -> patch attention of another (reference) model's last block on the same image,
                       averaged over heads, weighing this model's tokens (Table 5: "Average DINO [cls] token
                       attention"; official ``dino``); feature ``mean_i(a_i x_i)`` with ``a`` *not* renormalised (each
                       image keeps its own [cls] -> patch mass); same patch grid required
``central_sum``,       the vectors of ``central`` / ``caK`` / ``reference:NAME`` with the feature ``sum_i w_i x_i``
``caK_sum``,           (``w`` renormalised exactly, no ``1/N``): attnflow's scale before it reproduced the official
``reference_sum:NAME`` features, kept under these names
``patch:R,C``          the attention of the one patch at 0-based row R, column C, averaged over heads,
                       renormalised; feature ``sum_i w_i x_i`` (not in the official code; ``patch:7,7`` on a 14x14
                       grid is what attnflow called ``central`` before it took the official central patch)
``rollout``            attention rollout (Abnar & Zuidema 2020) through *every* block: heads fused by the mean,
                       ``0.5 * A + 0.5 * I`` rows renormalised, multiplied from the first block to the last; the
                       [cls] row (without [cls]: the mean of the patch rows) over the patches, renormalised; feature
                       ``sum_i w_i x_i`` (not in the paper nor the official code; see
                       :mod:`attnflow.aggregation.rollout`). Not a default source: it un-fuses every block's
                       attention and costs ``L * N^3`` float64 multiply-adds per image
=====================  ==============================================================================================

Why the scale matters: the probe normalises the feature with ``BatchNorm1d(affine=False, eps=1e-6)``, so a
feature ``c`` times smaller behaves as the same feature with eps ``c^2`` times larger; with ``c = N = 196`` that is
eps 0.038 instead of 1e-6, and the accuracies differ. ``reference:`` features also carry each image's own
[cls] -> patch mass. See ``docs/official-code.md``.

This module names and parses the sources and labels them as the paper does; the vectors and feature weights are
computed in :mod:`attnflow.aggregation.vectors` (``rollout``: :mod:`attnflow.aggregation.rollout`), the forwards
in :mod:`attnflow.aggregation.capture`, the dataset statistics (entropy, pairwise KL) in
:mod:`attnflow.aggregation.statistics`.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from ..errors import AttnflowError
from ..models.record import model_record

SOURCES: tuple[str, ...] = ("cls_mean", "cls_min_entropy", "central")
"""Table 5's sources computed from the aggregated model's own attention (the default sources of a run)."""

WINDOW_SIZES: tuple[int, ...] = (1, 2, 3, 4)
"""The central window sizes K of the official code's ``caK`` / ``cpK`` (any K >= 1 parses)."""

OWN_KINDS: frozenset[str] = frozenset({"cls_mean", "cls_min_entropy", "ca", "cp", "patch"})
"""Source kinds computed from the aggregated model's own attention."""

CLS_SOURCES: frozenset[str] = frozenset({"cls_mean", "cls_min_entropy"})
"""Sources that need a [cls] token."""

ROLLOUT = "rollout"
"""The attention-rollout source (every block's attention; :mod:`attnflow.aggregation.rollout`)."""

REFERENCE_PREFIX = "reference:"
REFERENCE_SUM_PREFIX = "reference_sum:"
PATCH_PREFIX = "patch:"
HEAD_PREFIX = "head:"
SUM_SUFFIX = "_sum"

_WINDOW = re.compile(r"^(?P<kind>ca|cp)(?P<size>[1-9][0-9]*)(?P<sum>_sum)?$")
_PATCH = re.compile(r"^\s*(?P<row>[0-9]+)\s*,\s*(?P<col>[0-9]+)\s*$")

NAMES: tuple[str, ...] = (*SOURCES, "central_sum", *(f"ca{k}" for k in WINDOW_SIZES),
                          *(f"ca{k}_sum" for k in WINDOW_SIZES), *(f"cp{k}" for k in WINDOW_SIZES), ROLLOUT)
"""Every fixed source name (the patterns ``patch:R,C``, ``reference:NAME`` and ``reference_sum:NAME`` aside)."""


class AggregationError(AttnflowError, ValueError):
    """A fixed-aggregation source that does not parse or does not fit the model(s)."""


@dataclass(frozen=True)
class Source:
    """A parsed aggregation source.

    Attributes:
        name: the canonical string (``"cls_mean"``, ``"ca2"``, ``"reference:dino-vit-b16"``, ...).
        kind: ``"cls_mean"``, ``"cls_min_entropy"``, ``"ca"`` (``central`` and ``caK``), ``"cp"``, ``"patch"``,
            ``"rollout"``, ``"reference"`` or ``"head"``.
        target: the reference model name (``kind == "reference"``) or the head spec (``kind == "head"``).
        size: the window side K of ``ca`` / ``cp`` (``central`` is 1); 0 for other kinds.
        patch: ``(row, col)`` of a ``patch:R,C`` source.
        summed: the feature is ``sum_i w_i x_i`` with ``w`` renormalised (``*_sum`` names) rather than the
            official code's scale; always True for kinds whose official feature is that sum already
            (``cls_mean``, ``cls_min_entropy``, ``cp``, ``patch``, ``rollout``).
    """

    name: str
    kind: str
    target: str | None = None
    size: int = 0
    patch: tuple[int, int] | None = None
    summed: bool = True

    @property
    def needs_cls(self) -> bool:
        """Whether the aggregated model itself must have a [cls] token."""
        return self.kind in CLS_SOURCES

    @property
    def needs_every_block(self) -> bool:
        """Whether the source reads every block's attention (``rollout``) rather than the last block's."""
        return self.kind == ROLLOUT

    @property
    def official_scale(self) -> bool:
        """Whether the feature is the official code's ``mean_i(w_i x_i)`` (``ca``, ``reference``) rather than a
        sum with weights summing to 1."""
        return not self.summed


def _suggest(name: str) -> str:
    patterns = ["reference:<model-name>", "reference_sum:<model-name>", "patch:<row>,<col>"]
    close = difflib.get_close_matches(name, [*NAMES, "reference", "reference_sum", "patch"], n=3, cutoff=0.5)
    close = [c if c not in ("reference", "reference_sum", "patch") else patterns[("reference", "reference_sum",
                                                                                   "patch").index(c)] for c in close]
    return (f"; did you mean {', '.join(close)}?" if close
            else f"; choose from {', '.join(NAMES[:3])}, caK, caK_sum, cpK, central_sum, {ROLLOUT}, "
                 f"{', '.join(patterns)}")


def parse_source(text: str, *, allow_head: bool = False) -> Source:
    """Parse a source name (see the module docstring): ``cls_mean``, ``cls_min_entropy``, ``central``,
    ``central_sum``, ``caK``, ``caK_sum``, ``cpK``, ``patch:R,C``, ``rollout``, ``reference:<model-name>`` or
    ``reference_sum:<model-name>``.

    Args:
        text: the source string (dashes are accepted for underscores in the name: ``cls-mean``, ``ca2-sum``).
        allow_head: also accept ``head:<spec>`` (the statistics' name of a trained head's weights).

    Raises:
        AggregationError: for an unknown source (close names suggested), a reference without a name or a
            malformed patch position.
    """
    raw = str(text).strip()
    for prefix, summed in ((REFERENCE_PREFIX, False), (REFERENCE_SUM_PREFIX, True), ("reference-sum:", True)):
        if raw.startswith(prefix):
            target = raw[len(prefix):].strip()
            canonical = REFERENCE_SUM_PREFIX if summed else REFERENCE_PREFIX
            if not target:
                raise AggregationError(f"{canonical} needs a model name, e.g. {canonical}dino-vit-b16")
            return Source(f"{canonical}{target}", "reference", target, summed=summed)
    if allow_head and raw.startswith(HEAD_PREFIX):
        return Source(raw, "head", raw[len(HEAD_PREFIX):])
    if raw.startswith(PATCH_PREFIX):
        match = _PATCH.match(raw[len(PATCH_PREFIX):])
        if not match:
            raise AggregationError(f"{raw!r}: a patch source is patch:<row>,<col> (0-based), e.g. patch:7,7")
        row, col = int(match["row"]), int(match["col"])
        return Source(f"{PATCH_PREFIX}{row},{col}", "patch", patch=(row, col))
    name = raw.replace("-", "_")
    if name in ("cls_mean", "cls_min_entropy", ROLLOUT):
        return Source(name, name)
    if name in ("central", "central_sum"):
        return Source(name, "ca", size=1, summed=name.endswith(SUM_SUFFIX))
    match = _WINDOW.match(name)
    if match and not (match["kind"] == "cp" and match["sum"]):
        return Source(name, match["kind"], size=int(match["size"]),
                      summed=match["kind"] == "cp" or bool(match["sum"]))
    if match:  # cpK_sum
        raise AggregationError(f"{raw!r}: cp{match['size']} is already the plain mean of its window (a sum with "
                               f"weights 1/K^2); use cp{match['size']}")
    raise AggregationError(f"unknown aggregation source {raw!r}{_suggest(name)}")


def check_source_fits(source: Source, has_cls: bool, model_name: str = "the model") -> None:
    """Raise one line when ``source`` needs a [cls] token that the model lacks."""
    if source.needs_cls and not has_cls:
        raise AggregationError(f"aggregation {source.name} needs a [cls] token and {model_name} has none; "
                               f"use central, caK, cpK, rollout or reference:<model-name>")


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
    """Display name of a trained head's aggregation (``abmilp`` -> ``AbMILP``, ``abmilp-k4-mean`` -> ``AbMILP (4
    patterns, mean)``)."""
    from ..probes.specs import parse_head_spec

    spec = parse_head_spec(spec_name)
    if spec.kind == "abmilp":
        label = {"none": "", "both": "SA-", "map": "SA(map)-"}[spec.sa_apply] + "AbMILP"
        scorer = "" if spec.scorer == "linear" else (spec.scorer if spec.depth == 2
                                                     else spec.scorer.replace("mlp", f"mlp{spec.depth}"))
        patterns = "" if spec.patterns == 1 and spec.name == spec.init_name else (
            f"{spec.patterns} pattern{'s' if spec.patterns > 1 else ''}" + (", mean" if spec.combine == "mean" else ""))
        extra = [x for x in ("+[cls]" if spec.include_cls else "", patterns, scorer, "PE" if spec.cond == "pe" else "")
                 if x]
        return label + (f" ({', '.join(extra)})" if extra else "")
    if spec.kind == "attentive":
        return f"Attentive probing ({spec.num_heads} head{'s' if spec.num_heads > 1 else ''})"
    return {"avg": "Average pooling", "cls": "[cls] token", "both": "[cls] and average pooling"}.get(spec.kind,
                                                                                                 spec.name)


def source_label(source: str | Source, model: str, reference: str | None = None) -> str:
    """The paper's Table 5 name of a source, e.g. ``"Average MAE [cls] token attention"`` (sources the paper does
    not list get a label in the same words).

    Args:
        source: the source.
        model: the aggregated model's label (``"MAE"``).
        reference: the reference model's label (``"DINO"``) for ``reference:`` sources.
    """
    src = parse_source(source, allow_head=True) if isinstance(source, str) else source
    summed = " (renormalised sum)" if src.kind in ("ca", "reference") and src.summed else ""
    if src.kind == "cls_mean":
        return f"Average {model} [cls] token attention"
    if src.kind == "cls_min_entropy":
        return f"Lowest-entropy {model} [cls] token attention"
    if src.kind == "ca" and src.name.startswith("central"):
        return f"{model} central patch token attention{summed}"
    if src.kind == "ca":
        return f"{model} central {src.size}x{src.size} patch token attention{summed}"
    if src.kind == "cp":
        return f"Mean of {model}'s central {src.size}x{src.size} patch tokens"
    if src.kind == "patch" and src.patch is not None:
        return f"{model} patch ({src.patch[0]}, {src.patch[1]}) token attention"
    if src.kind == ROLLOUT:
        return f"{model} attention rollout"
    if src.kind == "reference":
        return f"Average {reference or src.target} [cls] token attention{summed}"
    return head_label(src.target or "")


def default_sources(has_cls: bool, reference_name: str | None = None, head: Any = None) -> list[str]:
    """Table 5's sources that fit: the model's own (the [cls] ones only with [cls]), the reference's, the head's."""
    out = [s for s in SOURCES if has_cls or s == "central"]
    if reference_name is not None:
        out.append(f"{REFERENCE_PREFIX}{reference_name}")
    if head is not None:
        out.append(f"{HEAD_PREFIX}{head.spec.name}")
    return out


def reference_mismatch(source: Source, reference_name: str) -> str:
    """The error line for a ``reference:<name>`` source that names another model than the reference given."""
    return (f"source {source.name} names {source.target} but the reference is {reference_name}: its vectors would "
            f"be {reference_name}'s; use {REFERENCE_SUM_PREFIX if source.summed else REFERENCE_PREFIX}"
            f"{reference_name}")
