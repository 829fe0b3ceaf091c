"""Standard figure sets for `attnflow run` / `attnflow demo`."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from attnflow.plot import PlotError, block_figures, maps_figure
from conftest import tiny_model
from test_plot_blocks import make_result


def test_block_figures_write_every_listed_file(tmp_path):
    res = make_result({"mae-s": {"size": "S", "family": "MIM"}, "dino-b": {"size": "B", "family": "JEA"}})
    metrics = ["cls_self", "patch_patch_entropy"]
    paths = block_figures(res, tmp_path / "figs", stem="x-", metrics=metrics, formats=("png",), per_head=True,
                          dpi=40)
    expected = [f"x-{n}.png" for n in ["metrics", *metrics, "sizes", *[f"heads-{m}" for m in metrics]]]
    assert [p.name for p in paths] == expected
    assert all(p.read_bytes()[:4] == b"\x89PNG" and p.stat().st_size > 1000 for p in paths)
    one_size = block_figures(make_result({"a": {"size": "B"}}), tmp_path / "one", metrics=["cls_self"],
                             formats=("png", "pdf"), dpi=40)
    # no size grid for one size; every format of every figure
    assert [p.name for p in one_size] == ["metrics.png", "metrics.pdf", "cls_self.png", "cls_self.pdf"]


def test_maps_figure_runs_models_on_photos(photos):
    models = {"a": tiny_model(img_size=64), "b": tiny_model(img_size=64, seed=1, class_token=False,
                                                               global_pool="avg")}
    images = [Image.fromarray(photos[k]) for k in ("chelsea", "coffee")]
    fig, crops, maps = maps_figure(models, images, img_size=64, labels={"a": "A"})
    assert len(crops) == 2 and crops[0].shape == (64, 64, 3)
    assert maps["a"][0].has_cls and not maps["b"][0].has_cls
    assert np.isclose(maps["b"][1].central.sum(), 1.0)
    assert len(fig.axes) == 2 * (1 + 2 * 3)


def test_maps_figure_without_models_is_one_clear_error(photos):
    with pytest.raises(PlotError, match="at least one model"):
        maps_figure({}, [Image.fromarray(photos["chelsea"])], img_size=64)
