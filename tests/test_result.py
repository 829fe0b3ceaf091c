import numpy as np
import pandas as pd
import pytest

from attnflow.result import COLUMNS, Result


def _frame(model: str) -> pd.DataFrame:
    rows = [(model, b, h, m, float(b + h), 0.1, 10) for b in range(2) for h in range(3)
            for m in ("cls_self", "patch_self")]
    return pd.DataFrame(rows, columns=COLUMNS)


def test_write_read_roundtrip(tmp_path):
    res = Result(_frame("a"), {"model": "a", "images_used": 10, "img_size": (224, 224)})
    path = res.write(tmp_path / "run.parquet")
    assert path.exists() and path.with_suffix(".csv").exists() and path.with_suffix(".json").exists()
    back = Result.read(path)
    pd.testing.assert_frame_equal(back.frame, res.frame)
    assert back.meta["images_used"] == 10 and back.meta["img_size"] == [224, 224]
    back_csv = Result.read(path.with_suffix(".csv"))
    pd.testing.assert_frame_equal(back_csv.frame, res.frame)


def test_concat_and_per_block():
    res = Result.concat([Result(_frame("a"), {"model": "a"}), Result(_frame("b"), {"model": "b"})])
    assert res.models == ["a", "b"]
    assert res.run_meta("b") == {"model": "b"}
    per = res.per_block("cls_self")
    # mean over heads 0,1,2 of (block + head) = block + 1
    np.testing.assert_allclose(per[per.model == "a"]["value"].to_numpy(), [1.0, 2.0])


def test_missing_columns_rejected():
    with pytest.raises(ValueError, match="lacks columns"):
        Result(pd.DataFrame({"model": ["a"]}))


def test_a_failed_write_leaves_the_previous_files_whole(tmp_path, monkeypatch):
    import errno

    old = Result(_frame("old"), {"model": "old"})
    path = old.write(tmp_path / "run.parquet")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def disk_full(self, target, *args, **kwargs):
        open(target, "wb").write(b"PAR1 half a table")  # what a full disk leaves behind
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", disk_full)
    with pytest.raises(OSError, match="No space"):
        Result(_frame("new"), {"model": "new"}).write(path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp file, nothing truncated
    monkeypatch.undo()
    assert set(Result.read(path).frame["model"]) == {"old"}
