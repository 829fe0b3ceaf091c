"""Ground-truth box files in their real formats, written here in miniature: the ILSVRC XML folder and archive,
Kaggle's LOC_val_solution.csv, wsolevaluation's metadata and a plain CSV; one error line for each bad file."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest

from attnflow.errors import AttnflowError
from attnflow.localize.boxes import BoxFileError, read_boxes
from attnflow.localize.data import SizeCheck, gt_boxes, match_images

# three images: two objects on the first, one on the second, none on the third (a real ILSVRC case: some
# val XMLs list the image without an object only in other tasks; here it exercises the "listed" set)
TRUTH = {
    "ILSVRC2012_val_00000001": ((500, 375), [(111, 108, 441, 193), (20, 30, 40, 50)]),
    "ILSVRC2012_val_00000002": ((500, 333), [(45, 49, 499, 162)]),
}
EMPTY = "ILSVRC2012_val_00000003"

XML = """<annotation>
	<folder>val</folder>
	<filename>{name}</filename>
	<source>
		<database>ILSVRC_2012</database>
	</source>
	<size>
		<width>{w}</width>
		<height>{h}</height>
		<depth>3</depth>
	</size>
	<segmented>0</segmented>
{objects}</annotation>
"""
OBJECT = """	<object>
		<name>n01751748</name>
		<pose>Unspecified</pose>
		<truncated>0</truncated>
		<difficult>0</difficult>
		<bndbox>
			<xmin>{}</xmin>
			<ymin>{}</ymin>
			<xmax>{}</xmax>
			<ymax>{}</ymax>
		</bndbox>
	</object>
"""


def write_xml_folder(root: Path) -> Path:
    val = root / "val"
    val.mkdir(parents=True)
    for name, ((w, h), boxes) in TRUTH.items():
        objects = "".join(OBJECT.format(*b) for b in boxes)
        (val / f"{name}.xml").write_text(XML.format(name=name, w=w, h=h, objects=objects))
    (val / f"{EMPTY}.xml").write_text(XML.format(name=EMPTY, w=10, h=10, objects=""))
    return root


def write_kaggle(path: Path) -> Path:
    rows = ["ImageId,PredictionString"]
    for name, (_, boxes) in TRUTH.items():
        rows.append(f"{name}," + "".join(f"n01751748 {x1} {y1} {x2} {y2} " for x1, y1, x2, y2 in boxes))
    path.write_text("\n".join(rows) + "\n")
    return path


def write_wsol(folder: Path) -> Path:
    folder.mkdir(parents=True)
    ids = [f"val/{n}.JPEG" for n in [*TRUTH, EMPTY]]
    (folder / "image_ids.txt").write_text("\n".join(ids) + "\n")
    (folder / "image_sizes.txt").write_text("".join(f"val/{n}.JPEG,{w},{h}\n" for n, ((w, h), _) in TRUTH.items()))
    (folder / "localization.txt").write_text("".join(f"val/{n}.JPEG,{x1},{y1},{x2},{y2}\n"
                                                     for n, (_, bs) in TRUTH.items() for x1, y1, x2, y2 in bs))
    return folder


def write_csv(path: Path, header: str | None = "path,x1,y1,x2,y2", sizes: bool = False) -> Path:
    lines = [header + (",width,height" if sizes else "")] if header else []
    for name, ((w, h), boxes) in TRUTH.items():
        lines += [f"{name}.JPEG,{x1},{y1},{x2},{y2}" + (f",{w},{h}" if sizes else "") for x1, y1, x2, y2 in boxes]
    path.write_text("\n".join(lines) + "\n")
    return path


def check_boxes(truth, with_sizes: bool) -> None:
    assert len(truth) == 2 and truth.n_boxes == 3
    for name, ((w, h), boxes) in TRUTH.items():
        key = truth.key_for(Path(f"/data/val/{name}.JPEG"), "/data/val")
        assert key is not None
        np.testing.assert_array_equal(truth.boxes[key], np.array(boxes, dtype=float))
        assert truth.size_of(key) == ((w, h) if with_sizes else None)
    assert truth.key_for(Path("/data/val/ILSVRC2012_val_00000004.JPEG"), "/data/val") is None


def test_xml_folder_and_archive(tmp_path):
    root = write_xml_folder(tmp_path / "bbox")
    for path in (root, root / "val"):
        truth = read_boxes(path)
        assert truth.format == "xml" and truth.listed == {EMPTY}
        check_boxes(truth, with_sizes=True)
    archive = tmp_path / "ILSVRC2012_bbox_val_v3.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / "val", arcname="val")
    truth = read_boxes(archive)
    assert truth.format == "xml"
    check_boxes(truth, with_sizes=True)


def test_one_xml_file(tmp_path):
    """One annotation file (detected by its .xml name or its leading '<', or forced) gives its own boxes."""
    (name, ((w, h), boxes)), = [(k, v) for k, v in TRUTH.items() if len(v[1]) > 1][:1]
    text = XML.format(name=name, w=w, h=h, objects="".join(OBJECT.format(*b) for b in boxes))
    (tmp_path / f"{name}.xml").write_text(text)
    (tmp_path / "annotation.txt").write_text(text)
    for path, fmt in ((tmp_path / f"{name}.xml", "auto"), (tmp_path / f"{name}.xml", "xml"),
                      (tmp_path / "annotation.txt", "auto")):
        truth = read_boxes(path, fmt)
        key = name if path.suffix == ".xml" else "annotation"
        assert truth.format == "xml" and list(truth.boxes) == [key]
        np.testing.assert_array_equal(truth.boxes[key], np.asarray(boxes, dtype=np.float64))
        assert truth.size_of(key) == (w, h)


def test_kaggle_wsol_and_csv(tmp_path):
    truth = read_boxes(write_kaggle(tmp_path / "LOC_val_solution.csv"))
    assert truth.format == "kaggle"
    check_boxes(truth, with_sizes=False)
    folder = write_wsol(tmp_path / "metadata" / "ILSVRC" / "test")
    for path in (folder, folder / "localization.txt"):
        truth = read_boxes(path)
        assert truth.format == "wsol" and truth.listed == {f"val/{EMPTY}.JPEG"}
        check_boxes(truth, with_sizes=True)
    for header in ("path,x1,y1,x2,y2", "path,xmin,ymin,xmax,ymax", "path,x0,y0,x1,y1", None):
        truth = read_boxes(write_csv(tmp_path / "b.csv", header))
        assert truth.format == "csv"
        check_boxes(truth, with_sizes=False)
    check_boxes(read_boxes(write_csv(tmp_path / "s.csv", sizes=True)), with_sizes=True)


def test_matching_by_relative_path_name_and_stem(tmp_path):
    (tmp_path / "b.csv").write_text("a/cat.jpg,1,1,5,5\nb/cat.jpg,2,2,6,6\nb/dog.png,0,0,3,3\n")
    truth = read_boxes(tmp_path / "b.csv")
    root = Path("/imgs")
    assert truth.key_for(root / "a" / "cat.jpg", root) == "a/cat.jpg"
    assert truth.key_for(root / "b" / "cat.jpg", root) == "b/cat.jpg"
    assert truth.key_for(root / "c" / "cat.jpg", root) is None          # two cat.jpg: the name is ambiguous
    assert truth.key_for(root / "c" / "dog.png", root) == "b/dog.png"   # a unique file name
    assert truth.key_for(root / "dog.JPEG", root) == "b/dog.png"        # a unique stem


def test_gt_boxes_are_scaled_by_the_stated_size(tmp_path):
    truth = read_boxes(write_wsol(tmp_path / "meta"))
    key = "val/ILSVRC2012_val_00000001.JPEG"
    check = SizeCheck()
    # the image on disk was resized to 250x188 before the run: the file's 500x375 still gives the scale
    boxes = gt_boxes(truth, key, (250, 188), (224, 224), check, "x")
    np.testing.assert_array_equal(boxes, [[49, 64, 197, 115], [8, 17, 17, 29]])
    assert check.differ == 1 and check.aspect == 0
    gt_boxes(truth, key, (300, 300), (224, 224), check, "y")
    assert check.differ == 2 and check.aspect == 1
    csv_truth = read_boxes(write_csv(tmp_path / "c.csv"))                # no sizes: the decoded size
    np.testing.assert_array_equal(gt_boxes(csv_truth, "ILSVRC2012_val_00000002.JPEG", (500, 333), (224, 224)),
                                  [[int(45 * 224 / 500), int(49 * 224 / 333), int(499 * 224 / 500),
                                    int(162 * 224 / 333)]])


def test_images_without_boxes_are_counted(photo_folder, tmp_path):
    (tmp_path / "b.csv").write_text("ILSVRC2012_val_00000001.JPEG,1,1,5,5\nILSVRC2012_val_00000003.JPEG,1,1,5,5\n")
    matched = match_images(photo_folder, read_boxes(tmp_path / "b.csv"))
    assert [p.name for p in matched.paths] == ["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000003.JPEG"]
    assert len(matched.without_boxes) == matched.n_found - 2 > 0


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and isinstance(err.value, AttnflowError)
    return text


@pytest.mark.parametrize("name, content, expected", [
    ("LOC_val_solution.csv", "ImageId,PredictionString\nILSVRC2012_val_00000001,n01751748 1 2 3\n",
     "line 2: PredictionString has 4 fields; expected groups of 5"),
    ("LOC_val_solution.csv", "ImageId,PredictionString\nILSVRC2012_val_00000001,n01751748 1 2 x 4\n",
     "line 2: x2 'x' is not a number"),
    ("b.csv", "a.jpg,1,2,3\n", "line 1: expected 'path,x1,y1,x2,y2'"),
    ("b.csv", "path,left,top,right,bottom\na.jpg,1,2,3,4\n", "line 1: unknown header"),
    ("b.csv", "path,x1,y1,x2,y2\na.jpg,1,2,3,4\nb.jpg,9,2,3,4\n", "line 3: box (9, 2, 3, 4) has x2 < x1"),
    ("b.csv", "a.jpg,-1,2,3,4\n", "line 1: negative coordinate"),
    ("b.csv", "\n\n", "empty boxes file"),
    ("localization.txt", "val/a.JPEG,val/a_mask.png,val/a_ignore.png\n", "line 1: 'path,mask,ignore' is a mask"),
    ("localization.txt", "val/a.JPEG,1,2,3\n", "line 1: expected 'path,x0,y0,x1,y1'"),
])
def test_bad_files_give_one_line_naming_the_file(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(BoxFileError) as err:
        read_boxes(path)
    text = one_line(err)
    assert str(path) in text and expected in text


def test_bad_folders_archives_and_xml(tmp_path):
    with pytest.raises(BoxFileError, match="no such boxes file") as err:
        read_boxes(tmp_path / "nothing")
    one_line(err)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BoxFileError, match="must hold ILSVRC .xml annotations") as err:
        read_boxes(tmp_path / "empty")
    one_line(err)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "ILSVRC2012_val_00000001.xml").write_text("<annotation><object><bndbox><xmin>1</xmin>")
    with pytest.raises(BoxFileError, match="not a PASCAL-VOC annotation") as err:
        read_boxes(tmp_path / "x")
    assert "ILSVRC2012_val_00000001.xml" in one_line(err)
    (tmp_path / "x" / "ILSVRC2012_val_00000001.xml").write_text(
        "<annotation><object><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax></bndbox></object></annotation>")
    with pytest.raises(BoxFileError, match="<ymax> is missing"):
        read_boxes(tmp_path / "x")
    (tmp_path / "fake.tgz").write_bytes(b"not an archive")
    with pytest.raises(BoxFileError, match="not a readable tar archive") as err:
        read_boxes(tmp_path / "fake.tgz")
    one_line(err)
    long_line = "a.jpg," + ",".join(["1"] * 200)
    (tmp_path / "long.csv").write_text(long_line + "\n")
    with pytest.raises(BoxFileError, match="line 1: expected 'path,x1,y1,x2,y2'") as err:
        read_boxes(tmp_path / "long.csv")
    text = one_line(err)
    assert text.endswith("...'") and len(text) < len(str(tmp_path / "long.csv")) + 200  # the line is cut short
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(BoxFileError, match="not a text file"):
        read_boxes(tmp_path / "binary.csv")
    with pytest.raises(BoxFileError, match="unknown boxes format 'voc'"):
        read_boxes(tmp_path / "binary.csv", format="voc")


def test_fingerprint_follows_the_boxes_not_their_order(tmp_path):
    from attnflow.localize import read_boxes

    a, b, c = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    a.write_text("path,x1,y1,x2,y2\nx/1.jpg,1,2,30,40\nx/2.jpg,5,5,9,9\nx/2.jpg,0,0,3,3\n")
    b.write_text("path,x1,y1,x2,y2\nx/2.jpg,0,0,3,3\nx/1.jpg,1,2,30,40\nx/2.jpg,5,5,9,9\n")  # other row order
    c.write_text("path,x1,y1,x2,y2\nx/1.jpg,1,2,30,41\nx/2.jpg,5,5,9,9\nx/2.jpg,0,0,3,3\n")
    digests = [read_boxes(p).fingerprint() for p in (a, b, c)]
    assert digests[0] == digests[1] != digests[2] and len(digests[0]) == 16
