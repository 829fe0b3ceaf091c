"""A planted task that one Selective Aggregation pattern provably cannot solve and two can: XOR across two token
groups. Used by tests/test_probes_multi_pattern.py and benchmarks/bench_multi_pattern.py.

The task
--------
An image is ``1 + N`` tokens of width D ([cls] first), each standard Gaussian noise. Two disjoint groups of
``group`` patches at random positions carry a signal: group A tokens add ``m_A + a u``, group B tokens add
``m_B + b u``, with signs ``a, b`` uniform in {-1, +1} and independent, and ``m_A, m_B, u`` fixed orthogonal
directions of norm ``scale`` (the same for every image). Both groups write their sign along the *same*
direction ``u``. The label is ``y = [a != b]`` (XOR), so classes are balanced and chance is 50%.

Theorem: one pattern is capped at 75%
-------------------------------------
Take any head that pools ``p = sum_i s_i z_i`` with ``s_i = exp(t(z_i)) / sum_j exp(t(z_j))`` for *any* function
``t`` of one token (AbMILP with a linear or MLP scorer, over patches or ``+cls``), followed by any affine map to
the two logits (BatchNorm in eval mode, then Linear). Its expected accuracy on this task is at most 3/4.

Proof. The logit difference is affine, ``h(p) = w.p + c``; since ``sum_i s_i = 1``, ``h(p) = sum_i s_i h(z_i)``,
whose sign is the sign of ``G(X) = sum_i g(z_i)`` with ``g = exp(t) h``: a sum over the image's tokens of one
function of a token, blind to their order. Draw two independent images X and X' and swap their group-B tokens:
Y is X with its group-B tokens replaced by those of X' (put at X's group-B positions), Y' is X' with those of X.
The parts of an image (signs, positions, noise) are independent, so Y and Y' are distributed as images, and the
four images hold the same tokens: ``G(X) + G(X') = G(Y) + G(Y')``. On the event ``E = {a' = -a, b' = -b}``
(probability 1/4, independent of each of X, X', Y, Y' alone), X and X' share a label y while Y and Y' have
``1 - y``. Classifying all four right needs ``G(X), G(X')`` on one side of 0 and ``G(Y), G(Y')`` on the other
(a tie goes to one fixed class, so one side is strict), contradicting the identity: on E at least one of the
four is wrong. Each of the four, given E, is an image of the task, so ``4 acc <= 3``. []

The bound is tight: score group-A minus tokens highest, then group-B minus tokens, then plus tokens, then the
background; the pooled token is then B- only for (a, b) = (+, -) (class 1), a plus token only for (+, +) (class
0), and A- for both classes when a = -1: 75%, and a trained AbMILP gets there. The same proof covers attentive
probing with one head (``ap1``): its pooled value is ``sum_i s_i v(z_i)`` with a per-token map
``v(z) = W LN(z)`` and scores ``q . k(z_i)``, one softmax pattern again. It does not cover SA-AbMILP (the tokens
mix before scoring) or a ``-pe`` head (its scores depend on the positions, which the swap moves).

Two patterns can solve it
-------------------------
With K = 2 patterns the decision is ``h_1(p_1) + h_2(p_2)``, a sum of two *ratios*
``sum_i exp(t_k(z_i)) h_k(z_i) / sum_i exp(t_k(z_i))`` with their own normalisers, no longer a sum over tokens.
Let pattern 1 score plus tokens (``+u``) above the background and minus tokens below it, and pattern 2 the
reverse: pattern 1 pools the plus tokens if the image has any, else the background; pattern 2 likewise for minus
tokens. ``y = 1`` exactly when the image has a plus *and* a minus token, so read-outs that are positive on a
signal token and strongly negative on background give ``h_1(p_1) + h_2(p_2) > 0`` exactly when both patterns
found their token. The construction works for concatenated features (``abmilp-k2``, separate ``h_k``) and for
averaged ones (``abmilp-k2-mean``, one ``h`` shared by both patterns); attentive probing with several heads is
of the same form, a sum over heads of such ratios.
"""

from __future__ import annotations

import torch

XOR_PATCHES, XOR_DIM, XOR_GROUP, XOR_SCALE = 16, 24, 2, 4.0
"""The task's default size: 16 patches of width 24 (divisible by 12 for ``ap12``), groups of 2, signal norm 4."""


def xor_directions(dim: int = XOR_DIM, scale: float = XOR_SCALE) -> torch.Tensor:
    """The fixed directions ``m_A, m_B, u`` as rows ``[3, D]``: orthogonal, each of norm ``scale``."""
    fixed = torch.Generator().manual_seed(4321)
    q, _ = torch.linalg.qr(torch.randn(dim, 3, generator=fixed))  # [D, 3], orthonormal columns
    return scale * q.T


def xor_parts(n: int, *, patches: int = XOR_PATCHES, dim: int = XOR_DIM, group: int = XOR_GROUP,
              scale: float = XOR_SCALE, seed: int = 0) -> dict[str, torch.Tensor]:
    """The independent parts of ``n`` images: signs ``a, b`` ``[n]``, noise ``[n, 1 + N, D]``, the group-A and
    group-B positions ``[n, group]`` (patch indices, [cls] is 0) and the directions ``[3, D]``."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    b = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    noise = torch.randn(n, 1 + patches, dim, generator=g)
    pos = torch.argsort(torch.rand(n, patches, generator=g), dim=1)[:, :2 * group] + 1
    return {"a": a, "b": b, "noise": noise, "pos_a": pos[:, :group], "pos_b": pos[:, group:],
            "dirs": xor_directions(dim, scale)}


def xor_assemble(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``[n, 1 + N, D]`` and labels ``[n]`` (``[a != b]``) from :func:`xor_parts`."""
    m_a, m_b, u = parts["dirs"]
    x = parts["noise"].clone()
    rows = torch.arange(len(x))[:, None]
    x[rows, parts["pos_a"]] += m_a + parts["a"][:, None, None] * u
    x[rows, parts["pos_b"]] += m_b + parts["b"][:, None, None] * u
    return x, (parts["a"] != parts["b"]).long()


def xor_tokens(n: int, *, seed: int = 0, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of the XOR task: tokens ``[n, 1 + N, D]`` ([cls] first, noise only) and labels ``[n]``."""
    return xor_assemble(xor_parts(n, seed=seed, **kwargs))
