"""AbMILP's options and the ``both`` head against the paper's official code (github.com/gmum/beyond_cls,
``abmilp.py``: ``ABMILPHead``; ``util/pos_embed.py``: ``get_2d_sincos_pos_embed``; ``models_vit.py``: ``both``),
written out below as it computes them; and the heads' fp16 evaluation as the official ``evaluate`` runs it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attnflow.encode import TokenEncoder
from attnflow.probes.bank import HeadBank
from attnflow.probes.heads import build_head, sincos_position_embedding
from attnflow.probes.loop import evaluate_bank
from attnflow.probes.protocols import TrainOptions, resolve_config
from attnflow.probes.specs import HeadSpecError, parse_head_spec
from attnflow.errors import AttnflowError
from conftest import tiny_model
from probe_data import one_thread  # noqa: F401  (autouse fixture)

D, K = 8, 3


# ---- the official code ---------------------------------------------------------------------------------------

def official_sincos(embed_dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
    """util/pos_embed.py: get_2d_sincos_pos_embed, verbatim in numpy."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # here w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])

    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=float)
        omega /= dim / 2.
        omega = 1. / 10000 ** omega
        out = np.einsum('m,d->md', pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


def official_attention(x: torch.Tensor, qkv: torch.nn.Linear, proj: torch.nn.Linear) -> torch.Tensor:
    """models_vit.Attention(dim, num_heads=1).forward (no fused path), its first output."""
    b, n, c = x.shape
    q, k, v = qkv(x).reshape(b, n, 3, 1, c).permute(2, 0, 3, 1, 4).unbind(0)
    attn = ((q * c ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    return proj((attn @ v).transpose(1, 2).reshape(b, n, c))


def official_abmilp(head, x: torch.Tensor, *, sa: str, cond: str, content: str) -> tuple[torch.Tensor, torch.Tensor]:
    """ABMILPHead.forward_with_attn_map with the head's own weights: ``(out, attn_map)``."""
    pool = head.pool
    if content == "patch":
        x = x[:, 1:]
    x_attn = official_attention(x, pool.attention.qkv, pool.attention.proj) if sa != "none" else x
    predictor_input = x_attn if sa in ["map", "both"] else x
    if cond == "pe":
        pe = official_sincos(x.shape[-1], int((x.shape[1] - (content != "patch")) ** .5), cls_token=content != "patch")
        predictor_input = predictor_input + torch.from_numpy(pe).float().unsqueeze(0)
    attn_map = F.softmax(pool.scorer(predictor_input), dim=1)
    x_out = x_attn if sa in ["both"] else x
    return (x_out * attn_map).sum(dim=1), attn_map


def official_logits(head, out: torch.Tensor) -> torch.Tensor:
    """BatchNorm1d(affine=False, eps=1e-6) in eval mode, then the Linear."""
    norm = head.norm
    return head.fc((out - norm.running_mean) / torch.sqrt(norm.running_var + 1e-6))


def make_head(spec: str, dim: int = D, seed: int = 0):
    head = build_head(parse_head_spec(spec), dim, K, True, seed=seed).double().eval()
    g = torch.Generator().manual_seed(seed + 1)
    head.norm.running_mean.copy_(torch.randn(head.width, generator=g, dtype=torch.float64))
    head.norm.running_var.copy_(torch.rand(head.width, generator=g, dtype=torch.float64) + 0.5)
    return head


def tokens(n: int = 3, patches: int = 9, dim: int = D, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, 1 + patches, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- 3. AbMILP: position conditioning, self-attention mode, scorer depth ----------------------------------------

@pytest.mark.parametrize("grid", [(3, 3), (4, 4), (2, 5)])
def test_position_embedding_is_the_official_sincos(grid):
    got = sincos_position_embedding(16, grid)
    if grid[0] == grid[1]:
        want = torch.from_numpy(official_sincos(16, grid[0])).float()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    # non-square: the same rule per axis (first half the column, second half the row)
    row, col = grid[0] - 1, grid[1] - 1
    square = torch.from_numpy(official_sincos(16, max(grid))).float().reshape(max(grid), max(grid), 16)
    torch.testing.assert_close(got[-1], square[row, col], rtol=0, atol=1e-7)


SPECS = [  # spec, --abmilp_sa, --abmilp_cond, --abmilp_content
    ("abmilp-pe", "none", "pe", "patch"),
    ("abmilp+cls-pe", "none", "pe", "all"),
    ("sa-map-abmilp", "map", "none", "patch"),
    ("sa-map-abmilp+cls", "map", "none", "all"),
    ("sa-abmilp-pe", "both", "pe", "patch"),
    ("sa-map-abmilp+cls-mlp3-relu-pe", "map", "pe", "all"),
    ("sa-abmilp+cls-mlp-tanh", "both", "none", "all"),
]


@pytest.mark.parametrize("spec,sa,cond,content", SPECS)
def test_abmilp_options_give_the_official_logits(spec, sa, cond, content):
    head = make_head(spec)
    x = tokens()
    with torch.no_grad():
        out, attn_map = official_abmilp(head, x, sa=sa, cond=cond, content=content)
        torch.testing.assert_close(head(x), official_logits(head, out), rtol=1e-12, atol=1e-12)
        start = int(content == "patch")
        torch.testing.assert_close(head.scores(x)[:, start:], attn_map.squeeze(-1), rtol=1e-12, atol=1e-14)


def test_abmilp_options_on_a_tiny_vit():
    model = tiny_model(img_size=64)                                  # 4x4 patches, width 32
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    x = TokenEncoder(model)(images).double()
    for spec, sa, cond, content in SPECS:
        head = make_head(spec, dim=32)
        with torch.no_grad():
            out, _ = official_abmilp(head, x, sa=sa, cond=cond, content=content)
            torch.testing.assert_close(head(x), official_logits(head, out), rtol=1e-12, atol=1e-12, msg=spec)


def test_scorer_depth_and_the_never_trained_embedding():
    spec = parse_head_spec("abmilp-mlp4-tanh-pe")
    assert (spec.depth, spec.scorer, spec.cond, spec.sa_apply) == (4, "mlp-tanh", "pe", "none")
    head = make_head(spec.name)
    layers = list(head.pool.scorer)
    assert [type(m).__name__ for m in layers] == ["Linear", "Tanh"] * 3 + ["Linear"]
    assert [tuple(m.weight.shape) for m in layers[::2]] == [(D, D)] * 3 + [(1, D)]
    assert not any("pe" in name or "pos" in name for name in head.state_dict())  # fixed, not a parameter
    before = head.pool.position_embedding(9, torch.device("cpu"), torch.float32).clone()  # 9 patches read
    head.train()
    opt = torch.optim.SGD(head.parameters(), lr=1.0)
    F.cross_entropy(head(tokens(n=4, patches=9)), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    assert torch.equal(head.pool.position_embedding(9, torch.device("cpu"), torch.float32), before)
    assert parse_head_spec("abmilp-mlp2-relu").name == "abmilp-mlp-relu"
    assert parse_head_spec("SA-MAP-abmilp+cls-mlp3-relu-pe").name == "sa-map-abmilp+cls-mlp3-relu-pe"
    with pytest.raises(HeadSpecError, match="plain abmilp"):
        parse_head_spec("abmilp-mlp1-relu")
    with pytest.raises(HeadSpecError, match="not a square grid"):
        make_head("abmilp-pe")(tokens(patches=10))
    assert make_head("abmilp-pe").pool.grid is None
    grid_head = build_head(parse_head_spec("abmilp-pe"), D, K, True, grid=(2, 5)).double().eval()
    grid_head(tokens(patches=10))  # a non-square grid given explicitly


# ---- 4. the both head ------------------------------------------------------------------------------------------

def test_both_concatenates_cls_and_the_patch_mean():
    head = make_head("both")
    x = tokens()
    assert head.width == 2 * D and head.fc.in_features == 2 * D
    with torch.no_grad():
        want = torch.cat([x[:, 0], x[:, 1:].mean(dim=1)], dim=1)   # official: concat([x_cls, x_pos])
        torch.testing.assert_close(head.features(x), want, rtol=0, atol=0)
        torch.testing.assert_close(head(x), official_logits(head, want), rtol=1e-12, atol=1e-12)
    with pytest.raises(HeadSpecError, match="no aggregation vector"):
        head.scores(x)
    with pytest.raises(HeadSpecError, match="needs a model with a \\[cls\\] token"):
        build_head(parse_head_spec("both"), D, K, False)


# ---- 5. fp16 autocast of the heads at evaluation ---------------------------------------------------------------

def fp16_linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    """What autocast(fp16) does to a Linear: inputs, weight and bias rounded to fp16, fp16 output."""
    return F.linear(x.half(), layer.weight.half(), layer.bias.half())


def test_fp16_evaluation_scores_the_official_fp16_logits():
    """The official ``evaluate`` runs the head under ``torch.cuda.amp.autocast()``: fp16 Linear layers (the
    AbMILP scorer, the classifier), float32 softmax, elementwise weighted sum and BatchNorm."""
    x = tokens(n=64, patches=9, seed=5).float() * 30
    y = torch.randint(0, K, (64,), generator=torch.Generator().manual_seed(6))
    scores = {}
    for amp in ("fp32", "fp16"):
        bank = HeadBank.from_options([parse_head_spec("abmilp"), parse_head_spec("avg")], [0.1],
                                     TrainOptions(eval_amp=amp), dim=D, num_classes=K, has_cls=True)
        scores[amp] = evaluate_bank(bank, [(x, y)], torch.device("cpu"))
    abmilp, avg = bank.heads
    with torch.no_grad():
        weights = F.softmax(fp16_linear(x[:, 1:], abmilp.pool.scorer).float(), dim=1)       # [n, 9, 1]
        pooled = {"abmilp": (x[:, 1:] * weights).sum(dim=1), "avg": x[:, 1:].mean(dim=1)}
        for i, (name, head) in enumerate(zip(("abmilp", "avg"), (abmilp, avg))):
            logits16 = fp16_linear(head.norm(pooled[name]), head.fc)
            loss16 = F.cross_entropy(logits16.float(), y).item()
            top1 = 100.0 * (logits16.float().argmax(1) == y).float().mean().item()
            assert scores["fp16"][i].loss == pytest.approx(loss16, rel=1e-6, abs=1e-7), name
            assert scores["fp16"][i].top1 == pytest.approx(top1), name
            assert scores["fp16"][i].loss != scores["fp32"][i].loss, name
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        assert abmilp.features(x).dtype == torch.float32      # the weighted sum stays in float32
        assert abmilp(x).dtype == torch.float16                # the classifier runs in fp16


def test_eval_amp_setting_reads_as_the_other_settings():
    assert TrainOptions(eval_amp="none").eval_amp == "fp32"
    with pytest.raises(AttnflowError, match="unknown eval_amp 'fp61'; did you mean fp16"):
        TrainOptions(eval_amp="fp61")
    config = resolve_config("cub", eval_amp="FP16")
    assert config.eval_amp == "fp16" and config.train_options(0, n_train=2000).eval_amp == "fp16"


def test_eval_amp_is_part_of_a_resumed_runs_identity_only_when_set(tmp_path):
    from attnflow.probes.fit import fit_bank
    from probe_data import planted_tokens

    train, val = planted_tokens(40, seed=0, patches=4, dim=8), planted_tokens(12, seed=1, patches=4, dim=8)
    kw = dict(epochs=1, batch_size=20, lr=0.5, optimizer="sgd", device="cpu", checkpoint=tmp_path / "c.pt")
    fit_bank(train, val, "avg", **kw)
    state = torch.load(tmp_path / "c.pt", weights_only=False)
    assert "eval_amp" not in state["fingerprint"]  # a checkpoint from before eval_amp existed reads the same
    with pytest.raises(AttnflowError, match="differs in eval_amp"):
        fit_bank(train, val, "avg", resume=True, eval_amp="fp16", **kw)
    assert len(fit_bank(train, val, "avg", resume=True, **kw).history) == 1
