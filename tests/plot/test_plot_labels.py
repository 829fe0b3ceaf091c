"""One rule for block and head numbers: data are 0-based, figures number them from 1 (as the paper does), and every
figure label goes through :func:`attnflow.plot.style.figure_label`."""

from __future__ import annotations

import numpy as np
import pytest

import attnflow.plot.blocks
import attnflow.plot.heads
import attnflow.plot.mapfig
from attnflow.maps import patch_maps
from attnflow.plot import plot_attention_maps, plot_blocks, plot_head_heatmap, plot_head_maps
from attnflow.plot.style import figure_label
from plot_results import FAMILIES, make_result
from planted_maps import layout, planted_attention

SHIFT = 100
"""A rule no figure would use by accident: a label that escapes the helper shows up as 1-based, not as 100+."""


@pytest.fixture(params=["paper", "shifted"])
def rule(request, monkeypatch):
    """The label rule the figures must follow: the real one (index + 1) or a stand-in patched into every module
    that draws labels."""
    if request.param == "paper":
        return lambda i: i + 1
    for module in (attnflow.plot.blocks, attnflow.plot.heads, attnflow.plot.mapfig):
        monkeypatch.setattr(module, "figure_label", lambda i: int(i) + SHIFT)
    return lambda i: i + SHIFT


def test_figure_label_is_one_based_and_a_plain_int():
    assert [figure_label(i) for i in range(3)] == [1, 2, 3]
    assert figure_label(np.int64(7)) == 8 and type(figure_label(np.int64(7))) is int  # the paper's "8-th block"


def test_block_lines_and_ticks_follow_the_rule(rule):
    res = make_result(FAMILIES, n_blocks=4)
    ax = plot_blocks(res, "cls_self", legend=False)
    line = next(line for line in ax.get_lines() if line.get_gid() == "mim")
    assert list(line.get_xdata()) == [rule(b) for b in range(4)]
    assert list(ax.get_xticks()) == [rule(b) for b in range(4)]
    assert ax.get_xlim() == (rule(0) - 0.5, rule(3) + 0.5)


def test_head_heatmap_labels_follow_the_rule(rule):
    ax = plot_head_heatmap(make_result(FAMILIES, n_blocks=3, n_heads=4), "jea", "patch_self")
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(rule(h)) for h in range(4)]
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(rule(b)) for b in range(3)]


def test_map_headers_and_head_titles_follow_the_rule(rule, photos):
    maps = patch_maps(planted_attention(n_heads=5, cls_peak=(3, 1, 1)), layout())
    assert maps.min_entropy_head == 3
    fig = plot_attention_maps([photos["coffee"]], {"m": [maps]}, kinds=["cls_min_entropy", "cls_head:2"])
    texts = {t.get_text() for ax in fig.axes for t in [ax.title, *ax.texts]}
    assert f"head {rule(3)}" in texts  # the lowest-entropy head's corner note
    assert f"[cls],\nhead {rule(2)}" in texts  # the column header of cls_head:2
    fig = plot_head_maps(photos["coffee"], maps)
    assert [ax.get_title() for ax in fig.axes] == [f"head {rule(h)}" + (" (lowest H)" if h == 3 else "")
                                                   for h in range(5)]
