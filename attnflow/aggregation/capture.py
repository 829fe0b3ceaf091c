"""Model side of fixed token aggregation: one forward per model per batch -> tokens, attention, vectors.

* :class:`AggregationCapture` runs the aggregated model once per batch (tokens of the probe's block and the
  last block's attention, through :class:`attnflow.tap.AttentionTap`) and, when given, a reference model once
  on the same pixels (re-normalised to the reference's mean/std when they differ).
* :class:`FixedAggregationEncoder` is a drop-in for :class:`attnflow.encode.TokenEncoder` that
  returns one token per image, ``sum_i w_i x_i`` (``[B, 1, D]``) with the weights of
  :func:`~attnflow.aggregation.vectors.feature_weights` (the official code's features): the probe's feature
  cache, DDP and LARS work unchanged, and the ``cls`` head trains a linear classifier on the fixed-weight
  representation (paper Table 5's accuracy column).
* :func:`fixed_aggregation_features` is the notebook entry point.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..data.transforms import normalization, renormalize
from ..encode import TokenEncoder
from ..models.record import model_record
from ..provenance import weights_fingerprint
from ..tap import AttentionTap
from ..vit import TokenLayout, model_blocks, model_has_cls, patch_embedding, token_grid
from .rollout import RolloutStream, describe_rollout, rollout_vectors
from .sources import AggregationError, Source, check_source_fits, parse_source
from .vectors import aggregate_tokens, aggregation_vectors, feature_weights

RULES_VERSION = "2"
"""Version of the sources' definitions, part of every fingerprint of their features and statistics: 2 = the
official central patch ``((gh - 1) // 2, (gw - 1) // 2)`` and feature scale (1: ``(gh // 2, gw // 2)``, sums)."""

log = logging.getLogger(__name__)


@dataclass
class Captured:
    """What one batch's forward passes give.

    Attributes:
        tokens: ``[B, P + N, D]`` tokens of the probe's block ([cls] first when the model has one, registers
            dropped), as :class:`attnflow.encode.TokenEncoder` returns them.
        attn: ``[B, H, T, T]`` float32 post-softmax attention of the model's last block.
        layout: the model's :class:`attnflow.vit.TokenLayout`.
        has_cls: whether ``tokens[:, 0]`` is a [cls] token.
        ref_attn: ``[B, H', T', T']`` last-block attention of the reference model (``None`` without one).
        ref_layout: the reference's layout.
        rollout: ``[B, T, T]`` float64 attention-rollout product of every block of the model
            (:mod:`attnflow.aggregation.rollout`; ``None`` unless the capture's ``rollout`` is on).
    """

    tokens: torch.Tensor
    attn: torch.Tensor
    layout: TokenLayout
    has_cls: bool
    ref_attn: torch.Tensor | None = None
    ref_layout: TokenLayout | None = None
    rollout: torch.Tensor | None = None

    @property
    def patches(self) -> torch.Tensor:
        """``[B, N, D]`` patch tokens."""
        return self.tokens[:, int(self.has_cls):]


def check_reference(model: nn.Module, reference: nn.Module, img_size: int | tuple[int, int] | None = None, *,
                    model_name: str = "the model", reference_name: str = "the reference") -> None:
    """Refuse a reference model that cannot give a vector over this model's patches, in one line.

    Raises:
        AggregationError: the reference has no [cls] token, or (with ``img_size``) its patch grid differs.
    """
    if not model_has_cls(reference):
        raise AggregationError(f"reference {reference_name} has no [cls] token: its [cls] attention cannot "
                               "weigh the patches")
    if img_size is not None:
        hw = (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
        grids = [token_grid(patch_embedding(m), hw) for m in (model, reference)]
        if grids[0] != grids[1]:
            raise AggregationError(_grid_message(model_name, reference_name, grids[0], grids[1]))


def _grid_message(model: str, reference: str, grid: tuple[int, int], ref_grid: tuple[int, int]) -> str:
    return (f"reference {reference} sees a {ref_grid[0]}x{ref_grid[1]} patch grid where {model} sees "
            f"{grid[0]}x{grid[1]}: the reference's attention must cover the same patches (same patch size "
            "and input size)")


class AggregationCapture:
    """One forward of the model (and one of the reference) per batch.

    Args:
        model: the aggregated timm ViT (frozen).
        reference: an optional reference timm ViT with a [cls] token and the same patch grid.
        block: the block whose tokens are aggregated (default the last; the attention is always the last
            block's).
        layernorm: apply the model's final norm to the tokens.
        amp: ``"bf16"``, ``"fp16"``, ``"none"`` or ``"auto"`` (bf16 on CUDA); the softmax stays fp32.
        device: where both models run.
        model_name, reference_name: names for messages.
        rollout: also stream the attention rollout of every block (:attr:`Captured.rollout`, the ``rollout``
            source): every block's attention is tapped (un-fused) and multiplied in as the block runs, so only
            one block's map is alive at a time.

    Attributes:
        encoder: the :class:`TokenEncoder` of ``model`` (it runs every block).
        reference: the reference model on ``device`` (or ``None``).
        renormalized: whether the reference gets the batch re-normalised to its own mean/std.
        rollout: whether each capture streams the rollout product (may be switched between captures).
    """

    def __init__(self, model: nn.Module, *, reference: nn.Module | None = None, block: int = -1,
                 layernorm: bool = False, amp: str = "auto", device: torch.device | str = "cpu",
                 model_name: str = "the model", reference_name: str = "the reference", rollout: bool = False) -> None:
        self.rollout = rollout
        self.encoder = TokenEncoder(model, block=block, layernorm=layernorm, amp=amp, device=device)
        self.encoder.last = True  # never stop after the token block: the sources read the last block's attention
        self.model_name, self.reference_name = model_name, reference_name
        self.reference: nn.Module | None = None
        self._renorm: tuple | None = None
        if reference is not None:
            check_reference(model, reference, model_name=model_name, reference_name=reference_name)
            self.reference = reference.eval().requires_grad_(False).to(self.encoder.device)
            norms = normalization(model), normalization(reference)
            if norms[0] != norms[1]:
                self._renorm = norms
                log.info("the batch is re-normalised for %s: mean/std %s -> %s", reference_name, norms[0], norms[1])

    @property
    def renormalized(self) -> bool:
        return self._renorm is not None

    @property
    def model(self) -> nn.Module:
        return self.encoder.model

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    def describe_rollout(self) -> dict:
        """Provenance of the ``rollout`` source of this model (fusion, residual, query row, blocks)."""
        return describe_rollout(self.encoder.has_cls, len(model_blocks(self.model)))

    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, TokenLayout, torch.Tensor | None]:
        """Tokens, last-block attention ``[B, H, T, T]`` (float32), layout and (with :attr:`rollout`) the
        ``[B, T, T]`` float64 rollout product of one forward of the model."""
        if not self.rollout:
            with AttentionTap(self.model, blocks=[-1]) as tap:
                tokens = self.encoder(images)
                attn = tap.maps[0].float()                                         # [B, H, T, T]
            assert tap.layout is not None  # tap.maps checked that the forward ran
            return tokens, attn, tap.layout, None
        stream = RolloutStream(keep=-1, blocks=len(model_blocks(self.model)))
        with AttentionTap(self.model, callback=stream) as tap:  # every block, streamed: no map is stored
            tokens = self.encoder(images)
            tap.verify()
        assert tap.layout is not None and stream.kept is not None and stream.product is not None
        return tokens, stream.kept.float(), tap.layout, stream.product

    @torch.no_grad()
    def capture(self, images: torch.Tensor) -> Captured:
        """Tokens and last-block attention of ``images`` ``[B, 3, H, W]`` (normalised for the model), and the
        rollout product when :attr:`rollout` is on."""
        images = images.to(self.device, non_blocking=True)
        tokens, attn, layout, product = self._forward(images)
        out = Captured(tokens, attn, layout, self.encoder.has_cls, rollout=product)
        if self.reference is not None:
            x = images if self._renorm is None else renormalize(images.float(), *self._renorm)
            with AttentionTap(self.reference, blocks=[-1]) as ref_tap, self.encoder._autocast():
                self.reference.forward_features(x)  # type: ignore[operator]
                out.ref_attn = ref_tap.maps[0].float()                             # [B, H', T', T']
            assert ref_tap.layout is not None
            out.ref_layout = ref_tap.layout
            if ref_tap.layout.grid != layout.grid:
                raise AggregationError(_grid_message(self.model_name, self.reference_name, layout.grid,
                                                     ref_tap.layout.grid))
        return out

    def vectors(self, captured: Captured, source: str | Source, *, dtype: torch.dtype = torch.float32
                ) -> torch.Tensor:
        """The ``[B, N]`` aggregation vector of ``source`` (rows sum to 1)."""
        src = parse_source(source) if isinstance(source, str) else source
        if src.kind == "reference":
            if captured.ref_attn is None:
                raise AggregationError(f"aggregation {src.name} needs the reference model {src.target}")
            return aggregation_vectors(captured.ref_attn, captured.ref_layout, "cls_mean", dtype=dtype)
        if src.needs_every_block:
            return rollout_vectors(self._rollout(captured), captured.layout, dtype=dtype)
        return aggregation_vectors(captured.attn, captured.layout, src, dtype=dtype)

    @staticmethod
    def _rollout(captured: Captured) -> torch.Tensor:
        if captured.rollout is None:
            raise AggregationError("the rollout source needs a capture with rollout on (every block's attention)")
        return captured.rollout

    def weights(self, captured: Captured, source: str | Source, *, dtype: torch.dtype = torch.float32
                ) -> torch.Tensor:
        """The ``[B, N]`` weights of ``source``'s feature ``sum_i w_i x_i``, scaled as the official code scales it
        (:func:`~attnflow.aggregation.vectors.feature_weights`)."""
        src = parse_source(source) if isinstance(source, str) else source
        if src.kind == "reference":
            if captured.ref_attn is None:
                raise AggregationError(f"aggregation {src.name} needs the reference model {src.target}")
            return feature_weights(captured.ref_attn, captured.ref_layout, src, dtype=dtype)
        if src.needs_every_block:  # the feature is the sum with the vector's weights, as cls_mean's
            return rollout_vectors(self._rollout(captured), captured.layout, dtype=dtype)
        return feature_weights(captured.attn, captured.layout, src, dtype=dtype)


class FixedAggregationEncoder(TokenEncoder):
    """Drop-in for :class:`TokenEncoder`: ``images [B, 3, H, W] -> [B, 1, D]`` fixed-weight representations.

    The one output token is ``sum_i w_i x_i`` over the patch tokens of ``block`` with ``w`` the feature weights
    of ``source`` (:func:`~attnflow.aggregation.vectors.feature_weights`: the official code's features, e.g.
    ``central`` is ``mean_i(w_i x_i)``); it reads as a [cls] token (``has_cls`` is True), so the probe's ``cls``
    head is a linear probe on it.

    Args:
        model: the aggregated timm ViT.
        source: a source of :mod:`attnflow.aggregation.sources` (``cls_mean``, ``central``, ``ca2``, ``cp3``,
            ``reference:<name>``, ``central_sum``, ...).
        reference: the reference model (required for ``reference:`` sources, refused otherwise).
        block, layernorm, amp, device: as :class:`TokenEncoder`.

    Attributes:
        model, device, block, layernorm, dim: as :class:`TokenEncoder`.
        has_cls: True (the output token is read by the ``cls`` head).
        source: the parsed :class:`attnflow.aggregation.sources.Source`.
    """

    def __init__(self, model: nn.Module, source: str | Source, *, reference: nn.Module | None = None,
                 block: int = -1, layernorm: bool = False, amp: str = "auto", device: torch.device | str = "cpu",
                 model_name: str = "the model") -> None:
        self.source = parse_source(source) if isinstance(source, str) else source
        if self.source.kind == "reference" and reference is None:
            raise AggregationError(f"aggregation {self.source.name} needs the reference model {self.source.target}")
        if self.source.kind != "reference" and reference is not None:
            raise AggregationError(f"a reference model is only used by reference:<name>, not {self.source.name}")
        self.capturer = AggregationCapture(model, reference=reference, block=block, layernorm=layernorm, amp=amp,
                                           device=device, model_name=model_name,
                                           reference_name=self.source.target or "the reference",
                                           rollout=self.source.needs_every_block)
        check_source_fits(self.source, self.capturer.encoder.has_cls, model_name)
        super().__init__(model, block=block, layernorm=layernorm, amp=amp, device=device)  # model, device, dim, ...
        self.has_cls = True  # the one output token is read by the `cls` head
        self.reference = self.capturer.reference

    @property
    def fingerprint(self) -> str:
        """Ties caches and checkpoints to the model's weights, the source and the reference's weights."""
        parts = [self.capturer.encoder.fingerprint, self.source.name, f"rules={RULES_VERSION}",
                 weights_fingerprint(self.reference) if self.reference is not None else "",
                 repr(self.capturer._renorm)]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    def describe(self) -> dict:
        """Provenance of the aggregation for result sidecars."""
        info = {"source": self.source.name, "rules": RULES_VERSION, "block": self.block,
                "layernorm": self.layernorm, "feature": "official scale" if self.source.official_scale else "sum"}
        if self.source.needs_every_block:
            info["rollout"] = self.capturer.describe_rollout()
        if self.reference is not None:
            ref = model_record(self.reference)
            info["reference"] = {"name": self.source.target, "checkpoint": ref.checkpoint, "sha256": ref.sha256,
                                 "random_init": ref.random_init,
                                 "weights": weights_fingerprint(self.reference),
                                 "renormalized": self.capturer.renormalized}
        return info

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W] -> [B, 1, D]`` float32."""
        captured = self.capturer.capture(images)
        weights = self.capturer.weights(captured, self.source)                      # [B, N]
        return aggregate_tokens(weights, captured.patches)[:, None]                # [B, 1, D]


@torch.no_grad()
def fixed_aggregation_features(model: nn.Module, images: torch.Tensor, source: str = "cls_mean", *,
                               reference: nn.Module | None = None, block: int = -1, layernorm: bool = False,
                               amp: str = "none", device: torch.device | str | None = None,
                               return_weights: bool = False
                               ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The fixed-weight representation ``sum_i w_i x_i`` of each image (paper Table 5), as the official code
    computes it (:func:`~attnflow.aggregation.vectors.feature_weights`).

    Args:
        model: a timm ViT.
        images: ``[B, 3, H, W]`` normalised for ``model`` (a reference gets them re-normalised).
        source: a source of :mod:`attnflow.aggregation.sources` (``cls_mean``, ``cls_min_entropy``,
            ``central``, ``caK``, ``cpK``, ``reference:<name>``, ``central_sum``, ...).
        reference: the reference model for ``reference:`` sources.
        block: the block whose tokens are weighted (the weights always come from the last block).
        layernorm: apply the model's final norm to the tokens (the paper: no).
        amp: encoder autocast (default none: exact float32).
        device: where to run (default: the model's device).
        return_weights: also return the weights ``w`` of the sum (for ``central`` / ``caK`` / ``reference:`` the
            official scale, about ``1/N`` of the vector; the vector itself is
            :meth:`AggregationCapture.vectors` / :func:`~attnflow.aggregation.vectors.aggregation_vectors`).

    Returns:
        ``[B, D]`` float32 representations, and with ``return_weights`` the ``[B, N]`` weights too.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    encoder = FixedAggregationEncoder(model, source, reference=reference, block=block, layernorm=layernorm,
                                      amp=amp, device=device)
    captured = encoder.capturer.capture(images)
    weights = encoder.capturer.weights(captured, encoder.source)
    features = aggregate_tokens(weights, captured.patches)
    return (features, weights) if return_weights else features
