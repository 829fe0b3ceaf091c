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


@pytest.mark.parametrize("column,value,message", [
    ("block", 1_000_000_000, "block must be a whole number in 0..4095, got 1000000000"),  # a plot: 1e9 ticks
    ("block", 1.5, "block must be a whole number in 0..4095, got 1.5"),  # read as block 1 before
    ("block", -1, "block must be a whole number in 0..4095, got -1"),
    ("head", -2, "head must be a whole number in 0..4095, got -2"),
    ("mean", np.inf, "mean must be a finite number or NaN (missing), got inf"),
    ("std", -0.5, "std must be a finite number or NaN (missing) >= 0, got -0.5"),
    ("count", -3, "count must be a whole number >= 0, got -3"),
])
def test_values_no_run_writes_are_refused_naming_column_value_and_row(tmp_path, column, value, message):
    frame = _frame("a")
    frame[column] = frame[column].astype(float if isinstance(value, float) else frame[column].dtype)
    frame.loc[4, column] = value
    with pytest.raises(ValueError) as err:
        Result(frame)
    assert f"{message} (row 5 of 12)" in str(err.value)
    frame.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(ValueError) as err:
        Result.read(tmp_path / "t.csv")
    assert f"t.csv: result table: {message}" in str(err.value)


@pytest.mark.parametrize("sidecar,message", [
    ("[1, 2]", "it holds a JSON list, not an object"),
    ('{"runs": 5}', "runs must be a list of objects, got 5"),
    ('{"runs": [1]}', "runs must be a list of objects, got [1]"),
    ('{"model": "a", "n_patches": "abc"}', "n_patches must be a positive integer, got 'abc'"),
    ('{"model": "a", "n_patches": -3}', "n_patches must be a positive integer, got -3"),
    ('{"model": "a", "family": ["vit"]}', "family must be text, got ['vit']"),
    ('{"model": "a", "random_init": "no"}', "random_init must be true or false, got 'no'"),
    ('{"model": "a", "grid": [14]}', "grid must be a pair of positive integers, got [14]"),
    ('{"runs": [{"model": "a", "img_size": [224, 0]}]}', "runs[0].img_size must be a positive integer or a pair"),
])
def test_a_malformed_sidecar_is_one_line_naming_the_key(tmp_path, capsys, sidecar, message):
    from attnflow.cli import main

    path = Result(_frame("a"), {"model": "a"}).write(tmp_path / "r.parquet")
    path.with_suffix(".json").write_text(sidecar)
    with pytest.raises(ValueError) as err:
        Result.read(path)
    assert str(err.value).startswith(f"{path.with_suffix('.json')}: a malformed provenance sidecar: {message}")
    assert main(["plot", str(path), "--out", str(tmp_path / "p.png")]) == 2
    out = capsys.readouterr().err.strip()
    assert message in out and len(out.splitlines()) == 1, out
