"""Fixed aggregation vectors and their statistics (paper Table 5 / Fig. 7) against per-image maps, hand
softmax loops and brute-force entropy / KL loops."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from attnflow.maps import patch_maps
from attnflow.aggregation.sources import AggregationError, parse_source, source_label
from attnflow.aggregation.vectors import aggregation_vectors
from attnflow.metrics import row_entropy
from attnflow.aggregation.statistics import Q_FLOOR, AggregationStats, kld_matrix, pairwise_kl
from attnflow.tap import AttentionTap
from conftest import tiny_model
from probe_data import one_thread  # noqa: F401  (autouse fixture: the workers use one thread too)
from brute_force import brute_entropy, brute_kl

GRID = (3, 5)  # not square: catches row/column mix-ups


def layout(num_prefix: int = 3, has_cls: bool = True, grid=GRID):
    return SimpleNamespace(num_prefix=num_prefix, has_cls=has_cls, grid=grid, patch_size=(16, 16))


def hand_softmax_attention(b: int, h: int, n: int, seed: int = 0) -> tuple[list, torch.Tensor]:
    """Random logits, softmaxed row by row with math.exp: (nested lists [b][h][q][k], float64 tensor)."""
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(b, h, n, n, generator=g, dtype=torch.float64)).tolist()
    probs = []
    for img in logits:
        probs.append([])
        for head in img:
            rows = []
            for row in head:
                m = max(row)
                e = [math.exp(x - m) for x in row]
                rows.append([v / sum(e) for v in e])
            probs[-1].append(rows)
    return probs, torch.tensor(probs, dtype=torch.float64)


def test_sources_match_hand_loops_with_registers():
    b, h, prefix = 4, 5, 3
    n = prefix + GRID[0] * GRID[1]
    probs, attn = hand_softmax_attention(b, h, n)
    lay = layout(prefix)
    centre = prefix + (GRID[0] // 2) * GRID[1] + GRID[1] // 2
    got = {s: aggregation_vectors(attn, lay, s, dtype=torch.float64)
           for s in ("cls_mean", "cls_min_entropy", "central")}
    for i in range(b):
        for src, query in (("cls_mean", 0), ("central", centre)):
            row = [sum(probs[i][k][query][prefix + j] for k in range(h)) / h for j in range(n - prefix)]
            want = [v / sum(row) for v in row]
            np.testing.assert_allclose(got[src][i].numpy(), want, rtol=0, atol=1e-13)
        ents = [brute_entropy(probs[i][k][0][prefix:]) for k in range(h)]
        best = min(range(h), key=lambda k: ents[k])
        row = probs[i][best][0][prefix:]
        np.testing.assert_allclose(got["cls_min_entropy"][i].numpy(), [v / sum(row) for v in row], rtol=0, atol=1e-13)
    for v in got.values():
        np.testing.assert_allclose(v.sum(1).numpy(), 1.0, atol=1e-12)


def test_sources_of_a_real_model_by_hand_and_in_patch_maps(photos):
    model = tiny_model(img_size=64, reg_tokens=2)  # [cls] + 2 registers
    images = torch.stack([torch.as_tensor(np.array(photos[k][:64, :64]), dtype=torch.float32).permute(2, 0, 1)
                          / 255 - 0.5 for k in sorted(photos)[:4]])
    with AttentionTap(model, blocks=[-1]) as tap, torch.no_grad():
        model(images)
        attn, lay = tap.maps[0], tap.layout
    assert lay.num_prefix == 3
    a = attn.double().numpy()                                   # [4, H, 19, 19]: [cls], 2 registers, 4x4 patches
    centre = 3 + 1 * 4 + 1    # patch (row 1, col 1) of the 4x4 grid: ((4 - 1) // 2, (4 - 1) // 2), the official ca1
    for src in ("cls_mean", "cls_min_entropy", "central"):
        vec = aggregation_vectors(attn, lay, src)
        assert vec.dtype == torch.float32 and vec.shape == (4, 16)
        for i in range(4):
            if src == "cls_min_entropy":  # written out: the head whose renormalised [cls] row is least spread
                rows = a[i, :, 0, 3:] / a[i, :, 0, 3:].sum(axis=1, keepdims=True)
                row = rows[np.argmin(-(rows * np.log(rows)).sum(axis=1))]
            else:
                row = a[i, :, 0 if src == "cls_mean" else centre, 3:].mean(axis=0)
            np.testing.assert_allclose(vec[i].numpy(), row / row.sum(), rtol=1e-6, atol=1e-7)
            # the per-image maps of `attnflow maps` show the same vectors
            np.testing.assert_allclose(getattr(patch_maps(attn[i], lay), src).reshape(-1), row / row.sum(),
                                       rtol=1e-6, atol=1e-7)


def test_model_without_cls_gets_central_only_and_bad_shapes_are_one_line():
    probs, attn = hand_softmax_attention(2, 2, 15)
    vec = aggregation_vectors(attn, layout(0, False), "central")
    assert vec.shape == (2, 15)
    with pytest.raises(AggregationError, match="needs a \\[cls\\] token"):
        aggregation_vectors(attn, layout(0, False), "cls_mean")
    with pytest.raises(AggregationError, match="does not match the token layout"):
        aggregation_vectors(attn, layout(3), "central")


def test_parse_source_suggests_close_names():
    assert parse_source("cls-mean").name == "cls_mean"
    assert parse_source("reference:dino-vit-b16").target == "dino-vit-b16"
    with pytest.raises(AggregationError, match="did you mean cls_mean"):
        parse_source("cls_maen")
    with pytest.raises(AggregationError, match="did you mean reference:<model-name>"):
        parse_source("refrence")
    with pytest.raises(AggregationError, match="needs a model name"):
        parse_source("reference:")
    with pytest.raises(AggregationError, match="unknown aggregation source 'head:abmilp'"):
        parse_source("head:abmilp")  # only the statistics accept a head source
    assert parse_source("head:abmilp", allow_head=True).kind == "head"


def test_labels_follow_table_5():
    assert source_label("cls_mean", "MAE") == "Average MAE [cls] token attention"
    assert source_label("cls_min_entropy", "MAE") == "Lowest-entropy MAE [cls] token attention"
    assert source_label("central", "MAE") == "MAE central patch token attention"
    assert source_label("reference:dino-vit-b16", "MAE", "DINO") == "Average DINO [cls] token attention"
    assert source_label("head:abmilp", "MAE") == "AbMILP"


def test_entropy_of_uniform_is_log_n_and_zeros_count_as_zero():
    for n in (1, 7, 196):
        assert row_entropy(torch.full((n,), 0.3, dtype=torch.float64)).item() == pytest.approx(math.log(n), abs=1e-12)
    p = torch.tensor([0.5, 0.0, 0.25, 0.25], dtype=torch.float64)
    assert row_entropy(p).item() == pytest.approx(brute_entropy(p.tolist()), abs=1e-15)


def random_vectors(s: int, b: int, n: int, seed: int, zeros: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(s, b, n, generator=g, dtype=torch.float64) ** 3
    if zeros:
        v[0, 0, 2] = 0.0  # p has a zero (0 log 0 = 0) and, as q, a zero where the others are positive
        v[1, 1, :3] = 0.0
    return v / v.sum(-1, keepdim=True)


def test_pairwise_kl_matches_double_loop_with_floored_zeros():
    v = random_vectors(3, 4, 6, seed=1)
    kl, zero = pairwise_kl(v)
    for s in range(3):
        for t in range(3):
            for i in range(4):
                p, q = v[s, i].tolist(), v[t, i].tolist()
                assert kl[s, t, i].item() == pytest.approx(brute_kl(p, q, Q_FLOOR), rel=1e-12, abs=1e-13)
                assert bool(zero[s, t, i]) == any(a > 0 and c == 0 for a, c in zip(p, q))
    assert kl.diagonal(dim1=0, dim2=1).eq(0).all()
    assert zero[1, 0, 0] and zero[0, 1, 1] and not zero[0, 0].any()
    # the floored zero alone adds p_2 * (ln p_2 - ln 1.18e-38): large but finite
    assert math.isfinite(kl[1, 0, 0].item()) and kl[1, 0, 0] > v[1, 0, 2] * (math.log(v[1, 0, 2]) + 87.3)


def test_stats_table_matches_brute_force_and_streaming_equals_one_pass():
    names = ["cls_mean", "central", "head:abmilp"]
    v = random_vectors(3, 10, 6, seed=2)
    whole = AggregationStats(names)
    whole.update(v)
    frame = whole.to_frame("m")
    ent = frame[frame.metric == "entropy"].set_index("source")
    for s, name in enumerate(names):
        values = [brute_entropy(v[s, i].tolist()) for i in range(10)]
        assert ent.loc[name, "mean"] == pytest.approx(np.mean(values), abs=1e-13)
        assert ent.loc[name, "std"] == pytest.approx(np.std(values, ddof=1), rel=1e-9)
    matrix = kld_matrix(frame, names)
    for s in range(3):
        for t in range(3):
            want = np.mean([brute_kl(v[s, i].tolist(), v[t, i].tolist(), Q_FLOOR) for i in range(10)])
            assert matrix.iloc[s, t] == pytest.approx(want, rel=1e-12)
    kld = frame[frame.metric == "kld"].set_index(["source", "target"])
    assert kld.loc[("central", "cls_mean"), "q_zero_images"] == 1
    assert kld.loc[("cls_mean", "central"), "q_zero_images"] == 1
    assert (frame["count"] == 10).all()
    # streaming in uneven batches (a dict per batch, an empty batch too) == one pass; merge of halves == whole
    stream = AggregationStats(names)
    for lo, hi in ((0, 3), (3, 3), (3, 9), (9, 10)):
        stream.update({name: v[s, lo:hi].float() if s == 1 else v[s, lo:hi] for s, name in enumerate(names)})
    first, second = AggregationStats(names), AggregationStats(names)
    first.update(v[:, :4])
    second.update(v[:, 4:])
    restored = AggregationStats(names)
    restored.load_state_dict(first.merge(second).state_dict())
    for other in (restored,):
        np.testing.assert_allclose(other.compute()["kld"], whole.compute()["kld"], rtol=1e-12)
        np.testing.assert_allclose(other.compute()["entropy"], whole.compute()["entropy"], rtol=1e-12)
    # a float32 copy of source 1 is renormalised in float64: the same statistics to float32 precision
    np.testing.assert_allclose(stream.compute()["entropy"], whole.compute()["entropy"], rtol=1e-6)
    assert int(stream.count) == 10
    with pytest.raises(AggregationError, match="no vectors for source"):
        stream.update({"cls_mean": v[0]})
    with pytest.raises(AggregationError, match="cannot merge"):
        stream.merge(AggregationStats(["cls_mean"]))


def _dist_worker(rank: int, world: int, init: str, folder: str, out: str) -> None:
    import torch.distributed as dist

    from attnflow.aggregation.analysis import aggregation_statistics

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        result = aggregation_statistics(tiny_model(img_size=64), folder, img_size=64, batch_size=1, progress=False)
        if rank == 0:
            torch.save((result.frame, result.meta), out)
    finally:
        dist.destroy_process_group()


def test_two_processes_give_what_one_gives(photo_folder, tmp_path):
    """Sharding by image, all_reduce of the sums and the skipped list gathered: 2 gloo processes == one."""
    import torch.multiprocessing as mp

    from attnflow.aggregation.analysis import aggregation_statistics

    (photo_folder / "ILSVRC2012_val_00000050.JPEG").write_bytes(b"")  # unreadable, in process 1's share
    out = str(tmp_path / "two.pt")
    mp.spawn(_dist_worker, args=(2, f"file://{tmp_path / 'init'}", str(photo_folder), out), nprocs=2, join=True)
    frame, meta = torch.load(out, weights_only=False)
    # batch 1 and one thread in both runs: the same per-image forward, so the sums must agree exactly
    one = aggregation_statistics(tiny_model(img_size=64), photo_folder, img_size=64, batch_size=1, progress=False)
    assert meta["images_used"] == one.meta["images_used"] == 7 and meta["world_size"] == 2
    assert [s["path"] for s in meta["skipped"]] == [s["path"] for s in one.meta["skipped"]]
    assert len(meta["skipped"]) == 1
    np.testing.assert_allclose(frame["mean"], one.frame["mean"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(frame["std"], one.frame["std"], rtol=1e-6, atol=1e-9)
