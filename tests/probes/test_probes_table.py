"""`attnflow table` writes every promised format (Markdown, LaTeX, tidy CSV) atomically, orders heads by --heads
or the paper, uses the lr each run kept, and marks random-weight runs; probe run tables are written all or
nothing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from attnflow.cli import main
from attnflow.probes.outputs import TABLE_NAME, read_run_tables, write_run_table
from attnflow.probes.summary import RANDOM_NOTE, SUMMARY_COLUMNS, TABLE_ORDER, summarize


def write_run(root: Path, model: str, finals: dict[str, list[float]], *, random_init: bool = False,
              lrs: dict[str, list[float]] | None = None, selected: dict[str, list[float]] | None = None) -> None:
    """A stored run: per head and seed, top-1 at epochs 1 and 2 for every lr of ``lrs`` (default one lr, 0.4);
    ``finals[head][seed]`` is the final top-1 of the first lr, the others' are 30 points higher (so the
    validation set would pick them), and ``selected[head][seed]`` is the lr the run kept."""
    rows = []
    for head, per_seed in finals.items():
        for seed, top1 in enumerate(per_seed):
            for k, lr in enumerate((lrs or {}).get(head, [0.4])):
                kept = selected[head][seed] == lr if selected else k == 0
                for epoch, value in ((1, top1 - 5), (2, top1 + 30 * k)):
                    rows.append(dict(model=model, task="imagenet", head=head, lr=lr, seed=seed, epoch=epoch,
                                     top1=value, top5=99.0, train_loss=1.0, holdout_top1=float("nan"),
                                     holdout_loss=float("nan"), selected=kept))
    root.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(root / "results.parquet")
    (root / "results.json").write_text(json.dumps({"model_info": {"random_init": random_init},
                                                   "data": {"root": "/data/imagenet"}}))


@pytest.fixture()
def runs(tmp_path: Path) -> Path:
    write_run(tmp_path / "runs" / "mae", "mae-vit-b16", {"abmilp": [71.0, 71.5, 72.3], "cls": [67.0, 68.0, 69.0],
                                                        "ap1": [70.0, 70.0, 70.0], "avg": [65.0, 66.0, 66.5]})
    write_run(tmp_path / "runs" / "smoke", "dino-vit-b16", {"cls": [10.0], "avg": [12.0]}, random_init=True)
    return tmp_path / "runs"


def test_csv_is_the_tidy_summary_in_the_papers_head_order(runs, tmp_path):
    assert main(["table", str(runs), "--out", str(tmp_path / "t.csv")]) == 0
    csv = pd.read_csv(tmp_path / "t.csv")
    assert list(csv.columns) == list(SUMMARY_COLUMNS)
    mae = csv[csv["model"] == "mae-vit-b16"]
    assert mae["head"].tolist() == ["avg", "cls", "abmilp", "ap1"] == [h for h in TABLE_ORDER if h in set(mae["head"])]
    by_head = mae.set_index("head")
    assert by_head.loc["abmilp", "mean"] == pytest.approx((71.0 + 71.5 + 72.3) / 3)
    assert by_head.loc["abmilp", "std"] == pytest.approx(pd.Series([71.0, 71.5, 72.3]).std())
    assert by_head.loc["cls", "lr"] == 0.4 and (by_head["n_seeds"] == 3).all() and not by_head["random_init"].any()
    dino = csv[csv["model"] == "dino-vit-b16"]
    assert dino["head"].tolist() == ["avg", "cls"] and dino["random_init"].all() and dino["std"].isna().all()
    assert main(["table", str(runs), "--heads", "ap1,cls,avg", "--out", str(tmp_path / "h.csv")]) == 0
    ordered = pd.read_csv(tmp_path / "h.csv")
    assert ordered[ordered["model"] == "mae-vit-b16"]["head"].tolist() == ["ap1", "cls", "avg"]


def test_latex_is_a_booktabs_tabular_with_the_numbers_and_the_dagger(runs, tmp_path):
    assert main(["table", str(runs), "--heads", "abmilp,cls", "--out", str(tmp_path / "t.tex")]) == 0
    lines = (tmp_path / "t.tex").read_text().splitlines()
    assert lines[:2] == [r"\begin{tabular}{lcc}", r"\toprule"] and lines[-1] == r"\end{tabular}"
    assert lines[2] == r"Model & abmilp & cls \\" and lines[3] == r"\midrule"
    rows = {line.split(" & ")[0]: line for line in lines[4:] if line.endswith(r"\\") and " & " in line}
    mae = next(v for k, v in rows.items() if "MAE" in k or "mae" in k)
    assert mae.count(" & ") == 2 and r"\textbf{71.6 $\pm$ 0.7}" in mae and r"68.0 $\pm$ 1.0" in mae
    dino_label = next(k for k in rows if "DINO" in k or "dino" in k)
    assert dino_label.endswith(r"$^\dagger$") and rows[dino_label].split(" & ")[1] == "--"  # no abmilp run
    assert lines[-3] == r"\bottomrule"
    assert lines[-2] == rf"\multicolumn{{3}}{{l}}{{\footnotesize $^\dagger$ {RANDOM_NOTE}}} \\"
    assert lines.count(r"\toprule") == lines.count(r"\midrule") == lines.count(r"\bottomrule") == 1


def test_markdown_marks_random_weights_and_follows_heads(runs, tmp_path, capsys):
    for out in ("t.md", "t.markdown"):
        assert main(["table", str(runs), "--out", str(tmp_path / out)]) == 0
        text = (tmp_path / out).read_text().splitlines()
        assert text[0] == "| Model | avg | cls | abmilp | ap1 |"
        dino = next(line for line in text if "DINO" in line or "dino" in line)
        mae = next(line for line in text if "MAE" in line or "mae" in line)
        assert dino.split(" | ")[0].endswith(" †") and "†" not in mae
        assert text[-1] == f"† {RANDOM_NOTE}"
    capsys.readouterr()
    assert main(["table", str(runs / "mae")]) == 0  # printed; no random run, no footnote
    printed = capsys.readouterr().out
    assert "†" not in printed and RANDOM_NOTE not in printed


def test_the_kept_lr_is_used_not_the_best_on_val(tmp_path):
    # grid 0.1 / 1.0; the 1.0 rows are 30 points higher on val, but held-out data chose 0.1 for seeds 0 and 2
    write_run(tmp_path / "chosen", "mae-vit-b16", {"abmilp": [60.0, 62.0, 64.0], "cls": [50.0, 52.0, 54.0]},
              lrs={"abmilp": [0.1, 1.0], "cls": [0.1, 1.0]},
              selected={"abmilp": [0.1, 1.0, 0.1], "cls": [0.1, 0.1, 0.1]})
    summary = summarize(read_run_tables([tmp_path / "chosen"])).set_index("head")
    assert summary.loc["abmilp", "mean"] == pytest.approx((60.0 + (62.0 + 30) + 64.0) / 3)  # each seed's choice
    assert math.isnan(summary.loc["abmilp", "lr"])  # the seeds kept different lrs
    assert summary.loc["cls", "mean"] == pytest.approx(52.0) and summary.loc["cls", "lr"] == 0.1
    # a grid no held-out split chose (old tables, paper presets with a grid): the best mean, as before
    old = read_run_tables([tmp_path / "chosen"]).assign(selected=False)
    legacy = summarize(old).set_index("head")
    assert legacy.loc["cls", "lr"] == 1.0 and legacy.loc["cls", "mean"] == pytest.approx(52.0 + 30)
    every = summarize(read_run_tables([tmp_path / "chosen"]), lr="all")
    assert every["head"].tolist() == ["cls@lr=0.1", "cls@lr=1", "abmilp@lr=0.1", "abmilp@lr=1"]


def test_table_writes_are_atomic(runs, tmp_path, monkeypatch):
    target = tmp_path / "t.csv"
    target.write_text("previous table\n")
    real = pd.DataFrame.to_csv

    def half_then_fail(self, path, *args, **kwargs):
        Path(path).write_text("model,task\nhalf")  # a disk that fills up mid-write
        raise OSError("No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_fail)
    assert main(["table", str(runs), "--out", str(target)]) == 1  # one line (the CLI's OSError report), exit 1
    assert target.read_text() == "previous table\n" and sorted(p.name for p in tmp_path.iterdir()) == ["runs", "t.csv"]
    monkeypatch.setattr(pd.DataFrame, "to_csv", real)
    assert main(["table", str(runs), "--out", str(target)]) == 0 and target.read_text().startswith("model,task")


def test_run_table_is_written_all_or_nothing(tmp_path, monkeypatch):
    out = tmp_path / "run"
    first = pd.DataFrame({"head": ["cls"], "seed": [0], "epoch": [1], "top1": [50.0]})
    write_run_table(first, {"n": 1}, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == [f"{TABLE_NAME}.csv", f"{TABLE_NAME}.json", f"{TABLE_NAME}.parquet"]

    def fail(self, path, *args, **kwargs):
        Path(path).write_bytes(b"PAR1 half")
        raise OSError("No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", fail)
    with pytest.raises(OSError):
        write_run_table(first.assign(top1=99.0), {"n": 2}, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the csv and json were not replaced either


@pytest.mark.parametrize("name,content,message", [
    ("results.parquet", b"PAR1 a download cut short", "not a readable probe result table (ArrowInvalid"),
    ("results.csv", b"head,seed\n\x00\xff\xfe\x81 binary\n", "not a readable probe result table (UnicodeDecodeError"),
    ("results.csv", b"", "not a readable probe result table (EmptyDataError"),
    ("results.csv", b"head,seed,epoch,top1\ncls,0,1,abc\n", "its top1 column is not numeric (e.g. 'abc')"),
    ("results.csv", b"head,seed,epoch,top1\ncls,0,1,n/a\n", "its top1 column holds no number"),
])
def test_a_corrupt_run_table_is_one_line(tmp_path, capsys, name, content, message):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / name).write_bytes(content)
    assert main(["table", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and name in err and len(err.splitlines()) == 1, err


def test_heads_of_several_blocks_are_kept_apart_in_block_order(tmp_path):
    """A several-block run (blocks 9 and 10) and two one-block runs of another model (blocks 2 and 11): per block
    its own mean; `head@block=B` columns in numeric block order; by_block gives the per-block rows."""
    def block_rows(model: str, block: int, offset: float) -> pd.DataFrame:
        rows = [dict(model=model, task="cub", block=block, head=head, lr=0.4, seed=seed, epoch=2,
                     top1=offset + 10 * h + seed, selected=True)
                for h, head in enumerate(("cls", "abmilp")) for seed in (0, 1)]
        return pd.DataFrame(rows)

    write_run_table(pd.concat([block_rows("mae", 10, 50.0), block_rows("mae", 9, 40.0)]), {}, tmp_path / "both")
    write_run_table(block_rows("dino", 2, 20.0), {}, tmp_path / "b2")
    write_run_table(block_rows("dino", 11, 30.0), {}, tmp_path / "b11")
    frame = read_run_tables([tmp_path])
    table = summarize(frame).set_index(["model", "head"])["mean"]
    assert list(table.loc["mae"].index) == ["cls@block=9", "cls@block=10", "abmilp@block=9", "abmilp@block=10"]
    assert table[("mae", "abmilp@block=10")] == 50.0 + 10 + 0.5 and table[("mae", "cls@block=9")] == 40.5
    assert table[("dino", "cls@block=2")] == 20.5 and table[("dino", "abmilp@block=11")] == 40.5
    per_block = summarize(frame, by_block=True)
    assert list(per_block.columns) == ["model", "task", "block", *SUMMARY_COLUMNS[2:]]
    mae = per_block[per_block["model"] == "mae"]
    assert mae[["block", "head"]].values.tolist() == [[9, "cls"], [9, "abmilp"], [10, "cls"], [10, "abmilp"]]
    assert mae["mean"].tolist() == [40.5, 50.5, 50.5, 60.5]
    one_block = summarize(read_run_tables([tmp_path / "b2"]))  # one block: the heads keep their names
    assert one_block["head"].tolist() == ["cls", "abmilp"]
