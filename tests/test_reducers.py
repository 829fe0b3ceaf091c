"""Streaming reduction: batches == one pass, merge of halves == whole, state save/resume, missing metrics."""

import numpy as np
import torch

from attnflow.metrics import METRICS, valid_metrics
from attnflow.reducers import StatsReducer


def _values(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, len(METRICS), generator=g) * 5  # [B, H, M]


def test_streaming_equals_numpy_over_concatenation():
    batches = [[_values(n, 10 * s + b) for b in range(2)] for s, n in enumerate([4, 7, 1, 5])]
    red = StatsReducer(2, 3)
    for per_block in batches:
        for b, v in enumerate(per_block):
            red.update(b, v)
    stats = red.compute()
    for b in range(2):
        all_v = torch.cat([per_block[b] for per_block in batches]).double().numpy()  # [n, H, M]
        np.testing.assert_allclose(stats["mean"][b], all_v.mean(0), rtol=1e-12)
        np.testing.assert_allclose(stats["std"][b], all_v.std(0, ddof=1), rtol=1e-9)
        assert (stats["count"][b] == 17).all()


def test_merge_of_halves_equals_whole():
    vals = [_values(6, i) for i in range(4)]
    whole, a, b = StatsReducer(1, 3), StatsReducer(1, 3), StatsReducer(1, 3)
    for i, v in enumerate(vals):
        whole.update(0, v)
        (a if i < 2 else b).update(0, v)
    merged = a.merge(b).compute()
    for key, value in whole.compute().items():
        np.testing.assert_allclose(merged[key], value, rtol=1e-13)


def test_state_dict_roundtrip():
    red = StatsReducer(2, 3)
    red.update(1, _values(5, 0))
    fresh = StatsReducer(2, 3)
    fresh.load_state_dict(red.state_dict())
    for key, value in red.compute().items():
        np.testing.assert_array_equal(fresh.compute()[key], value)


def test_missing_metrics_are_nan_with_zero_count():
    red = StatsReducer(1, 3, valid=valid_metrics(has_cls=False))
    v = _values(4, 1)
    v[..., METRICS.index("cls_self")] = float("nan")
    red.update(0, v)
    frame = red.to_frame("ijepa")
    cls_rows = frame[frame.metric == "cls_self"]
    assert cls_rows["mean"].isna().all() and (cls_rows["count"] == 0).all()
    ok = frame[frame.metric == "patch_self"]
    assert (ok["count"] == 4).all() and ok["mean"].notna().all()
    assert list(frame.columns) == ["model", "block", "head", "metric", "mean", "std", "count"]


def test_update_blocks_equals_numpy_per_block_for_runs_gaps_and_repeats():
    """One update for several blocks: consecutive blocks (the sliced path), a gap and a repeated block
    (the per-block path) all give numpy's statistics over each block's own images."""
    valid = valid_metrics(has_cls=False)
    red = StatsReducer(4, 3, valid=valid)
    seen: dict[int, list[torch.Tensor]] = {b: [] for b in range(4)}
    for step, blocks in enumerate([[0, 1, 2, 3], [1, 2], [3, 0], [2, 2]]):
        values = torch.stack([_values(3 + step, 100 * step + i) for i in range(len(blocks))])
        values[..., METRICS.index("cls_self")] = float("nan")
        red.update_blocks(blocks, values)
        for block, v in zip(blocks, values):
            seen[block].append(v)
    stats = red.compute()
    ok = valid.numpy()
    for b in range(4):
        all_v = torch.cat(seen[b]).double().numpy()[..., ok]
        np.testing.assert_allclose(stats["mean"][b][..., ok], all_v.mean(0), rtol=1e-12)
        np.testing.assert_allclose(stats["std"][b][..., ok], all_v.std(0, ddof=1), rtol=1e-9)
        assert (stats["count"][b][..., ok] == len(all_v)).all() and (stats["count"][b][..., ~ok] == 0).all()
        assert np.isnan(stats["mean"][b][..., ~ok]).all()
