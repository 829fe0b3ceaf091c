"""Non-trainable token aggregation (paper Appendix C.2, Table 5 and Fig. 7): fixed aggregation vectors.

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

The rules are those of :func:`attnflow.plot.patch_maps` (one image, numpy, for plotting); here they are
batched torch functions. Model-side capture lives in :mod:`attnflow.probes.fixed_encode`, dataset
statistics (entropy, pairwise KL) in :mod:`attnflow.probes.fixed_stats`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn

from ..errors import AttnflowError

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


def _layout_fields(layout: Any) -> tuple[int, bool, tuple[int, int]]:
    try:
        return int(layout.num_prefix), bool(layout.has_cls), (int(layout.grid[0]), int(layout.grid[1]))
    except AttributeError as err:
        raise TypeError("layout needs num_prefix, has_cls and grid (an attnflow.tap.TokenLayout)") from err


def row_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Exact Shannon entropy (nats) of non-negative rows renormalised to sum to 1, ``0 log 0 = 0``.

    ``H = log s - sum(a log a) / s`` with ``s = sum(a)``, in the input's dtype (pass float64 for exactness).

    Shape:
        ``[..., K] -> [...]``.
    """
    s = weights.sum(dim=-1)
    return torch.log(s) - torch.special.xlogy(weights, weights).sum(dim=-1) / s


def aggregation_vectors(attn: torch.Tensor, layout: Any, source: str | Source, *,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Batched fixed aggregation vectors from one block's attention (the last block in the paper).

    Computed in float64 (the lowest-entropy head is chosen on float64 entropies, as
    :func:`attnflow.plot.patch_maps` does), returned in ``dtype``.

    Args:
        attn: ``[B, H, N, N]`` post-softmax attention (rows = queries), ``N = num_prefix + gh * gw``.
        layout: the :class:`attnflow.tap.TokenLayout` of the forward (tokens ``[cls?, registers..., patches]``).
        source: ``"cls_mean"``, ``"cls_min_entropy"`` or ``"central"`` (a reference model's vector is the
            reference's own ``cls_mean``: call this on the reference's attention).
        dtype: output dtype.

    Returns:
        ``[B, gh * gw]`` non-negative weights over the patches (row-major), each row summing to 1.

    Raises:
        AggregationError: an unknown source, a [cls] source for a model without [cls], or ``attn`` that does
            not match the layout.
    """
    src = parse_source(source) if isinstance(source, str) else source
    if src.kind not in SOURCES:
        raise AggregationError(f"{src.name} is not computed from the model's own attention; "
                               f"use one of {', '.join(SOURCES)}")
    num_prefix, has_cls, (gh, gw) = _layout_fields(layout)
    n = num_prefix + gh * gw
    if attn.dim() != 4 or tuple(attn.shape[-2:]) != (n, n):
        raise AggregationError(f"attention of shape {tuple(attn.shape)} does not match the token layout "
                               f"({num_prefix} prefix + {gh}x{gw} patches = [B, H, {n}, {n}])")
    check_source_fits(src, has_cls)
    a = attn.detach().to(torch.float64)
    if src.kind == "central":
        query = num_prefix + (gh // 2) * gw + gw // 2
        rows = a[:, :, query, num_prefix:].mean(dim=1)                                  # [B, P]
    elif src.kind == "cls_mean":
        rows = a[:, :, 0, num_prefix:].mean(dim=1)                                      # [B, P]
    else:
        heads = a[:, :, 0, num_prefix:]                                                 # [B, H, P]
        best = row_entropy(heads).argmin(dim=1)                                         # [B] (first minimum)
        rows = heads[torch.arange(heads.shape[0], device=heads.device), best]          # [B, P]
    return (rows / rows.sum(dim=1, keepdim=True)).to(dtype)


def aggregate_tokens(weights: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """The fixed-weight representation ``sum_i w_i x_i`` (float32).

    Shape:
        weights ``[B, P]``, patch tokens ``[B, P, D]`` -> ``[B, D]``.
    """
    if weights.shape != patches.shape[:2]:
        raise AggregationError(f"{tuple(weights.shape)} weights do not fit {tuple(patches.shape)} patch tokens")
    return torch.einsum("bp,bpd->bd", weights.float(), patches.float())


# ------------------------------------------------------------------------------------ normalisation
def normalization(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input ``(mean, std)`` a timm model expects (its pretrained config)."""
    import timm.data

    config = timm.data.resolve_data_config({}, model=model)
    return tuple(float(v) for v in config["mean"]), tuple(float(v) for v in config["std"])


def renormalize(images: torch.Tensor, source: tuple[Sequence[float], Sequence[float]],
                target: tuple[Sequence[float], Sequence[float]]) -> torch.Tensor:
    """Images normalised with ``source = (mean, std)`` re-expressed with ``target``'s: same pixels, another
    normalisation (``(x * std_s + mean_s - mean_t) / std_t``).

    Shape:
        ``[B, 3, H, W] -> [B, 3, H, W]``.
    """
    def col(values: Sequence[float]) -> torch.Tensor:
        return torch.as_tensor(values, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)

    (m_s, s_s), (m_t, s_t) = source, target
    return (images * col(s_s) + col(m_s) - col(m_t)) / col(s_t)


# ------------------------------------------------------------------------------------------- labels
def model_label(model: nn.Module, name: str | None = None) -> str:
    """Short model name for source labels: the preset's method (``MAE``, ``DINO``; a preset's timm hub tag such as
    ``vit_base_patch16_224.mae`` counts too), else the given name."""
    from ..models.registry import find_spec, list_specs

    spec = find_spec(name) if name else None
    if spec is None:
        preset = (getattr(model, "attnflow_info", None) or {}).get("preset")
        spec = find_spec(preset) if preset else None
    if spec is None and name:
        spec = next((s for s in list_specs() if s.hub_tag == name), None)
    return spec.method if spec is not None else (name or type(model).__name__)


def head_label(spec_name: str) -> str:
    """Display name of a trained head's aggregation (``abmilp`` -> ``AbMILP``)."""
    from .specs import parse_head_spec

    spec = parse_head_spec(spec_name)
    if spec.kind == "abmilp":
        label = ("SA-" if spec.self_attention else "") + "AbMILP"
        extra = [x for x in ("+[cls]" if spec.include_cls else "", spec.scorer if spec.scorer != "linear" else "")
                 if x]
        return label + (f" ({', '.join(extra)})" if extra else "")
    if spec.kind == "attentive":
        return f"Attentive probing ({spec.num_heads} head{'s' if spec.num_heads > 1 else ''})"
    return {"avg": "Average pooling", "cls": "[cls] token"}.get(spec.kind, spec.name)


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
