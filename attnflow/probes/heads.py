"""Probe heads on frozen last-block tokens: pooling -> BatchNorm1d(affine=False) -> Linear.

Every head reads tokens ``[n, P + N, D]`` where ``P = 1`` when the model has a [cls] token (it comes first)
and ``P = 0`` otherwise, and ``N`` is the number of patch tokens (registers are dropped at extraction).
Each pooling also returns its aggregation weights aligned with the input tokens (``[n, P + N]``, zero for
tokens it does not read, summing to 1), so a trained head gives per-image selection maps
(``head.scores(tokens)``) for the maps and localization work; ``both`` ([cls] and the patch average concatenated)
has no such vector. The options of the official code's ``ABMILPHead`` (self-attention mode, scorer depth, position
conditioning) are those of :class:`AbMILPPool`; ``docs/official-code.md`` maps them to head specs.

Heads that aggregate with several patterns (``abmilp-kK``: K aggregation vectors; ``apK``: K attention heads) give
them all with ``head.patterns(tokens)`` (``[n, K, P + N]``); their ``scores`` are the mean of the K patterns.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .norm import ProbeBatchNorm
from .specs import COMBINES, HeadSpec, HeadSpecError

HEAD_INITS: tuple[str, ...] = ("default", "mae")
"""Classifier initialisations: ``default`` = torch's ``nn.Linear`` init (what the paper's code
github.com/gmum/beyond_cls ends up with), ``mae`` = trunc-normal(std 0.01) weights and zero bias (MAE's
main_linprobe.py)."""


_LOW = (torch.float16, torch.bfloat16)
"""Autocast's reduced precisions: a softmax of such logits runs in float32, as CUDA autocast runs it."""


def _softmax(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax over ``dim``; logits in a reduced precision (``_LOW``) are computed in float32."""
    return torch.softmax(logits.float() if logits.dtype in _LOW else logits, dim=dim)


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


class ConcatPool(nn.Module):
    """[cls] and the average of the patch tokens, concatenated (the official code's ``both``): ``[n, 2D]``.

    It reads two representations, so it has no aggregation vector (:attr:`HeadSpec.has_vector` is False).
    """

    def __init__(self, has_cls: bool) -> None:
        super().__init__()
        if not has_cls:
            raise HeadSpecError("head 'both' needs a model with a [cls] token; use avg, abmilp or apK")

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[n, 1 + N, D]`` -> pooled ``[n, 2D]``, weights ``[n, 1 + N]`` (NaN: no single vector)."""
        weights = torch.full(tokens.shape[:2], float("nan"), dtype=tokens.dtype, device=tokens.device)
        return torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=1), weights


class SelfAttentionHead(nn.Module):
    """One trainable self-attention head (qkv without bias, output projection; no residual, no norm), as the
    SA-AbMILP of the paper's code (``Attention(dim, num_heads=1)`` in beyond_cls abmilp.py).

    The softmax runs in float32 under autocast too (as CUDA autocast runs it for the official code).

    Shape:
        ``[n, T, D] -> [n, T, D]``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # each [n, T, D]
        logits = (q * q.shape[-1] ** -0.5) @ k.transpose(1, 2)  # [n, T, T]
        attn = _softmax(logits, dim=-1)
        return self.proj(attn @ v)


def _scorer(dim: int, kind: str, depth: int = 2, outputs: int = 1) -> nn.Module:
    """AbMILP's t: R^D -> R^K: one linear layer, or ``depth - 1`` hidden Linear(D, D) + tanh / ReLU layers then
    Linear(D, K) (the official ``ABMILPHead.attention_predictor``, whose last layer has ``ATTENTION_BRANCHES``
    outputs). ``outputs`` = K scores per token: with a linear scorer K independent scorers (row k of the weight
    is scorer k), with an MLP K read-outs of one shared hidden representation."""
    if kind == "linear":
        return nn.Linear(dim, outputs)
    layers: list[nn.Module] = []
    for _ in range(depth - 1):
        layers += [nn.Linear(dim, dim), nn.Tanh() if kind == "mlp-tanh" else nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(dim, outputs))


def sincos_position_embedding(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """The fixed 2-D sin-cos position embedding of MAE / the official ``get_2d_sincos_pos_embed``: ``[gh * gw, D]``
    float32, patches row-major.

    The first ``D/2`` channels encode the patch's column, the last ``D/2`` its row (the official code meshes
    ``(w, h)`` and encodes ``grid[0]``, the column, first); each half is ``[sin(p * w_k), cos(p * w_k)]`` with
    ``w_k = 10000^(-k / (D/4))``, ``k = 0 .. D/4 - 1``. Computed in float64, returned in float32 as the official
    ``.float()``.

    Raises:
        HeadSpecError: ``D`` not divisible by 4.
    """
    if dim % 4:
        raise HeadSpecError(f"a 2-D sin-cos position embedding needs a width divisible by 4; D={dim}")
    gh, gw = int(grid[0]), int(grid[1])
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))  # [D/4]
    rows, cols = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                                indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega[None]  # [P, D/4]
        return torch.cat([out.sin(), out.cos()], dim=1)  # [P, D/2]

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def _weighted_sum(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i x_i`` for ``[n, T]`` weights and ``[n, T, D]`` tokens (``[n, D]``), or for ``[n, K, T]`` weights
    per pattern (``[n, K, D]``), never in reduced precision: the official ``(x * attn_map).sum(dim=1)`` is
    elementwise, which autocast leaves in float32."""
    dtype = torch.promote_types(torch.promote_types(weights.dtype, x.dtype), torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        if weights.dim() == 3:
            return torch.bmm(weights.to(dtype), x.to(dtype))  # [n, K, D]
        return torch.bmm(weights.to(dtype).unsqueeze(1), x.to(dtype)).squeeze(1)  # [n, D]


class AbMILPPool(nn.Module):
    """AbMILP Selective Aggregation (paper Eq. 5): ``s = softmax_i t(z_i)``, pooled ``= sum_i s_i z_i``, with every
    option of the official ``ABMILPHead`` (beyond_cls abmilp.py).

    Args:
        dim: token width D.
        has_cls: whether ``tokens[:, 0]`` is a [cls] token.
        include_cls: weigh the [cls] token too (``abmilp+cls``, official ``--abmilp_content all``); otherwise
            patches only (``--abmilp_content patch``).
        scorer: ``"linear"`` (paper's main setting), ``"mlp-tanh"`` or ``"mlp-relu"``.
        depth: Linear layers of an MLP scorer (the official code's ``abmilp_depth``; 2 in Table 4).
        sa_apply: SA-AbMILP mode (the official code's ``abmilp_sa``): ``"none"``; ``"both"``: tokens pass a 1-head self-attention
            whose output feeds the scorer and is weighted; ``"map"``: its output feeds the scorer only and the
            original tokens are weighted.
        cond: ``"pe"`` (the official code's ``abmilp_cond`` set to ``pe``): a fixed 2-D sin-cos position embedding
            (:func:`sincos_position_embedding`; a zero row for [cls] with ``include_cls``) is added to the scorer's
            input (after the self-attention), never trained; ``"none"``.
        grid: the patch grid ``(gh, gw)`` for ``cond="pe"``; ``None``: a square grid inferred from the number of
            patch tokens (the official code supports square grids only).
        patterns: K aggregation vectors (``-kK``): the scorer gives K scores per token, each softmaxed over the
            tokens into one pattern; the self-attention and the position embedding are shared. K = 1 is AbMILP,
            with the same parameters created in the same order and the same operations.
        combine: K > 1 pooled features ``[n, K, D]`` are concatenated (``"concat"``: ``[n, K * D]``) or averaged
            (``"mean"``: ``[n, D]``, the weighted sum under the mean of the K patterns).
    """

    def __init__(self, dim: int, has_cls: bool, include_cls: bool = False, scorer: str = "linear", *,
                 depth: int = 2, sa_apply: str = "none", cond: str = "none",
                 grid: tuple[int, int] | None = None, patterns: int = 1, combine: str = "concat") -> None:
        super().__init__()
        if include_cls and not has_cls:
            raise HeadSpecError("'+cls' needs a model with a [cls] token; drop '+cls' for this model")
        if cond == "pe" and dim % 4:
            raise HeadSpecError(f"position conditioning (-pe) needs a token width divisible by 4; D={dim}")
        if patterns < 1 or combine not in COMBINES:
            raise HeadSpecError(f"AbMILP needs patterns >= 1 and combine in {', '.join(COMBINES)}; got {patterns}, "
                                f"{combine!r}")
        self.start = 0 if include_cls else int(has_cls)
        self.dim, self.with_cls = dim, include_cls
        self.sa_apply, self.cond = sa_apply, cond
        self.num_patterns, self.combine = patterns, combine
        self.grid = (int(grid[0]), int(grid[1])) if grid is not None else None
        self.attention = SelfAttentionHead(dim) if sa_apply != "none" else None
        self.scorer = _scorer(dim, scorer, depth, patterns)
        self._pe: dict[tuple, torch.Tensor] = {}

    def position_embedding(self, n_tokens: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The fixed ``[T, D]`` embedding added to the scorer's input (a zero row first when [cls] is weighed).

        Raises:
            HeadSpecError: the tokens do not fill the grid, or (without a grid) their number is not a square.
        """
        n_patches = n_tokens - int(self.with_cls)
        grid = self.grid
        if grid is None:
            side = math.isqrt(n_patches)
            if side * side != n_patches:
                raise HeadSpecError(f"position conditioning needs the patch grid: {n_patches} patch tokens are not "
                                    "a square grid; build the head with grid=(rows, cols)")
            grid = (side, side)
        if grid[0] * grid[1] != n_patches:
            raise HeadSpecError(f"position conditioning for a {grid[0]}x{grid[1]} grid got {n_patches} patch tokens")
        key = (grid, n_tokens, device, dtype)
        if key not in self._pe:
            pe = sincos_position_embedding(self.dim, grid)
            if self.with_cls:
                pe = torch.cat([pe.new_zeros(1, pe.shape[1]), pe])
            self._pe[key] = pe.to(device=device, dtype=dtype)
        return self._pe[key]

    def pool_patterns(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[n, P + N, D]`` -> pooled ``[n, D]`` (``[n, K * D]`` for K > 1 with ``concat``), patterns
        ``[n, K, P + N]`` (each row a softmax over the read tokens, zero on the others)."""
        x = tokens[:, self.start:]  # [n, T, D]
        mixed = self.attention(x) if self.attention is not None else x
        scorer_in = mixed
        if self.cond == "pe":
            scorer_in = mixed + self.position_embedding(x.shape[1], x.device, torch.float32)
        logits = self.scorer(scorer_in)  # [n, T, K]
        values = mixed if self.sa_apply == "both" else x
        if self.num_patterns == 1:  # AbMILP's own operations, bit for bit
            logits = logits.squeeze(-1)  # [n, T]
            weights = _softmax(logits, dim=1)  # [n, T]
            pooled = _weighted_sum(weights, values)  # [n, D]
            weights = weights.unsqueeze(1)  # [n, 1, T]
        else:
            logits = logits.transpose(1, 2)  # [n, K, T]
            weights = _softmax(logits, dim=2)  # [n, K, T]
            per_pattern = _weighted_sum(weights, values)  # [n, K, D]
            pooled = per_pattern.flatten(1) if self.combine == "concat" else per_pattern.mean(dim=1)
        return pooled, _pad_weights(weights.to(tokens.dtype), self.start)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[n, P + N, D]`` -> pooled ``[n, D]`` (``[n, K * D]``: K > 1, ``concat``), weights ``[n, P + N]`` (the
        mean of the K patterns; for ``mean`` exactly the weights of the pooled feature)."""
        pooled, patterns = self.pool_patterns(tokens)
        return pooled, patterns.squeeze(1) if self.num_patterns == 1 else patterns.mean(dim=1)


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

    def pool_patterns(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[n, P + N, D]`` -> pooled ``[n, D]``, per-head weights ``[n, H, P + N]``."""
        weights, v = self.attention(tokens)
        out = (weights.unsqueeze(2) @ v).squeeze(2)  # [n, H, d_h]
        return self.proj(out.flatten(1)), _pad_weights(weights, self.start)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[n, P + N, D]`` -> pooled ``[n, D]``, head-averaged weights ``[n, P + N]``."""
        pooled, patterns = self.pool_patterns(tokens)
        return pooled, patterns.mean(dim=1)


def build_pool(spec: HeadSpec, dim: int, has_cls: bool, grid: tuple[int, int] | None = None) -> nn.Module:
    """The pooling module of a head spec (``grid``: the patch grid of a ``-pe`` AbMILP head)."""
    if spec.kind == "cls":
        return ClsPool(has_cls)
    if spec.kind == "avg":
        return MeanPool(has_cls)
    if spec.kind == "both":
        return ConcatPool(has_cls)
    if spec.kind == "abmilp":
        return AbMILPPool(dim, has_cls, spec.include_cls, spec.scorer, depth=spec.depth, sa_apply=spec.sa_apply,
                          cond=spec.cond, grid=grid, patterns=spec.patterns, combine=spec.combine)
    return AttentivePool(dim, spec.num_heads, has_cls, spec.include_cls)


class ProbeHead(nn.Module):
    """pooling -> BatchNorm1d(affine=False, eps=1e-6) -> Linear (the MAE linear-probe head).

    Args:
        spec: the head spec (see :mod:`attnflow.probes.specs`).
        dim: token width D.
        num_classes: classifier outputs K.
        has_cls: whether ``tokens[:, 0]`` is a [cls] token.
        init: classifier initialisation, one of :data:`HEAD_INITS`.
        grid: the patch grid ``(gh, gw)`` of a ``-pe`` AbMILP head (``None``: square, inferred from the tokens).

    Attributes:
        width: the pooled representation's width (D; 2D for ``both``; K x D for ``abmilp-kK``, K > 1, which
            concatenates), the BatchNorm's and classifier's input.
        path: the file the head was loaded from (:func:`attnflow.probes.load_head`), ``None`` for a head built
            here; recorded in the provenance of the analyses that use the head.

    Shape:
        tokens ``[n, P + N, D]`` -> logits ``[n, K]``.
    """

    def __init__(self, spec: HeadSpec, dim: int, num_classes: int, has_cls: bool, init: str = "default",
                 grid: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.path: str | None = None
        if init not in HEAD_INITS:
            raise HeadSpecError(f"unknown head init {init!r}; choose from {', '.join(HEAD_INITS)}")
        self.spec = spec
        self.dim, self.num_classes, self.has_cls = dim, num_classes, has_cls
        self.grid = (int(grid[0]), int(grid[1])) if grid is not None else None
        self.width = spec.pooled_width(dim)
        self.pool = build_pool(spec, dim, has_cls, self.grid)
        self.norm = ProbeBatchNorm(self.width)
        self.fc = nn.Linear(self.width, num_classes)
        if init == "mae":
            nn.init.trunc_normal_(self.fc.weight, std=0.01)
            nn.init.zeros_(self.fc.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.pool(tokens)
        return self.fc(self.norm(pooled))

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """The aggregated representation before BatchNorm: ``[n, P + N, D] -> [n, width]`` (D; 2D for ``both``; the
        K pooled features one after the other for a concatenating ``abmilp-kK``)."""
        return self.pool(tokens)[0]

    @torch.no_grad()
    def scores(self, tokens: torch.Tensor) -> torch.Tensor:
        """Aggregation weights ``[n, P + N]`` aligned with the input tokens (sum to 1 over each row).

        For AbMILP these are the Selective Aggregation scores of Eq. 5 (zero on [cls] unless ``+cls``);
        attentive probing averages its heads; ``cls`` is one-hot, ``avg`` uniform over patches. A multi-pattern
        ``abmilp-kK`` head (K > 1) averages its K patterns, as attentive probing its heads: for ``-mean`` these
        are exactly the weights of its pooled feature; a concatenating head has no single vector (its feature
        is K weighted sums) and this is where its patterns look on average (:meth:`patterns` gives each).

        Raises:
            HeadSpecError: a ``both`` head, which concatenates two representations and has no single vector.
        """
        if not self.spec.has_vector:
            raise HeadSpecError(f"head {self.spec.name!r} concatenates [cls] and the patch average: it has no "
                                "aggregation vector")
        return self.pool(tokens)[1]

    @torch.no_grad()
    def patterns(self, tokens: torch.Tensor) -> torch.Tensor:
        """Every aggregation pattern ``[n, K, P + N]`` (each row sums to 1): the K patterns of ``abmilp-kK``, the H
        heads of ``apH``; one pattern (:meth:`scores`) for the other heads.

        Raises:
            HeadSpecError: a ``both`` head (no aggregation vector).
        """
        if isinstance(self.pool, (AbMILPPool, AttentivePool)):
            return self.pool.pool_patterns(tokens)[1]
        return self.scores(tokens).unsqueeze(1)

    def extra_repr(self) -> str:
        return f"spec={self.spec.name!r}, dim={self.dim}, classes={self.num_classes}, has_cls={self.has_cls}"


def build_head(spec: HeadSpec, dim: int, num_classes: int, has_cls: bool, *, seed: int | None = None,
               init: str = "default", grid: tuple[int, int] | None = None) -> ProbeHead:
    """A fresh head; with ``seed`` its initial weights depend on the seed only (not on the global RNG)."""
    if seed is None:
        return ProbeHead(spec, dim, num_classes, has_cls, init, grid)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ProbeHead(spec, dim, num_classes, has_cls, init, grid)


def num_trainable(module: nn.Module) -> int:
    """Number of trainable parameters (the paper's Sec. 5.2 overhead: (D+1)K vs (D+1)(K+1) for K classes; with P
    patterns, ``abmilp-kP``: P(D+1) + (PD+1)K concatenating, P(D+1) + (D+1)K averaging)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
