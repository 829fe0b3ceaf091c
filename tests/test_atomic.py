"""Outputs are all-or-nothing (attnflow.atomic): a failed write or rename leaves the previous set of files, and two
runs never write one output at once."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

import attnflow.atomic as atomic
from attnflow.atomic import OutputBusyError, output_lock, write_atomically
from attnflow.cli import main
from attnflow.result import Result, write_table

TINY = ["--model", "vit_small_patch16_224", "--random-init", "--model-kw", "depth=2", "--model-kw", "embed_dim=32",
        "--model-kw", "num_heads=4", "--img-size", "64", "--workers", "0", "--no-progress"]


def _table(value: float) -> pd.DataFrame:
    return pd.DataFrame({"model": ["m"], "block": [0], "head": [0], "metric": ["cls_self"], "mean": [value],
                         "std": [0.0], "count": [1]})


@pytest.mark.parametrize("failing_rename", [1, 2, 3])
def test_a_failed_rename_leaves_the_previous_set(tmp_path, monkeypatch, failing_rename):
    path = write_table(tmp_path / "r.parquet", _table(1.0), {"run": "old"})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    calls, real = [], os.replace

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == failing_rename:
            raise OSError(28, "No space left on device")
        return real(src, dst)
    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="No space left"):
        write_table(path, _table(2.0), {"run": "new"})
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary or backup file left
    assert Result.read(path).frame["mean"].tolist() == [1.0]


def test_a_failed_figure_leaves_the_previous_figure(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    from attnflow.plot import save_figure

    fig = plt.figure()
    path = save_figure(fig, tmp_path / "f.pdf")
    before = path.read_bytes()

    def half_then_full_disk(self, fname, **kwargs):
        Path(fname).write_bytes(b"%PDF-1.4 half a")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Figure, "savefig", half_then_full_disk)
    with pytest.raises(OSError):
        save_figure(fig, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["f.pdf"]


def test_two_runs_on_one_output_the_second_is_refused_in_one_line(photo_folder, tmp_path, capsys):
    out = tmp_path / "o.parquet"
    with output_lock(out):
        with pytest.raises(OutputBusyError, match=f"process {os.getpid()}"):
            with output_lock(out):
                pass
        code = main(["stats", *TINY, "--data", str(photo_folder), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is being written by another run" in err
    assert not out.exists()
    assert main(["stats", *TINY, "--data", str(photo_folder), "--out", str(out)]) == 0  # the lock is released


@pytest.mark.parametrize("out,says", [(".", "is a folder"), ("/", "is a folder"), ("x.txt", "use x.parquet"),
                                      ("existing", "is a folder")])
def test_stats_out_must_name_a_table(photo_folder, tmp_path, monkeypatch, capsys, out, says):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "existing").mkdir()
    code = main(["stats", *TINY, "--data", str(photo_folder), "--out", out])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and says in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "photos"]  # nothing written


def test_write_atomically_writes_every_file_or_none(tmp_path):
    def fail(path: Path) -> None:
        path.write_text("half")
        raise RuntimeError("stop")
    with pytest.raises(RuntimeError):
        write_atomically({tmp_path / "a.txt": lambda p: p.write_text("a"), tmp_path / "b.txt": fail})
    assert list(tmp_path.iterdir()) == []
