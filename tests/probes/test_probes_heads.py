"""Probe heads against hand computations: pooling loops, softmax weights, BatchNorm, the spec grammar."""

from __future__ import annotations

import math

import pytest
import torch

from attnflow.errors import AttnflowError
from attnflow.probes.heads import ProbeHead, build_head, num_trainable
from attnflow.probes.norm import ProbeBatchNorm
from attnflow.probes.specs import HeadSpecError, parse_head_list, parse_head_spec

D, N, K = 8, 6, 3


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def tokens(n: int = 4, has_cls: bool = True, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, int(has_cls) + N, D, generator=g, dtype=torch.float64)


def head(spec: str, has_cls: bool = True) -> ProbeHead:
    return build_head(parse_head_spec(spec), D, K, has_cls, seed=0).double().eval()


def manual_softmax(values: list[float]) -> list[float]:
    m = max(values)
    e = [math.exp(v - m) for v in values]
    return [x / sum(e) for x in e]


def weighted_sum(weights: list[float], rows: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(rows.shape[-1], dtype=rows.dtype)
    for w, row in zip(weights, rows):
        out += w * row
    return out


def test_grammar_canonical_specs():
    assert parse_head_spec("abmilp") == parse_head_spec(" ABMILP ")
    s = parse_head_spec("sa-abmilp+cls-mlp-relu")
    assert (s.kind, s.include_cls, s.scorer, s.self_attention) == ("abmilp", True, "mlp-relu", True)
    s = parse_head_spec("ap12")
    assert (s.kind, s.num_heads, s.include_cls) == ("attentive", 12, False)
    assert [h.name for h in parse_head_list("cls, avg,abmilp+cls")] == ["cls", "avg", "abmilp+cls"]


@pytest.mark.parametrize("bad,suggest", [("abmlip", "abmilp"), ("ap0", None), ("abmilp-mlp-gelu", "abmilp-mlp")])
def test_grammar_rejects_with_suggestion(bad, suggest):
    with pytest.raises(HeadSpecError) as err:
        parse_head_spec(bad)
    assert isinstance(err.value, AttnflowError)
    if suggest:
        assert suggest in str(err.value)


def test_duplicate_specs_rejected():
    with pytest.raises(HeadSpecError, match="twice"):
        parse_head_list("cls,avg,cls")


def test_cls_and_avg_pooling_by_hand():
    x = tokens()
    cls_w = head("cls").scores(x)
    assert torch.equal(head("cls").features(x), x[:, 0])
    assert cls_w[:, 0].eq(1).all() and cls_w[:, 1:].eq(0).all()
    avg = head("avg")
    for i in range(len(x)):
        manual = sum(x[i, j] for j in range(1, 1 + N)) / N
        torch.testing.assert_close(avg.features(x)[i], manual)
    w = avg.scores(x)
    assert w[:, 0].eq(0).all()
    torch.testing.assert_close(w[:, 1:], torch.full((4, N), 1 / N, dtype=torch.float64))
    x_nocls = tokens(has_cls=False)
    torch.testing.assert_close(head("avg", has_cls=False).features(x_nocls), x_nocls.mean(1))


@pytest.mark.parametrize("spec", ["abmilp", "abmilp+cls", "abmilp-mlp-tanh", "abmilp-mlp-relu"])
def test_abmilp_eq5_by_hand(spec):
    h = head(spec)
    x = tokens()
    start = 0 if "+cls" in spec else 1
    layers = h.pool.scorer if isinstance(h.pool.scorer, torch.nn.Sequential) else [h.pool.scorer]
    act = {"tanh": math.tanh, "relu": lambda v: max(v, 0.0)}
    for i in range(len(x)):
        t_values = []
        for j in range(start, 1 + N):
            z = x[i, j]
            if len(layers) == 1:
                t = float(layers[0].weight[0] @ z + layers[0].bias[0])
            else:
                hidden = [act[spec.rsplit("-", 1)[1]](float(layers[0].weight[r] @ z + layers[0].bias[r]))
                          for r in range(D)]
                t = sum(float(layers[2].weight[0, r]) * hidden[r] for r in range(D)) + float(layers[2].bias[0])
            t_values.append(t)
        s = manual_softmax(t_values)
        assert math.isclose(sum(s), 1.0, rel_tol=1e-12)
        weights = h.scores(x)[i]
        torch.testing.assert_close(weights[start:], torch.tensor(s, dtype=torch.float64))
        assert weights[:start].eq(0).all()
        torch.testing.assert_close(h.features(x)[i], weighted_sum(s, x[i, start:]))


def test_sa_abmilp_by_hand():
    h = head("sa-abmilp")
    x = tokens(n=2)
    attn = h.pool.attention
    wq, wk, wv = attn.qkv.weight.split(D)
    for i in range(len(x)):
        z = x[i, 1:]  # patches only
        q, k, v = z @ wq.T, z @ wk.T, z @ wv.T
        a = torch.stack([torch.tensor(manual_softmax([float(q[r] @ k[c]) / math.sqrt(D) for c in range(N)]),
                                      dtype=torch.float64) for r in range(N)])
        y = (a @ v) @ attn.proj.weight.T + attn.proj.bias  # [N, D]
        s = manual_softmax([float(h.pool.scorer.weight[0] @ y[j] + h.pool.scorer.bias[0]) for j in range(N)])
        torch.testing.assert_close(h.scores(x)[i, 1:], torch.tensor(s, dtype=torch.float64))
        torch.testing.assert_close(h.features(x)[i], weighted_sum(s, y))


@pytest.mark.parametrize("heads", [1, 2])
def test_attentive_probing_by_hand(heads):
    h = head(f"ap{heads}")
    pool = h.pool
    x = tokens(n=2)
    ln = lambda z, m: torch.nn.functional.layer_norm(z, (D,), m.weight, m.bias, 1e-6)  # noqa: E731
    q = pool.q(ln(pool.query[0, 0], pool.norm_q))
    dh = D // heads
    for i in range(len(x)):
        z = x[i, 1:]
        k, v = pool.k(ln(z, pool.norm_k)), pool.v(ln(z, pool.norm_v))
        outs, maps = [], []
        for hh in range(heads):
            sl = slice(hh * dh, (hh + 1) * dh)
            a = manual_softmax([float(q[sl] @ k[j, sl]) / math.sqrt(dh) for j in range(N)])
            maps.append(a)
            outs.append(weighted_sum(a, v[:, sl]))
        expected = pool.proj(torch.cat(outs))
        torch.testing.assert_close(h.features(x)[i], expected)
        mean_map = [sum(m[j] for m in maps) / heads for j in range(N)]
        torch.testing.assert_close(h.scores(x)[i, 1:], torch.tensor(mean_map, dtype=torch.float64))
        assert math.isclose(float(h.scores(x)[i].sum()), 1.0, rel_tol=1e-12)


def test_head_is_pool_batchnorm_linear():
    h = build_head(parse_head_spec("abmilp"), D, K, True, seed=0).double().train()
    x = tokens(n=16)
    pooled = h.features(x)
    mean = pooled.mean(0)
    var = ((pooled - mean) ** 2).mean(0)
    expected = ((pooled - mean) / torch.sqrt(var + 1e-6)) @ h.fc.weight.T + h.fc.bias
    torch.testing.assert_close(h(x), expected)
    assert not any(p.requires_grad for p in h.norm.parameters())  # affine=False
    # the paper's Sec. 5.2: AbMILP adds D + 1 parameters to the (D + 1) K of a linear probe
    assert num_trainable(h) == (D + 1) * (K + 1)


def test_probe_batchnorm_matches_torch_batchnorm():
    torch.manual_seed(0)
    ours, ref = ProbeBatchNorm(D), torch.nn.BatchNorm1d(D, eps=1e-6, affine=False)
    for _ in range(3):
        x = torch.randn(10, D) * 3 + 1
        torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    ours.eval(), ref.eval()
    x = torch.randn(5, D)
    torch.testing.assert_close(ours(x), ref(x))


def test_heads_that_need_cls_refuse_models_without_it():
    for spec in ("cls", "abmilp+cls", "ap1+cls"):
        with pytest.raises(HeadSpecError, match=r"\[cls\]"):
            build_head(parse_head_spec(spec), D, K, has_cls=False)
    with pytest.raises(HeadSpecError, match="divisible"):
        build_head(parse_head_spec("ap3"), D, K, has_cls=True)


def test_seeded_init_is_independent_of_global_rng():
    a = build_head(parse_head_spec("ap2"), D, K, True, seed=5)
    torch.manual_seed(123)
    torch.rand(100)
    b = build_head(parse_head_spec("ap2"), D, K, True, seed=5)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_a_crafted_head_file_is_refused_without_running_code(tmp_path):
    import os
    import pickle

    from attnflow.errors import AttnflowError
    from attnflow.probes.outputs import load_head

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    path = tmp_path / "abmilp.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": 1, "spec": "abmilp", "meta": Payload()}, f)
    with pytest.raises(AttnflowError, match="not a saved attnflow probe head"):
        load_head(path)
    assert not marker.exists(), "loading a head file must not run code"
