"""Per-block comparison plots: lines, bands, bound, colours and files, checked against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_hex

from attnflow.models import registry
from attnflow.models.registry import ModelSpec
from attnflow.plot import (FAMILY_PALETTES, PlotError, block_ticks, plot_blocks, plot_metrics, plot_size_grid,
                           save_figure)
from plot_results import FAMILIES, make_result, value

def model_lines(ax):
    return {line.get_gid(): line for line in ax.get_lines() if line.get_gid() != "bound"}


def test_one_line_per_model_with_head_means_and_1_based_blocks():
    res = make_result(FAMILIES)
    ax = plot_blocks(res, "cls_self", band="none")
    lines = model_lines(ax)
    assert list(lines) == ["mim", "jea", "ft"]
    for i, name in enumerate(FAMILIES):
        x, y = lines[name].get_data()
        assert list(x) == [1, 2, 3]
        expected = [sum(value(i, b, h, 0) for h in range(3)) / 3 for b in range(3)]
        np.testing.assert_allclose(y, expected, rtol=0, atol=1e-12)
        assert lines[name].get_label() == name  # no preset, no meta label: the name
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "3"]
    assert ax.get_xlabel() == "block" and ax.get_ylabel() == "[cls]-[cls] attention"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["mim", "jea", "ft"]
    assert not [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert not [line for line in ax.get_lines() if line.get_gid() == "bound"]  # not an entropy metric


@pytest.mark.parametrize("metric,label", [("cls_patch_entropy", "[cls]-patch entropy"),
                                          ("patch_patch_entropy", "patch-patch entropy")])
def test_entropy_metrics_draw_ln_n_bound(metric, label):
    ax = plot_blocks(make_result(FAMILIES), metric)
    bound = [line for line in ax.get_lines() if line.get_gid() == "bound"]
    assert len(bound) == 1
    np.testing.assert_allclose(bound[0].get_ydata(), [5.278115, 5.278115], atol=1e-6)
    assert ax.get_ylabel() == label
    ax = plot_blocks(make_result(FAMILIES), metric, n_patches=256)  # explicit N wins over provenance
    bound = [line for line in ax.get_lines() if line.get_gid() == "bound"]
    assert bound[0].get_ydata()[0] == pytest.approx(math.log(256))


def test_bound_from_img_and_patch_size_when_n_patches_missing():
    res = make_result({"a": {"n_patches": None, "img_size": [224, 224], "patch_size": 14}})
    ax = plot_blocks(res, "cls_patch_entropy")
    bound = [line for line in ax.get_lines() if line.get_gid() == "bound"]
    assert bound[0].get_ydata()[0] == pytest.approx(math.log(16 * 16))


def _band_limits(ax, model):
    """{x: (lo, hi)} read back from the fill_between polygon of ``model``."""
    (band,) = [c for c in ax.collections if c.get_gid() == f"band:{model}"]
    vertices = band.get_paths()[0].vertices
    out = {}
    for x in (1, 2, 3):
        ys = vertices[np.isclose(vertices[:, 0], x), 1]
        out[x] = (ys.min(), ys.max())
    return out


@pytest.mark.parametrize("band", ["heads", "heads-std", "images"])
def test_band_choices(band):
    res = make_result(FAMILIES)
    ax = plot_blocks(res, "patch_self", band=band)
    assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) == 3
    for i, name in enumerate(FAMILIES):
        limits = _band_limits(ax, name)
        for b in range(3):
            heads = [value(i, b, h, 2) for h in range(3)]
            mean = sum(heads) / 3
            if band == "heads":
                lo, hi = min(heads), max(heads)
            elif band == "heads-std":
                sd = math.sqrt(sum((v - mean) ** 2 for v in heads) / 3)
                lo, hi = mean - sd, mean + sd
            else:
                sd = sum(0.01 * (h + 1) + 0.001 * b for h in range(3)) / 3
                lo, hi = mean - sd, mean + sd
            np.testing.assert_allclose(limits[b + 1], (lo, hi), atol=1e-12)


def test_family_colours_and_stable_palette(monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "toy-mae-vit-b16", ModelSpec(
        name="toy-mae-vit-b16", arch="vit_base_patch16_224", method="MAE", family="MIM", size="B", patch_size=16))
    res = make_result({"toy-mae-vit-b16": {"family": "JEA"},  # the preset wins over the provenance
                       "x-jea": {"family": "JEA", "method": "SomeJEA"}, "y-ft": {"family": "MIM+FT"},
                       "z-unknown": {}})
    lines = model_lines(plot_blocks(res, "cls_self"))
    colours = {k: to_hex(v.get_color()) for k, v in lines.items()}
    assert colours["toy-mae-vit-b16"] in FAMILY_PALETTES["MIM"]
    assert colours["x-jea"] in FAMILY_PALETTES["JEA"]
    assert colours["y-ft"] in FAMILY_PALETTES["MIM+FT"]
    assert colours["z-unknown"] in FAMILY_PALETTES["other"]
    assert lines["toy-mae-vit-b16"].get_label() == "MAE ViT-B/16"
    # Same model, same colour: another figure with fewer models in another order.
    lines2 = model_lines(plot_blocks(res, "cls_self", models=["y-ft", "x-jea"]))
    assert {k: to_hex(v.get_color()) for k, v in lines2.items()} == {k: colours[k] for k in ("y-ft", "x-jea")}
    assert list(lines2) == ["y-ft", "x-jea"]


def test_same_colour_in_one_axes_gets_another_dash():
    res = make_result({"run1": {"family": "MIM", "method": "MAE"}, "run2": {"family": "MIM", "method": "MAE"}})
    lines = model_lines(plot_blocks(res, "cls_self"))
    assert to_hex(lines["run1"].get_color()) == to_hex(lines["run2"].get_color())
    assert lines["run1"].get_linestyle() != lines["run2"].get_linestyle()


def test_models_without_cls_are_left_out_of_cls_metrics():
    res = make_result({"a": {}, "nocls": {}}, nan_cls=("nocls",))
    assert list(model_lines(plot_blocks(res, "cls_self"))) == ["a"]
    assert list(model_lines(plot_blocks(res, "patch_self"))) == ["a", "nocls"]
    with pytest.raises(PlotError, match="no model"):
        plot_blocks(res, "cls_self", models=["nocls"])


def test_bad_names_are_one_clear_error():
    res = make_result(FAMILIES)
    with pytest.raises(PlotError, match="did you mean cls_patch_entropy"):
        plot_blocks(res, "cls_patch_entrop")
    with pytest.raises(PlotError, match="did you mean cls_self"):  # case and dashes do not hide the match
        plot_blocks(res, "CLS-Self")
    with pytest.raises(PlotError, match="did you mean mim"):
        plot_blocks(res, "cls_self", models=["mimm"])
    with pytest.raises(PlotError, match="band"):
        plot_blocks(res, "cls_self", band="everything")


def test_ax_is_used_and_returned():
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2)
    assert plot_blocks(make_result(FAMILIES), "cls_self", ax=a2) is a2
    assert len(model_lines(a2)) == 3 and not a1.get_lines()


def test_axes_on_a_sub_figure_get_ticks_for_their_own_width():
    """Axes of a sub-figure have their position in sub-figure fractions. Ticks need 0.25 in each: an axes 1 in
    wide takes 4, so 8 blocks get 1, 3, 6 (the 2 in that the same fraction of the whole figure would give fit
    all 8 ticks)."""
    import matplotlib.pyplot as plt

    res = make_result(FAMILIES, n_blocks=8)
    fig = plt.figure(figsize=(8, 3))
    left, right = fig.subfigures(1, 2, wspace=0)
    narrow = right.add_axes((0.1, 0.1, 0.25, 0.8))        # 0.25 of a 4 in sub-figure: 1 in
    assert plot_blocks(res, "cls_self", ax=narrow, band="none") is narrow
    assert list(narrow.get_xticks()) == [1, 3, 6]
    wide = left.add_axes((0.1, 0.1, 0.8, 0.8))            # 3.2 in: 12 ticks fit
    plot_blocks(res, "cls_self", ax=wide, band="none")
    assert list(wide.get_xticks()) == list(range(1, 9))


def test_block_ticks():
    assert block_ticks(12, 12) == list(range(1, 13))
    assert block_ticks(12, 6) == [1, 3, 6, 9, 12]
    assert block_ticks(24, 8) == [1, 4, 8, 12, 16, 20, 24]
    assert all(t[0] == 1 and t[-1] <= n for n in (6, 12, 24, 32) for t in [block_ticks(n, 5)])


def test_metrics_figure_has_one_panel_per_metric_and_one_legend():
    fig = plot_metrics(make_result(FAMILIES))
    assert [ax.get_title() for ax in fig.axes] == ["[cls]-[cls] attention", "[cls]-patch entropy",
                                                   "patch-patch attention", "patch-patch entropy"]
    assert all(len(model_lines(ax)) == 3 for ax in fig.axes)
    assert all(ax.get_legend() is None for ax in fig.axes)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["mim", "jea", "ft", "max. entropy ln(196)"]
    assert fig.get_figwidth() == pytest.approx(6.9)


def test_size_grid_puts_each_model_in_its_size_column():
    res = make_result({"mae-s": {"size": "S", "method": "MAE", "family": "MIM"},
                       "mae-vit-l16": {"method": "MAE", "family": "MIM"},  # size parsed from the name
                       "dino-b": {"size": "B", "method": "DINO", "family": "JEA"},
                       "mae-b": {"size": "B", "method": "MAE", "family": "MIM"}})
    fig = plot_size_grid(res, metrics=["cls_self", "patch_patch_entropy"])
    axes = np.array(fig.axes).reshape(2, 3)
    assert [ax.get_title() for ax in axes[0]] == ["ViT-S", "ViT-B", "ViT-L"]
    assert [set(model_lines(ax)) for ax in axes[1]] == [{"mae-s"}, {"dino-b", "mae-b"}, {"mae-vit-l16"}]
    assert axes[0, 0].get_ylabel() == "[cls]-[cls] attention"
    # one legend entry per method, with the same colour at every size
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["MAE", "DINO", "max. entropy ln(196)"]
    mae = {to_hex(model_lines(ax)[m].get_color()) for ax, m in zip(axes[0], ["mae-s", "mae-b", "mae-vit-l16"])}
    assert len(mae) == 1
    with pytest.raises(PlotError, match="size H"):
        plot_size_grid(res, sizes=["B", "H"])


def test_render_stored_result_to_pdf_and_png(tmp_path):
    path = make_result(FAMILIES).write(tmp_path / "runs" / "three.parquet")
    fig = plot_metrics(path)  # read from disk
    pdf = save_figure(fig, tmp_path / "out" / "fig.pdf")
    png = save_figure(fig, tmp_path / "out" / "fig.png", dpi=72)
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 5000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    again = save_figure(plot_metrics(path), tmp_path / "out" / "again.pdf")
    assert again.read_bytes() == pdf.read_bytes()  # no timestamp: same data, same bytes
    with pytest.raises(PlotError, match="extension"):
        save_figure(fig, tmp_path / "fig.jpeg2")


def test_every_preset_method_has_its_own_colour_within_its_family():
    from attnflow.models import list_specs
    from attnflow.plot import color_for

    by_family: dict[str, dict[str, str]] = {}
    for spec in list_specs():
        colour = color_for(spec.family, spec.method)
        assert colour in FAMILY_PALETTES[spec.family], spec.name
        by_family.setdefault(spec.family, {})[spec.method] = colour
    for family, colours in by_family.items():
        assert len(set(colours.values())) == len(colours), (family, colours)


def test_random_weights_are_stamped_on_figures():
    res = make_result({"real": {}, "rand": {"random_init": True}})
    fig = plot_metrics(res)
    assert fig._suptitle is not None and "RANDOM-INIT" in fig._suptitle.get_text()
    assert plot_metrics(res, models=["real"], title="T")._suptitle.get_text() == "T"
    ax = plot_blocks(res, "cls_self", models=["rand"])
    assert [t.get_gid() for t in ax.texts] == ["banner"]
    assert not plot_blocks(res, "cls_self", models=["real"]).texts


def test_size_grid_panel_without_data_shows_no_axis_numbers():
    """A ViT-H without [cls] (I-JEPA) has no [cls] panel: it says "no data" and shows no 0..1 axis of its own,
    and the panels that share its row keep their y ticks."""
    res = make_result({"mae-b": {"size": "B", "method": "MAE", "family": "MIM"},
                       "ijepa-h": {"size": "H", "method": "I-JEPA", "family": "MIM"}}, nan_cls=("ijepa-h",))
    fig = plot_size_grid(res, metrics=["cls_self", "patch_self"])
    fig.canvas.draw()
    axes = np.array(fig.axes).reshape(2, 2)
    empty = axes[0, 1]
    assert [t.get_text() for t in empty.texts] == ["no data"]
    assert not [t for t in empty.get_xticklabels() + empty.get_yticklabels() if t.get_visible() and t.get_text()]
    assert not empty.get_lines()
    row_ticks = [t.get_text() for t in axes[0, 0].get_yticklabels() if t.get_visible() and t.get_text()]
    assert len(row_ticks) >= 2
    assert [set(model_lines(ax)) for ax in axes[1]] == [{"mae-b"}, {"ijepa-h"}]


def test_legend_of_many_models_fits_the_paper_width_in_balanced_rows():
    """Nine models with long labels: the shared legend stays within the 6.9 in figure (a tight bounding box
    would otherwise widen the saved file past two columns) and its rows are filled evenly."""
    names = [f"{m} ViT-{s}/{p}" for m, s, p in [("DINOv2+reg4", "S", 14), ("MAE-FT", "B", 16), ("iBOT", "L", 16),
                                                 ("MoCo-v3", "B", 16), ("I-JEPA", "H", 14), ("DINOv2+reg4", "B", 14),
                                                 ("BEiT-v2", "B", 16), ("MaskFeat", "B", 16), ("SimMIM", "B", 16)]]
    res = make_result({n: {"family": "JEA", "label": n} for n in names})
    fig = plot_metrics(res)
    fig.canvas.draw()
    (legend,) = fig.legends
    box = legend.get_window_extent(fig.canvas.get_renderer())
    assert box.width <= fig.bbox.width
    n = len(legend.get_texts())
    assert n == 10  # nine models and the bound
    ncol = legend._ncols  # noqa: SLF001
    rows = -(-n // ncol)
    assert rows >= 2 and -(-n // rows) == ncol  # as few columns as give that many rows: no near-empty last row
