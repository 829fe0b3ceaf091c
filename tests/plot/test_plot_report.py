"""Standard figure sets for `attnflow run` / `attnflow demo`."""

from __future__ import annotations


from attnflow.plot import block_figures
from plot_results import make_result


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
