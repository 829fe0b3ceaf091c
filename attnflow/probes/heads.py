"""Probe heads on frozen last-block tokens: pooling -> BatchNorm1d(affine=False) -> Linear.

Every head reads tokens ``[n, P + N, D]`` where ``P = 1`` when the model has a [cls] token (it comes first)
and ``P = 0`` otherwise, and ``N`` is the number of patch tokens (registers are dropped at extraction).
Each pooling also returns its aggregation weights aligned with the input tokens (``[n, P + N]``, zero for
tokens it does not read, summing to 1), so a trained head gives per-image selection maps
(``head.scores(tokens)``) for the maps and localization work.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .norm import ProbeBatchNorm
from .specs import HeadSpec, HeadSpecError

HEAD_INITS: tuple[str, ...] = ("default", "mae")
"""Classifier initialisations: ``default`` = torch's ``nn.Linear`` init (what the paper's code
github.com/gmum/beyond_cls ends up with), ``mae`` = trunc-normal(std 0.01) weights and zero bias (MAE's
main_linprobe.py)."""


def _pad_weights(weights: torch.Tensor, start: int) -> torch.Tensor:
    """Left-pad ``[..., T]`` weights with ``start`` zeros so they align with the input tokens."""
    return F.pad(weights, (start, 0)) if start else weights


class ClsPool(nn.Module):
    """The [cls] token itself: ``tokens[:, 0]``."""

    def __init__(self, has_cls: bool) -> None:
        super().__init__()
        if not has_cls:
            raise HeadSpecError("head 'cls' needs a model with a [cls] token; use avg, abmilp or apK")

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[n, 1 + N, D]`` -> pooled ``[n, D]``, weights ``[n, 1 + N]`` (one-hot on [cls])."""
        weights = torch.zeros(tokens.shape[:2], dtype=tokens.dtype, device=tokens.device)
        weights[:, 0] = 1.0
        return tokens[:, 0], weights


class MeanPool(nn.Module):
    """The average of the patch tokens (the [cls] token, if any, is left out)."""

    def __init__(self, has_cls: bool) -> None:
        super().__init__()
        self.start = int(has_cls)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[n, P + N, D]`` -> pooled ``[n, D]``, weights ``[n, P + N]`` (``1/N`` on every patch)."""
        patches = tokens[:, self.start:]
        weights = torch.full(patches.shape[:2], 1.0 / patches.shape[1], dtype=tokens.dtype, device=tokens.device)
        return patches.mean(dim=1), _pad_weights(weights, self.start)


class SelfAttentionHead(nn.Module):
    """One trainable self-attention head (qkv without bias, output projection; no residual, no norm), as the
    SA-AbMILP of the paper's code (``Attention(dim, num_heads=1)`` in beyond_cls abmilp.py).

    Shape:
        ``[n, T, D] -> [n, T, D]``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # each [n, T, D]
        attn = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(1, 2), dim=-1)  # [n, T, T]
        return self.proj(attn @ v)


def _scorer(dim: int, kind: str) -> nn.Module:
    """AbMILP's t: R^D -> R (one linear layer, or D -> D -> 1 with tanh / relu)."""
    if kind == "linear":
        return nn.Linear(dim, 1)
    act = nn.Tanh() if kind == "mlp-tanh" else nn.ReLU()
    return nn.Sequential(nn.Linear(dim, dim), act, nn.Linear(dim, 1))


class AbMILPPool(nn.Module):
    """AbMILP Selective Aggregation (paper Eq. 5): ``s = softmax_i t(z_i)``, pooled ``= sum_i s_i z_i``.

    Args:
        dim: token width D.
        has_cls: whether ``tokens[:, 0]`` is a [cls] token.
        include_cls: weigh the [cls] token too (``abmilp+cls``); otherwise patches only.
        scorer: ``"linear"`` (paper's main setting), ``"mlp-tanh"`` or ``"mlp-relu"``.
        self_attention: SA-AbMILP: tokens pass a 1-head self-attention first; its output feeds both the
            scorer and the weighted sum (the paper code's ``abmilp_sa`` set to ``both``).
    """

    def __init__(self, dim: int, has_cls: bool, include_cls: bool = False, scorer: str = "linear",
                 self_attention: bool = False) -> None:
        super().__init__()
        if include_cls and not has_cls:
            raise HeadSpecError("'+cls' needs a model with a [cls] token; drop '+cls' for this model")
        self.start = 0 if include_cls else int(has_cls)
        self.attention = SelfAttentionHead(dim) if self_attention else None
        self.scorer = _scorer(dim, scorer)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[n, P + N, D]`` -> pooled ``[n, D]``, weights ``[n, P + N]``."""
        x = tokens[:, self.start:]  # [n, T, D]
        if self.attention is not None:
            x = self.attention(x)
        weights = torch.softmax(self.scorer(x).squeeze(-1), dim=1)  # [n, T]
        pooled = torch.bmm(weights.unsqueeze(1), x).squeeze(1)  # [n, D]
        return pooled, _pad_weights(weights, self.start)


class AttentivePool(nn.Module):
    """Attentive probing (CAE's attentive block, paper ref. [21]): a learned query cross-attends to tokens.

    ``out = proj(concat_h softmax(q_h k_h^T / sqrt(d_h)) v_h)`` with ``q = W_q LN(query)``,
    ``k = W_k LN(z)``, ``v = W_v LN(z)`` (separate LayerNorms, as CAE), ``d_h = D / heads``; one head keeps
    the full width D (the paper's "AP (1 head)").

    Args:
        dim: token width D (divisible by ``num_heads``).
        num_heads: attention heads.
        has_cls: whether ``tokens[:, 0]`` is a [cls] token.
        include_cls: attend to [cls] too; otherwise patches only.
    """

    def __init__(self, dim: int, num_heads: int, has_cls: bool, include_cls: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise HeadSpecError(f"attentive probing with {num_heads} heads needs a width divisible by it; D={dim}")
        if include_cls and not has_cls:
            raise HeadSpecError("'+cls' needs a model with a [cls] token; drop '+cls' for this model")
        self.start = 0 if include_cls else int(has_cls)
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm_q, self.norm_k, self.norm_v = (nn.LayerNorm(dim, eps=1e-6) for _ in range(3))
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        nn.init.trunc_normal_(self.query, std=0.02)
        for layer in (self.q, self.k, self.v, self.proj):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def attention(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head weights ``[n, H, T]`` over the read tokens and values ``[n, H, T, D/H]``."""
        x = tokens[:, self.start:]
        n, t, d = x.shape
        h = self.num_heads
        q = self.q(self.norm_q(self.query)).reshape(1, h, 1, d // h)  # [1, H, 1, d_h]
        k = self.k(self.norm_k(x)).reshape(n, t, h, d // h).transpose(1, 2)  # [n, H, T, d_h]
        v = self.v(self.norm_v(x)).reshape(n, t, h, d // h).transpose(1, 2)  # [n, H, T, d_h]
        logits = (q * (d // h) ** -0.5) @ k.transpose(-2, -1)  # [n, H, 1, T]
        return torch.softmax(logits.squeeze(2), dim=-1), v

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[n, P + N, D]`` -> pooled ``[n, D]``, head-averaged weights ``[n, P + N]``."""
        weights, v = self.attention(tokens)
        out = (weights.unsqueeze(2) @ v).squeeze(2)  # [n, H, d_h]
        return self.proj(out.flatten(1)), _pad_weights(weights.mean(dim=1), self.start)


def build_pool(spec: HeadSpec, dim: int, has_cls: bool) -> nn.Module:
    """The pooling module of a head spec."""
    if spec.kind == "cls":
        return ClsPool(has_cls)
    if spec.kind == "avg":
        return MeanPool(has_cls)
    if spec.kind == "abmilp":
        return AbMILPPool(dim, has_cls, spec.include_cls, spec.scorer, spec.self_attention)
    return AttentivePool(dim, spec.num_heads, has_cls, spec.include_cls)


class ProbeHead(nn.Module):
    """pooling -> BatchNorm1d(affine=False, eps=1e-6) -> Linear (the MAE linear-probe head).

    Args:
        spec: the head spec (see :mod:`attnflow.probes.specs`).
        dim: token width D.
        num_classes: classifier outputs K.
        has_cls: whether ``tokens[:, 0]`` is a [cls] token.
        init: classifier initialisation, one of :data:`HEAD_INITS`.

    Shape:
        tokens ``[n, P + N, D]`` -> logits ``[n, K]``.
    """

    def __init__(self, spec: HeadSpec, dim: int, num_classes: int, has_cls: bool, init: str = "default") -> None:
        super().__init__()
        if init not in HEAD_INITS:
            raise HeadSpecError(f"unknown head init {init!r}; choose from {', '.join(HEAD_INITS)}")
        self.spec = spec
        self.dim, self.num_classes, self.has_cls = dim, num_classes, has_cls
        self.pool = build_pool(spec, dim, has_cls)
        self.norm = ProbeBatchNorm(dim)
        self.fc = nn.Linear(dim, num_classes)
        if init == "mae":
            nn.init.trunc_normal_(self.fc.weight, std=0.01)
            nn.init.zeros_(self.fc.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.pool(tokens)
        return self.fc(self.norm(pooled))

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """The aggregated representation before BatchNorm: ``[n, P + N, D] -> [n, D]``."""
        return self.pool(tokens)[0]

    @torch.no_grad()
    def scores(self, tokens: torch.Tensor) -> torch.Tensor:
        """Aggregation weights ``[n, P + N]`` aligned with the input tokens (sum to 1 over each row).

        For AbMILP these are the Selective Aggregation scores of Eq. 5 (zero on [cls] unless ``+cls``);
        attentive probing averages its heads; ``cls`` is one-hot, ``avg`` uniform over patches.
        """
        return self.pool(tokens)[1]

    def extra_repr(self) -> str:
        return f"spec={self.spec.name!r}, dim={self.dim}, classes={self.num_classes}, has_cls={self.has_cls}"


def build_head(spec: HeadSpec, dim: int, num_classes: int, has_cls: bool, *, seed: int | None = None,
               init: str = "default") -> ProbeHead:
    """A fresh head; with ``seed`` its initial weights depend on the seed only (not on the global RNG)."""
    if seed is None:
        return ProbeHead(spec, dim, num_classes, has_cls, init)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ProbeHead(spec, dim, num_classes, has_cls, init)


def num_trainable(module: nn.Module) -> int:
    """Number of trainable parameters (the paper's Sec. 5.2 overhead: (D+1)K vs (D+1)(K+1))."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
