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


def test_read_names_the_file_for_every_kind_of_bad_input(tmp_path):
    from attnflow.errors import AttnflowError
    from attnflow.result import ResultNotFoundError

    good = Result(_frame("a"), {"model": "a"}).write(tmp_path / "run.parquet")
    with pytest.raises(ResultNotFoundError, match=r"did you mean run\.parquet") as missing:
        Result.read(tmp_path / "run")  # the name without its suffix
    assert isinstance(missing.value, FileNotFoundError)  # callers catching the builtin still do

    truncated = tmp_path / "cut.parquet"
    truncated.write_bytes(good.read_bytes()[:40])
    binary = tmp_path / "img.csv"
    binary.write_bytes(b"\xff\xd8\xff\xe0 not text")
    wrong_type = tmp_path / "typed.csv"
    frame = _frame("a").astype({"block": "string"})
    frame.loc[0, "block"] = "last"
    frame.to_csv(wrong_type, index=False)
    bad_sidecar = tmp_path / "side.parquet"
    bad_sidecar.write_bytes(good.read_bytes())
    bad_sidecar.with_suffix(".json").write_text("{not json")
    for path, phrase in [(truncated, "not a readable result table"), (binary, "not a readable result table"),
                         (wrong_type, "wrong type"), (bad_sidecar, "sidecar is not valid JSON"),
                         (tmp_path / "run.json", "a .parquet or .csv")]:
        with pytest.raises(AttnflowError, match=phrase) as err:
            Result.read(path)
        assert path.name in str(err.value) or path.with_suffix(".json").name in str(err.value)
