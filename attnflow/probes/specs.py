"""The head-spec grammar: short strings such as ``"abmilp+cls"`` that name a probe head.

Grammar (one spec per head; the CLI takes a comma-separated list)::

    cls                         linear classifier on the [cls] token
    avg                         linear classifier on the average of the patch tokens
    both                        linear classifier on [cls] and the patch average concatenated (width 2D; the
                                official code's ``both``)
    [SA-]abmilp[+cls][-kK[-mean]][-mlp[N]-ACT][-pe]
                                AbMILP Selective Aggregation (paper Eq. 5) over the patch tokens
                                (``+cls``: over [cls] + patches, the official ``--abmilp_content all``)
      -kK                       multi-pattern Selective Aggregation: K aggregation vectors (the scorer's last
                                layer has K outputs, the official ``ATTENTION_BRANCHES``); the K pooled
                                features are concatenated (width K x D) before BatchNorm + linear, or with
                                ``-mean`` averaged (width D). ``-k1`` is AbMILP itself (same weights, same ops)
                                under its own name; ``-k1-mean`` reads as ``-k1``
      scorer t                  one linear layer (``--abmilp_depth 1``), or ``-mlp-tanh`` / ``-mlp-relu``: a
                                2-layer MLP D -> D -> 1 (paper Table 4), ``-mlpN-ACT``: N layers, N - 1 hidden
                                Linear(D, D) + ACT, then Linear(D, 1) (``--abmilp_depth N --abmilp_act ACT``)
      -pe                       position conditioning (``--abmilp_cond pe``): a fixed 2-D sin-cos position
                                embedding (zero for [cls]) added to the scorer's input, never trained
      SA- = sa-                 Self-Attention AbMILP (Table 4, ref. [25]): a trainable 1-head self-attention
                                over the tokens whose output feeds the scorer and is weighted
                                (``--abmilp_sa both``; the paper trained it with SGD only: unstable under LARS)
      SA- = sa-map-             the self-attention output feeds the scorer only; the original tokens are
                                weighted (``--abmilp_sa map``)
    apK[+cls]                   attentive probing (Table 6, ref. [21]): a learned query cross-attends to
                                the patch tokens with K heads (``ap1``, ``ap12``)

Names are canonical: ``abmilp-mlp2-relu`` reads as ``abmilp-mlp-relu``; the options keep the order above
(``sa-abmilp+cls-k4-mean-mlp-relu-pe``). ``docs/official-code.md`` maps each flag
combination of the official ``main_linprobe.py`` to its spec.
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

OTHER_EXAMPLES: tuple[str, ...] = ("both", "sa-map-abmilp", "abmilp-pe", "abmilp-mlp3-relu")
"""Further specs of the official code's options (``both``, ``--abmilp_sa map``, ``--abmilp_cond pe``,
``--abmilp_depth``)."""

MULTI_PATTERN_EXAMPLES: tuple[str, ...] = ("abmilp-k2", "abmilp-k4", "abmilp-k12", "abmilp-k2-mean", "abmilp-k4-mean",
                                           "abmilp-k12-mean")
"""Multi-pattern AbMILP (the paper's Sec. 5.3 suggestion that attentive probing's strength is an ensemble of
Selective Aggregation patterns): K aggregation vectors, concatenated (default) or averaged."""

COMBINES: tuple[str, ...] = ("concat", "mean")
"""How a multi-pattern AbMILP head joins its K pooled features: ``concat`` (width K x D, the default: the form of
attentive probing's heads and of Ilse et al.'s multi-branch AbMILP) or ``mean`` (width D)."""

SCORERS: tuple[str, ...] = ("linear", "mlp-tanh", "mlp-relu")
SA_MODES: tuple[str, ...] = ("none", "both", "map")
"""Where the SA-AbMILP self-attention output goes (the official ``--abmilp_sa``): nowhere, to the scorer and the
weighted sum, or to the scorer only."""
MAX_DEPTH = 16

DEFAULT_HEADS = "cls,avg,abmilp,abmilp+cls"
"""The heads of Table 1 (paper Sec. 5.1): [cls], average pooling, AbMILP over patches and over [cls] + patches."""

DEFAULT_HEADS_NO_CLS = "avg,abmilp"
"""Table 1's heads for a model without [cls] (I-JEPA, CAPI): average pooling and AbMILP over the patches."""

_ABMILP = re.compile(r"^(?P<sa>sa-(?P<map>map-)?)?abmilp(?P<cls>\+cls)?(?:-k(?P<k>[1-9][0-9]*)(?P<mean>-mean)?)?"
                     r"(?:-mlp(?P<depth>[0-9]+)?-(?P<act>tanh|relu))?(?P<pe>-pe)?$")
_AP = re.compile(r"^ap(?P<heads>[1-9][0-9]*)(?P<cls>\+cls)?$")


class HeadSpecError(AttnflowError, ValueError):
    """A head spec that does not parse, or that does not fit the model (e.g. ``cls`` without [cls])."""


@dataclass(frozen=True)
class HeadSpec:
    """A parsed head spec.

    Attributes:
        name: the canonical spec string (e.g. ``"abmilp+cls-mlp-relu"``).
        kind: ``"cls"``, ``"avg"``, ``"both"``, ``"abmilp"`` or ``"attentive"``.
        include_cls: whether the pooling also weighs the [cls] token (AbMILP / attentive probing).
        scorer: AbMILP scorer t: ``"linear"``, ``"mlp-tanh"`` or ``"mlp-relu"`` (the activation of an MLP).
        depth: number of Linear layers of the AbMILP scorer (1 for ``linear``, 2 for ``-mlp-ACT``, N for
            ``-mlpN-ACT``; the official ``--abmilp_depth``).
        sa_apply: SA-AbMILP mode, one of :data:`SA_MODES` (``sa-``: ``both``, ``sa-map-``: ``map``).
        cond: ``"pe"`` when a fixed sin-cos position embedding conditions the scorer, else ``"none"``.
        num_heads: attention heads of attentive probing (0 for other kinds).
        patterns: AbMILP aggregation vectors K (``-kK``; 1 for plain AbMILP and for other kinds).
        combine: how K > 1 pooled features are joined, one of :data:`COMBINES`.
    """

    name: str
    kind: str
    include_cls: bool = False
    scorer: str = "linear"
    depth: int = 1
    sa_apply: str = "none"
    cond: str = "none"
    num_heads: int = 0
    patterns: int = 1
    combine: str = "concat"

    @property
    def self_attention(self) -> bool:
        """SA-AbMILP (a 1-head self-attention before the scoring)."""
        return self.sa_apply != "none"

    @property
    def needs_cls(self) -> bool:
        """Whether the head can only run on a model with a [cls] token."""
        return self.kind in ("cls", "both") or self.include_cls

    @property
    def init_name(self) -> str:
        """The spec whose seed initialises this head: ``abmilp-k1`` starts from ``abmilp``'s weights (it is the same
        head), every other spec from its own name."""
        if self.kind == "abmilp" and self.patterns == 1:
            return abmilp_name(self.include_cls, self.scorer, self.depth, self.sa_apply, self.cond)
        return self.name

    def pooled_width(self, dim: int) -> int:
        """Width of the pooled representation (the BatchNorm's and classifier's input) for tokens of width ``dim``:
        ``2 dim`` for ``both``, ``K dim`` for a concatenating ``-kK`` head, else ``dim``."""
        if self.kind == "both":
            return 2 * dim
        return dim * self.patterns if self.combine == "concat" else dim

    @property
    def has_vector(self) -> bool:
        """Whether the head aggregates with one weight per token (its ``scores`` are an aggregation vector); ``both``
        concatenates two representations and has none."""
        return self.kind != "both"


def abmilp_name(include_cls: bool = False, scorer: str = "linear", depth: int = 1, sa_apply: str = "none",
                cond: str = "none", patterns: int | None = None, combine: str = "concat") -> str:
    """The canonical spec of an AbMILP head, e.g. ``abmilp_name(True, "mlp-relu", 3, "map", "pe")`` ->
    ``"sa-map-abmilp+cls-mlp3-relu-pe"``; ``patterns=4, combine="mean"`` adds ``-k4-mean`` after ``+cls``
    (``patterns=None``: no ``-kK``; ``patterns=1``: ``-k1``, whatever ``combine``)."""
    sa = {"none": "", "both": "sa-", "map": "sa-map-"}[sa_apply]
    k = "" if patterns is None else f"-k{patterns}" + ("-mean" if patterns > 1 and combine == "mean" else "")
    mlp = "" if scorer == "linear" else "-" + (scorer if depth == 2 else scorer.replace("mlp", f"mlp{depth}"))
    return f"{sa}abmilp{'+cls' if include_cls else ''}{k}{mlp}{'-pe' if cond == 'pe' else ''}"


def _abmilp(match: re.Match, text: str) -> HeadSpec:
    act = match["act"]
    depth = 1 if act is None else int(match["depth"] or 2)
    if act is not None and not 2 <= depth <= MAX_DEPTH:
        hint = "; a 1-layer scorer is plain abmilp" if depth < 2 else f" (at most {MAX_DEPTH})"
        raise HeadSpecError(f"head spec {text!r}: an MLP scorer has 2 or more layers{hint}")
    scorer = "linear" if act is None else f"mlp-{act}"
    sa_apply = "none" if not match["sa"] else ("map" if match["map"] else "both")
    cond = "pe" if match["pe"] else "none"
    patterns = None if match["k"] is None else int(match["k"])
    combine = "mean" if match["mean"] and patterns != 1 else "concat"
    name = abmilp_name(bool(match["cls"]), scorer, depth, sa_apply, cond, patterns, combine)
    return HeadSpec(name=name, kind="abmilp", include_cls=bool(match["cls"]), scorer=scorer, depth=depth,
                    sa_apply=sa_apply, cond=cond, patterns=patterns or 1, combine=combine)


def parse_head_spec(text: str) -> HeadSpec:
    """Parse one head spec (see the module docstring for the grammar).

    Raises:
        HeadSpecError: for a string outside the grammar, with close valid specs suggested.
    """
    spec = text.strip().lower()
    if spec in ("cls", "avg", "both"):
        return HeadSpec(name=spec, kind=spec)
    match = _ABMILP.match(spec)
    if match:
        return _abmilp(match, text)
    match = _AP.match(spec)
    if match:
        return HeadSpec(name=spec, kind="attentive", include_cls=bool(match["cls"]), num_heads=int(match["heads"]))
    close = difflib.get_close_matches(spec, (*EXAMPLES, *OTHER_EXAMPLES, *MULTI_PATTERN_EXAMPLES), n=3, cutoff=0.4)
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
        HeadSpecError: ``cls``, ``both`` or a ``+cls`` head for a model without [cls].
    """
    needs = [s.name for s in specs if s.needs_cls]
    if needs and not has_cls:
        raise HeadSpecError(f"head(s) {', '.join(needs)} need a [cls] token, which this model lacks; "
                            f"e.g. heads {DEFAULT_HEADS_NO_CLS}")
