"""Per-head heatmaps: the drawn matrix is the table's (block, head) values, 1-based labels, shared scales."""

from __future__ import annotations

import math

import numpy as np
import pytest

from attnflow.plot import PlotError, head_matrix, plot_head_heatmap, plot_heads
from plot_results import FAMILIES, make_result, value


def test_heatmap_cells_are_the_per_head_means():
    res = make_result(FAMILIES, n_blocks=3, n_heads=4)
    ax = plot_head_heatmap(res, "jea", "patch_self")
    mesh = ax.collections[0]
    drawn = np.asarray(mesh.get_array()).reshape(3, 4)
    for b in range(3):
        for h in range(4):
            assert drawn[b, h] == pytest.approx(value(1, b, h, 2))  # "jea" is model 1, patch_self metric 2
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "3", "4"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1", "2", "3"]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("head", "block", "jea")


def test_entropy_heatmap_scale_reaches_ln_n():
    ax = plot_head_heatmap(make_result(FAMILIES), "mim", "cls_patch_entropy")
    vmin, vmax = ax.collections[0].get_clim()
    assert vmax == pytest.approx(math.log(196))


def test_heads_figure_shares_one_colour_scale():
    res = make_result(FAMILIES, nan_cls=("ft",))
    fig = plot_heads(res, "cls_self")
    heat = [ax for ax in fig.axes if ax.collections and ax.get_title()]
    assert [ax.get_title() for ax in heat] == ["mim", "jea"]  # "ft" has no [cls] values
    clims = {ax.collections[0].get_clim() for ax in heat}
    assert len(clims) == 1
    lo, hi = clims.pop()
    all_values = [value(i, b, h, 0) for i in (0, 1) for b in range(3) for h in range(3)]
    assert (lo, hi) == pytest.approx((min(all_values), max(all_values)))


def test_head_matrix_and_errors():
    res = make_result(FAMILIES)
    m = head_matrix(res, "ft", "patch_patch_entropy")
    assert m.shape == (3, 3) and m.loc[2, 1] == pytest.approx(value(2, 2, 1, 3))
    with pytest.raises(PlotError, match="did you mean"):
        head_matrix(res, "fx", "cls_self")
    with pytest.raises(PlotError, match="no values"):
        plot_head_heatmap(make_result({"nocls": {}}, nan_cls=("nocls",)), "nocls", "cls_self")
