"""The head-spec grammar: short strings such as ``"abmilp+cls"`` that name a probe head.

Grammar (one spec per head; the CLI takes a comma-separated list)::

    cls                         linear classifier on the [cls] token
    avg                         linear classifier on the average of the patch tokens
    abmilp[+cls][-mlp-ACT]      AbMILP Selective Aggregation (paper Eq. 5) over the patch tokens
                                (``+cls``: over [cls] + patches); scorer t = one linear layer, or with
                                ``-mlp-tanh`` / ``-mlp-relu`` a 2-layer MLP D -> D -> 1 (paper Table 4)
    sa-abmilp[+cls][-mlp-ACT]   Self-Attention AbMILP (Table 4, ref. [25]): a trainable 1-head
                                self-attention over the tokens before the AbMILP scoring and weighting
                                (the paper trained it with SGD only: unstable under LARS)
    apK[+cls]                   attentive probing (Table 6, ref. [21]): a learned query cross-attends to
                                the patch tokens with K heads (``ap1``, ``ap12``)
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from ..errors import AttnflowError

EXAMPLES: tuple[str, ...] = (
    "cls", "avg", "abmilp", "abmilp+cls", "abmilp-mlp-tanh", "abmilp-mlp-relu", "sa-abmilp", "ap1", "ap12",
)
"""The specs of the paper's tables (Tables 1, 4, 6), in the order tables list them."""

SCORERS: tuple[str, ...] = ("linear", "mlp-tanh", "mlp-relu")

DEFAULT_HEADS = "cls,avg,abmilp,abmilp+cls"
"""The heads of Table 1 (paper Sec. 5.1): [cls], average pooling, AbMILP over patches and over [cls] + patches."""

DEFAULT_HEADS_NO_CLS = "avg,abmilp"
"""Table 1's heads for a model without [cls] (I-JEPA, CAPI): average pooling and AbMILP over the patches."""

_ABMILP = re.compile(r"^(?P<sa>sa-)?abmilp(?P<cls>\+cls)?(?:-(?P<scorer>mlp-tanh|mlp-relu))?$")
_AP = re.compile(r"^ap(?P<heads>[1-9][0-9]*)(?P<cls>\+cls)?$")


class HeadSpecError(AttnflowError, ValueError):
    """A head spec that does not parse, or that does not fit the model (e.g. ``cls`` without [cls])."""


@dataclass(frozen=True)
class HeadSpec:
    """A parsed head spec.

    Attributes:
        name: the canonical spec string (e.g. ``"abmilp+cls-mlp-relu"``).
        kind: ``"cls"``, ``"avg"``, ``"abmilp"`` or ``"attentive"``.
        include_cls: whether the pooling also weighs the [cls] token (AbMILP / attentive probing).
        scorer: AbMILP scorer t: ``"linear"``, ``"mlp-tanh"`` or ``"mlp-relu"``.
        self_attention: SA-AbMILP (a 1-head self-attention before the scoring).
        num_heads: attention heads of attentive probing (0 for other kinds).
    """

    name: str
    kind: str
    include_cls: bool = False
    scorer: str = "linear"
    self_attention: bool = False
    num_heads: int = 0

    @property
    def needs_cls(self) -> bool:
        """Whether the head can only run on a model with a [cls] token."""
        return self.kind == "cls" or self.include_cls


def parse_head_spec(text: str) -> HeadSpec:
    """Parse one head spec (see the module docstring for the grammar).

    Raises:
        HeadSpecError: for a string outside the grammar, with close valid specs suggested.
    """
    spec = text.strip().lower()
    if spec in ("cls", "avg"):
        return HeadSpec(name=spec, kind=spec)
    match = _ABMILP.match(spec)
    if match:
        return HeadSpec(name=spec, kind="abmilp", include_cls=bool(match["cls"]),
                        scorer=match["scorer"] or "linear", self_attention=bool(match["sa"]))
    match = _AP.match(spec)
    if match:
        return HeadSpec(name=spec, kind="attentive", include_cls=bool(match["cls"]), num_heads=int(match["heads"]))
    close = difflib.get_close_matches(spec, EXAMPLES, n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; valid examples: {', '.join(EXAMPLES)}"
    raise HeadSpecError(f"unknown head spec {text!r}{hint}")


def parse_head_list(text: str | list[str] | tuple[str, ...]) -> list[HeadSpec]:
    """Parse ``"cls,avg,abmilp"`` (or a list of specs) into specs; duplicates are an error."""
    items = text.split(",") if isinstance(text, str) else list(text)
    specs = [parse_head_spec(item) for item in items if item.strip()]
    if not specs:
        raise HeadSpecError("no head specs given; e.g. heads cls,avg,abmilp")
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise HeadSpecError(f"head spec(s) given twice: {', '.join(dupes)}")
    return specs


def check_heads_fit(specs: list[HeadSpec], has_cls: bool) -> None:
    """Raise one line naming every head that needs a [cls] token when the model has none.

    Raises:
        HeadSpecError: ``cls`` or a ``+cls`` head for a model without [cls].
    """
    needs = [s.name for s in specs if s.needs_cls]
    if needs and not has_cls:
        raise HeadSpecError(f"head(s) {', '.join(needs)} need a [cls] token, which this model lacks; "
                            f"e.g. heads {DEFAULT_HEADS_NO_CLS}")
