"""`verify_dataset` and `attnflow data verify` on tiny fake dataset trees with tiny manifests."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attnflow.cli import main
from attnflow.data.images import DataError
from attnflow.data.manifests import UnknownManifestError
from attnflow.data.verify import verify_dataset

A, B, C = "n01440764", "n01443537", "n01484850"
VAL_LABELS = [B, A, C, A, B, C]  # image i (1-based) has label VAL_LABELS[i - 1]


def val_name(i: int) -> str:
    return f"ILSVRC2012_val_{i:08d}.JPEG"


def jpeg_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).resize((40, 32)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpegs(photos: dict[str, np.ndarray]) -> list[bytes]:
    return [jpeg_bytes(photos[k]) for k in sorted(photos)]


def write_manifest(folder: Path, name: str, data: dict) -> Path:
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"schema": 1, "name": name, **data}))
    return path


@pytest.fixture()
def val_manifest(tmp_path: Path) -> Path:
    return write_manifest(tmp_path, "tiny-val", {
        "kind": "imagenet-val", "num_images": 6, "num_classes": 3,
        "file_pattern": "ILSVRC2012_val_{index:08d}.JPEG", "index_start": 1,
        "classes": {"wnids": [A, B, C]}, "labels": {"wnids": VAL_LABELS},
        "ground_truth_files": [{"name": "LOC_val_solution.csv"}]})


def make_damaged_flat_val(root: Path, jpegs: list[bytes]) -> None:
    """Images 1-6 minus 3 (missing), 5 truncated, 6 empty; two extra files and one known auxiliary file."""
    root.mkdir()
    for i in (1, 2, 4):
        (root / val_name(i)).write_bytes(jpegs[i])
    (root / val_name(5)).write_bytes(jpegs[5][: len(jpegs[5]) // 2])
    (root / val_name(6)).write_bytes(b"")
    (root / val_name(7)).write_bytes(jpegs[0])
    (root / "notes.jpg").write_bytes(jpegs[1])
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n")
    (root / ".DS_Store").write_bytes(b"x")


def test_flat_val_report_is_exact(tmp_path, val_manifest, jpegs):
    root = tmp_path / "val"
    make_damaged_flat_val(root, jpegs)
    report = verify_dataset(val_manifest, root, progress=False)
    assert report.layout == "flat"
    assert (report.expected, report.found, report.n_missing) == (6, 5, 1)
    assert report.missing == [val_name(3)]
    assert report.extra == [val_name(7), "notes.jpg"]
    assert [p for p, _ in report.corrupt] == [val_name(5), val_name(6)]
    assert "truncated" in report.corrupt[0][1]
    assert report.corrupt[1][1] == "empty file"
    assert report.decoded == 4  # images 1, 2, 4, 5: the empty file is flagged without decoding
    assert report.class_counts == {A: 2, B: 2, C: 1}  # present: 1 (B), 2 (A), 4 (A), 5 (B), 6 (C)
    assert report.class_mismatch == {C: (1, 2)}
    assert report.misplaced == [] and report.problems == []
    assert not report.ok


def test_no_decode_and_limit(tmp_path, val_manifest, jpegs):
    root = tmp_path / "val"
    make_damaged_flat_val(root, jpegs)
    fast = verify_dataset(val_manifest, root, check_images=False, progress=False)
    assert fast.corrupt == [(val_name(6), "empty file")] and fast.decoded == 0
    limited = verify_dataset(val_manifest, root, limit=2, progress=False)
    assert limited.decoded == 2


def make_class_folder_val(root: Path, jpegs: list[bytes], wrong_folder_for_4: bool) -> None:
    for i, wnid in enumerate(VAL_LABELS, start=1):
        folder = B if (i == 4 and wrong_folder_for_4) else wnid
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / val_name(i)).write_bytes(jpegs[i])


def test_class_folder_val_finds_misplaced_image(tmp_path, val_manifest, jpegs):
    root = tmp_path / "val"
    make_class_folder_val(root, jpegs, wrong_folder_for_4=True)
    report = verify_dataset(val_manifest, root, progress=False)
    assert report.layout == "class_folders"
    assert report.misplaced == [(f"{B}/{val_name(4)}", f"{A}/{val_name(4)}")]
    assert (report.found, report.n_missing, report.extra, report.corrupt) == (5, 0, [], [])
    assert report.decoded == 6 and not report.ok


def test_class_folder_val_clean_is_ok(tmp_path, val_manifest, jpegs):
    root = tmp_path / "val"
    make_class_folder_val(root, jpegs, wrong_folder_for_4=False)
    report = verify_dataset(val_manifest, root, progress=False)
    assert report.ok and report.found == 6 and report.class_counts == {A: 2, B: 2, C: 2}
    assert report.class_mismatch == {}


def test_mixed_layout_reports_the_minority_as_misplaced(tmp_path, val_manifest, jpegs):
    root = tmp_path / "val"
    root.mkdir()
    for i in (1, 3, 4, 5, 6):
        (root / val_name(i)).write_bytes(jpegs[i])
    (root / A).mkdir()
    (root / A / val_name(2)).write_bytes(jpegs[2])  # in its right class folder, but the layout is flat
    report = verify_dataset(val_manifest, root, check_images=False, progress=False)
    assert report.layout == "flat" and report.found == 5
    assert report.misplaced == [(f"{A}/{val_name(2)}", val_name(2))] and report.n_missing == 0


def test_parent_folder_with_val_subfolder_is_descended(tmp_path, val_manifest, jpegs):
    make_class_folder_val(tmp_path / "imagenet" / "val", jpegs, wrong_folder_for_4=False)
    report = verify_dataset(val_manifest, tmp_path / "imagenet", progress=False)
    assert report.ok and report.root == str(tmp_path / "imagenet" / "val")
    assert report.notes[0] == f"using {tmp_path / 'imagenet' / 'val'}"


# --- CLI -------------------------------------------------------------------------------------------------------


def test_cli_verify_exit_1_and_summary(tmp_path, val_manifest, jpegs, capsys):
    root = tmp_path / "val"
    make_damaged_flat_val(root, jpegs)
    assert main(["data", "verify", str(val_manifest), "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "found 5 / 6 expected images" in out
    assert f"1 missing: {val_name(3)}" in out
    assert f"2 extra: {val_name(7)}, notes.jpg" in out
    assert f"2 corrupt: {val_name(5)} (cannot decode" in out and f"{val_name(6)} (empty file)" in out
    assert "NOT OK" in out


def test_cli_verify_json(tmp_path, val_manifest, jpegs, capsys):
    root = tmp_path / "val"
    make_damaged_flat_val(root, jpegs)
    assert main(["data", "verify", str(val_manifest), "--root", str(root), "--no-decode", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["n_missing"] == 1 and data["decoded"] == 0
    assert data["corrupt"] == [[val_name(6), "empty file"]]


def test_cli_verify_exit_0_when_clean(tmp_path, val_manifest, jpegs, capsys):
    root = tmp_path / "val"
    make_class_folder_val(root, jpegs, wrong_folder_for_4=False)
    assert main(["data", "verify", str(val_manifest), "--root", str(root)]) == 0
    assert "OK: complete and clean" in capsys.readouterr().out


def test_cli_bad_usage_exit_2(tmp_path, capsys):
    assert main(["data", "verify", "imagenet-vall", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean imagenet-val" in err
    assert main(["data", "verify", "imagenet-val", "--root", str(tmp_path / "nope")]) == 2
    assert "nope: no such folder (the root of imagenet-val)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["data", "verify", "imagenet-val"])  # --root is required
    assert exc.value.code == 2
    assert main(["data"]) == 2


def test_cli_list(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(lines) >= {"imagenet-val", "imagenet-train", "imagenet-1pct", "imagenet-10pct", "cub-200-2011"}
    assert "50,000" in lines["imagenet-val"] and "11,788" in lines["cub-200-2011"]


def test_unknown_manifest_error():
    with pytest.raises(UnknownManifestError, match="did you mean cub-200-2011"):
        verify_dataset("cub-200", ".")


# --- ImageNet-train, subsets, CUB ------------------------------------------------------------------------------


def test_train_report(tmp_path, jpegs):
    manifest = write_manifest(tmp_path, "tiny-train", {
        "kind": "imagenet-train", "num_images": 5, "num_classes": 3, "classes": {"wnids": [A, B, C]}})
    root = tmp_path / "train"
    for rel, data in [(f"{A}/{A}_1.JPEG", jpegs[0]), (f"{A}/{A}_22.JPEG", jpegs[1]), (f"{B}/{B}_3.JPEG", b""),
                      (f"{A}/photo.JPEG", jpegs[2]), (f"{B}/{A}_9.JPEG", jpegs[3]), ("readme.txt", b"hi")]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    report = verify_dataset(manifest, root, progress=False)
    assert (report.found, report.n_missing, report.missing) == (3, 2, [])
    assert report.extra == [f"{A}/photo.JPEG", f"{B}/{A}_9.JPEG", "readme.txt"]
    assert report.corrupt == [(f"{B}/{B}_3.JPEG", "empty file")]
    assert report.class_counts == {A: 2, B: 1} and report.class_mismatch == {C: (0, None)}
    assert report.problems == ["1 of 3 class folders are missing or empty"]
    assert report.decoded == 2 and not report.ok


def test_subset_report(tmp_path, jpegs):
    (tmp_path / "split.txt").write_text(f"{A}_1.JPEG\n{B}_2.JPEG\n\n{C}_7.JPEG\n")
    manifest = write_manifest(tmp_path, "tiny-subset", {
        "kind": "imagenet-subset", "num_images": 3, "num_classes": 3, "classes": {"wnids": [A, B, C]},
        "split_file": {"file": "split.txt"}})
    root = tmp_path / "train"
    for rel in (f"{A}/{A}_1.JPEG", f"{B}/{B}_2.JPEG", f"{B}/{B}_5.JPEG"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(jpegs[0])
    report = verify_dataset(manifest, root, progress=False)
    assert report.missing == [f"{C}/{C}_7.JPEG"] and report.found == 2 and report.extra == []
    assert report.class_mismatch == {C: (0, 1)} and report.problems == [] and not report.ok


def test_subset_without_shipped_split_needs_split_file(tmp_path, capsys):
    with pytest.raises(DataError, match="--split-file"):
        verify_dataset("imagenet-10pct", tmp_path, progress=False)
    assert main(["data", "verify", "imagenet-10pct", "--root", str(tmp_path)]) == 2
    assert "--split-file" in capsys.readouterr().err


def test_shipped_1pct_split_file_against_empty_train_root(tmp_path):
    (tmp_path / A).mkdir()
    report = verify_dataset("imagenet-1pct", tmp_path, progress=False)
    assert report.expected == 12811 and report.n_missing == 12811 and report.found == 0
    lines = (Path(__file__).parents[2] / "data_manifests" / "imagenet_1percent.txt").read_text().split()
    assert report.missing == sorted(f"{line.split('_')[0]}/{line}" for line in lines)
    assert report.missing[0] == "n01440764/n01440764_10040.JPEG"


CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]


def write_cub(root: Path, jpegs: list[bytes], *, damaged: bool) -> None:
    """6 images, 2 per class; damaged: image 4 missing, image 6 labelled class 1, an extra file in images/."""
    rels = [f"{CUB_CLASSES[k // 2]}/{CUB_CLASSES[k // 2].split('.')[1]}_{k:04d}.jpg" for k in range(6)]
    for k, rel in enumerate(rels):
        if damaged and k == 3:
            continue
        (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "images" / rel).write_bytes(jpegs[k])
    if damaged:
        (root / "images" / CUB_CLASSES[0] / "stray.jpg").write_bytes(jpegs[0])
    (root / "images.txt").write_text("".join(f"{k + 1} {rel}\n" for k, rel in enumerate(rels)))
    (root / "train_test_split.txt").write_text("1 1\n2 0\n3 1\n4 0\n5 1\n6 0\n")
    labels = [1, 1, 2, 2, 3, 1 if damaged else 3]
    (root / "image_class_labels.txt").write_text("".join(f"{k + 1} {c}\n" for k, c in enumerate(labels)))
    (root / "classes.txt").write_text("".join(f"{k + 1} {c}\n" for k, c in enumerate(CUB_CLASSES)))


@pytest.fixture()
def cub_manifest(tmp_path: Path) -> Path:
    return write_manifest(tmp_path, "tiny-cub", {
        "kind": "cub", "num_images": 6, "num_classes": 3, "num_train": 3, "num_test": 3,
        "folder": "CUB_200_2011", "classes": {"folders": CUB_CLASSES}})


def test_cub_clean_from_parent_folder(tmp_path, jpegs, cub_manifest):
    write_cub(tmp_path / "data" / "CUB_200_2011", jpegs, damaged=False)
    report = verify_dataset(cub_manifest, tmp_path / "data", progress=False)
    assert report.ok, report.summary()
    assert report.root == str(tmp_path / "data" / "CUB_200_2011") and report.found == 6
    assert report.class_counts == {c: 2 for c in CUB_CLASSES}


def test_cub_damaged_report(tmp_path, jpegs, cub_manifest):
    root = tmp_path / "CUB_200_2011"
    write_cub(root, jpegs, damaged=True)
    report = verify_dataset(cub_manifest, root, progress=False)
    assert report.missing == [f"images/{CUB_CLASSES[1]}/Laysan_Albatross_0003.jpg"]
    assert report.extra == [f"images/{CUB_CLASSES[0]}/stray.jpg"]
    assert report.problems == ["1 images whose class id in image_class_labels.txt disagrees with their folder "
                               "(first ids: 6)"]
    assert report.class_mismatch == {CUB_CLASSES[1]: (1, 2)}


def test_cub_missing_index_files(tmp_path, cub_manifest):
    (tmp_path / "images").mkdir()
    report = verify_dataset(cub_manifest, tmp_path, progress=False)
    assert report.problems == ["missing index file(s): images.txt, train_test_split.txt, image_class_labels.txt, "
                               "classes.txt"]
    assert report.n_missing == 6 and not report.ok


def test_real_cub_manifest_flags_wrong_totals(tmp_path, jpegs):
    write_cub(tmp_path, jpegs, damaged=False)
    report = verify_dataset("cub-200-2011", tmp_path, check_images=False, progress=False)
    assert "images.txt lists 6 images, expected 11,788" in report.problems
    assert "train/test split has 3/3 images, expected 5,994/5,794" in report.problems
    assert any(p.startswith("classes.txt differs from the manifest's 200 classes") for p in report.problems)


# --- names that differ only in case; --split-file where it does not apply ----------------------------------------


def test_name_differing_only_in_case_or_jpg_is_reported_as_such(tmp_path, val_manifest, jpegs, capsys):
    root = tmp_path / "val"
    root.mkdir()
    for i in (1, 3, 4, 6):
        (root / val_name(i)).write_bytes(jpegs[i])
    jpg = val_name(5).replace(".JPEG", ".jpg")  # ILSVRC2012_val_00000005.jpg
    lower = val_name(2).lower()  # ilsvrc2012_val_00000002.jpeg
    (root / jpg).write_bytes(jpegs[5])
    (root / lower).write_bytes(jpegs[2])
    (root / "ILSVRC2012_val_00000007.jpg").write_bytes(jpegs[0])  # not in the manifest (6 images): extra
    report = verify_dataset(val_manifest, root, progress=False)
    assert report.spelled_differently == [(jpg, val_name(5)), (lower, val_name(2))]  # sorted by found path
    assert report.missing == [] and report.n_missing == 0
    assert report.extra == ["ILSVRC2012_val_00000007.jpg"]
    assert report.found == 4 and report.decoded == 6  # the differently spelled files are decoded too
    assert not report.ok
    assert main(["data", "verify", str(val_manifest), "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert (f"2 names differ from the manifest only in case or .jpg/.jpeg (rename to the expected names): "
            f"{jpg} (expected {val_name(5)}), {lower} (expected {val_name(2)})") in out
    assert "missing" not in out and "1 extra: ILSVRC2012_val_00000007.jpg" in out


def test_case_differences_in_class_folders(tmp_path, val_manifest, jpegs):
    root = tmp_path / "val"
    make_class_folder_val(root, jpegs, wrong_folder_for_4=False)
    src = root / VAL_LABELS[1] / val_name(2)
    src.rename(src.with_name(val_name(2).upper()))  # ILSVRC2012_VAL_00000002.JPEG
    report = verify_dataset(val_manifest, root, check_images=False, progress=False)
    assert report.spelled_differently == [(f"{A}/{val_name(2).upper()}", f"{A}/{val_name(2)}")]
    assert (report.n_missing, report.extra, report.misplaced) == (0, [], [])


@pytest.mark.parametrize("name", ["imagenet-val", "imagenet-train", "cub-200-2011"])
def test_split_file_where_it_does_not_apply_is_an_error(tmp_path, capsys, name):
    split = tmp_path / "split.txt"
    split.write_text(f"{A}_1.JPEG\n")
    with pytest.raises(DataError, match="imagenet-10pct, imagenet-1pct"):
        verify_dataset(name, tmp_path, split_file=split, progress=False)
    assert main(["data", "verify", name, "--root", str(tmp_path), "--split-file", str(split)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"split_file does not apply to {name}" in err, err
