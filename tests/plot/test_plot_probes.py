"""Probe accuracy per block: the plotted values are the run tables' top-1 per block (by hand: the mean over seeds of
the last epoch at the kept lr), on the statistics figures' 1-based block axis, alone and next to them."""

from __future__ import annotations

import statistics

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection

from attnflow.cli import main
from attnflow.plot import PlotError, plot_blocks, plot_blocks_with_probes, plot_probe_blocks, save_figure
from attnflow.probes.outputs import write_run_table
from plot_results import make_result

HEADS = ("cls", "avg", "abmilp", "abmilp+cls")


def top1(block: int, head: int, seed: int, lr: float = 0.1) -> float:
    """The made-up final top-1 of the test runs (distinct per block, head, seed and lr)."""
    return 40.0 + 3.0 * block + 10.0 * head + 0.7 * seed ** 2 + 100 * (lr - 0.1)


def run_table(blocks=(0, 1, 2, 3), seeds=(0, 1, 2), model: str = "m") -> pd.DataFrame:
    """A probe run of several blocks: two epochs (the first worse), and for abmilp an lr grid whose kept lr is 0.3
    in seed 0 and 0.1 in the others."""
    rows = []
    for b in blocks:
        for h, head in enumerate(HEADS):
            for s in seeds:
                for lr in ((0.1, 0.3) if head == "abmilp" else (0.1,)):
                    kept = lr == (0.3 if s == 0 else 0.1) if head == "abmilp" else True
                    for epoch in (1, 2):
                        value = top1(b, h, s, lr) - (5.0 if epoch == 1 else 0.0)
                        rows.append(dict(model=model, task="cub", block=b, head=head, lr=lr, seed=s, epoch=epoch,
                                         top1=value, top5=np.nan, train_loss=1.0, holdout_top1=np.nan,
                                         holdout_loss=np.nan, selected=kept))
    return pd.DataFrame(rows)


def expected(block: int, head: str) -> tuple[float, float]:
    """By hand: mean and std (ddof 1) over the seeds of the final top-1 at the kept lr."""
    h = HEADS.index(head)
    values = [top1(block, h, s, 0.3 if head == "abmilp" and s == 0 else 0.1) for s in (0, 1, 2)]
    return statistics.mean(values), statistics.stdev(values)


def lines(ax) -> dict:
    return {line.get_gid(): line for line in ax.get_lines()}


def test_probe_lines_are_the_tables_mean_top1_per_block_on_1_based_blocks(tmp_path):
    write_run_table(run_table(), {"model_info": {"random_init": False}}, tmp_path / "run")
    ax = plot_probe_blocks(tmp_path / "run")  # read as `attnflow plot --probes` reads it
    drawn = lines(ax)
    assert list(drawn) == ["m:cls", "m:avg", "m:abmilp"]  # the default heads, in this order; abmilp+cls left out
    for head in ("cls", "avg", "abmilp"):
        x, y = drawn[f"m:{head}"].get_data()
        assert list(x) == [1, 2, 3, 4]
        np.testing.assert_allclose(y, [expected(b, head)[0] for b in range(4)], rtol=0, atol=1e-9)
    bands = {c.get_gid(): c for c in ax.collections if isinstance(c, PolyCollection)}
    lo_hi = bands["band:m:abmilp"].get_paths()[0].vertices[:, 1]
    mean, std = expected(2, "abmilp")
    assert np.isclose(lo_hi, mean - std).any() and np.isclose(lo_hi, mean + std).any()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "3", "4"]
    assert ax.get_xlim() == (0.5, 4.5) and ax.get_xlabel() == "block" and ax.get_ylabel() == "top-1 [%]"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["[cls]", "avg. pooling", "AbMILP"]
    assert not [t for t in ax.texts if t.get_gid() == "banner"]
    best = plot_probe_blocks(run_table(), heads=["abmilp+cls"], value="best", band="none")
    x, y = lines(best)["m:abmilp+cls"].get_data()
    np.testing.assert_allclose(y, [expected(b, "abmilp+cls")[0] for b in range(4)])  # epoch 2 is also the best
    save_figure(best.figure, tmp_path / "probe.pdf")
    assert (tmp_path / "probe.pdf").stat().st_size > 0


def test_probe_panel_sits_next_to_the_statistics_on_the_same_block_axis():
    stats = make_result({"m": {"family": "MIM"}, "other": {"family": "JEA"}}, n_blocks=6)
    fig = plot_blocks_with_probes(stats, run_table(blocks=(1, 4, 5)), ["cls_self", "patch_patch_entropy"],
                                  models=["m"])
    assert len(fig.axes) == 3 and fig.axes[2].get_title() == "probe accuracy"
    reference = plot_blocks(stats, "cls_self", models=["m"], band="none")
    for ax in fig.axes:
        assert ax.get_xlim() == reference.get_xlim() == (0.5, 6.5)
        assert [t.get_text() for t in ax.get_xticklabels()] == [t.get_text() for t in reference.get_xticklabels()]
    np.testing.assert_allclose(lines(fig.axes[0])["m"].get_ydata(), lines(reference)["m"].get_ydata())
    x, y = lines(fig.axes[2])["m:avg"].get_data()
    assert list(x) == [2, 5, 6]
    np.testing.assert_allclose(y, [expected(b, "avg")[0] for b in (1, 4, 5)])
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert {"[cls] probe", "avg. pooling probe", "AbMILP probe"} <= set(legend)
    with pytest.raises(PlotError, match="none of the models other is in the probe runs"):
        plot_blocks_with_probes(stats, run_table(), ["cls_self"], models=["other"])


def test_probe_plots_refuse_what_they_cannot_draw():
    with pytest.raises(PlotError, match="record no block"):
        plot_probe_blocks(run_table().drop(columns="block"))
    with pytest.raises(PlotError, match="none of the heads ap1"):
        plot_probe_blocks(run_table(), heads=["ap1"])
    with pytest.raises(PlotError, match="model 'x' is not in the probe runs"):
        plot_probe_blocks(run_table(), models=["x"])


def test_plot_command_draws_probes_alone_and_next_to_statistics(tmp_path, capsys):
    write_run_table(run_table(blocks=(0, 1, 2)), {"model_info": {"random_init": True}}, tmp_path / "run")
    make_result({"m": {"family": "MIM"}}).write(tmp_path / "stats.parquet")
    assert main(["plot", "--probes", str(tmp_path / "run"), "--out", str(tmp_path / "alone.png")]) == 0
    assert main(["plot", str(tmp_path / "stats.parquet"), "--probes", str(tmp_path / "run"), "--metric",
                 "cls_patch_entropy", "--probe-heads", "cls,abmilp", "--out", str(tmp_path / "two.pdf")]) == 0
    assert (tmp_path / "alone.png").stat().st_size > 0 and (tmp_path / "two.pdf").stat().st_size > 0
    assert [t for t in plot_probe_blocks(tmp_path / "run").texts if t.get_gid() == "banner"]  # random weights
    capsys.readouterr()
    assert main(["plot", "--out", str(tmp_path / "x.png")]) == 2
    assert "nothing to plot" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "stats.parquet"), "--probes", str(tmp_path / "run"), "--by-size",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "leave out --probes" in capsys.readouterr().err
