"""`attnflow plot` and `attnflow maps` end to end on files the tests write (tiny random-init models)."""

from __future__ import annotations

from pathlib import Path

import pytest

from attnflow.cli import main
from plot_results import FAMILIES, make_result

TINY_KW = ["--model-kw", "depth=2", "--model-kw", "embed_dim=32", "--model-kw", "num_heads=4"]


@pytest.fixture()
def runs(tmp_path: Path) -> Path:
    folder = tmp_path / "runs"
    make_result({"mim": FAMILIES["mim"]}).write(folder / "mim.parquet")
    make_result({"jea": FAMILIES["jea"], "ft": FAMILIES["ft"]}).write(folder / "two.parquet")
    return folder


def _png(path: Path) -> bool:
    return path.exists() and path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 2000


def test_plot_one_metric_from_files(runs, tmp_path, capsys):
    out = tmp_path / "figs" / "fig4.pdf"
    rc = main(["plot", str(runs / "mim.parquet"), str(runs / "two.parquet"), "--metric", "cls_patch_entropy",
               "--band", "images", "--out", str(out)])
    assert rc == 0
    assert out.read_bytes()[:5] == b"%PDF-" and out.stat().st_size > 3000
    assert f"wrote {out}" in capsys.readouterr().out


def test_plot_folder_all_metrics_per_head_and_by_size(runs, tmp_path, capsys):
    out = tmp_path / "all.png"
    assert main(["plot", str(runs), "--all", "--per-head", "--band", "none", "--dpi", "60", "--out", str(out)]) == 0
    assert _png(out)
    for metric in ("cls_self", "cls_patch_entropy", "patch_self", "patch_patch_entropy"):
        assert _png(tmp_path / f"all-heads-{metric}.png")
    grid = tmp_path / "grid.svg"
    assert main(["plot", str(runs), "--by-size", "--metric", "cls_self", "--model", "ft", "--out", str(grid)]) == 0
    assert grid.read_text().lstrip().startswith("<?xml")


@pytest.mark.parametrize("argv,message", [
    (["--metric", "cls_entropy"], "did you mean cls_patch_entropy"),
    (["--model", "jae"], "did you mean jea"),
    (["--out", "fig.gif"], "use one of"),
    (["--width", "wide"], "--width"),
])
def test_plot_bad_input_is_one_line_exit_2(runs, tmp_path, capsys, argv, message):
    args = ["plot", str(runs), "--out", str(tmp_path / "x.png")] + argv
    if "--out" in argv:
        args = ["plot", str(runs)] + argv
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_plot_missing_or_unreadable_result(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "x.png")]) == 2
    assert "no such result" in capsys.readouterr().err
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    assert main(["plot", str(bad), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "not a readable result table" in err and "cannot read a result" not in err  # no double wrapping
    assert len(err.strip().splitlines()) == 1


def test_maps_end_to_end_on_tiny_random_models(photo_folder, tmp_path, capsys):
    out = tmp_path / "maps" / "maps.png"
    rc = main(["maps", "--model", "vit_small_patch16_224", "--model", "deit_small_distilled_patch16_224",
               "--images", str(photo_folder), "--limit", "2", "--random-init", "--img-size", "64", *TINY_KW,
               "--per-head", "--dpi", "60", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "RANDOM-INIT" in printed
    assert _png(out)
    assert _png(out.with_name("maps-heads-vit_small_patch16_224.png"))
    assert _png(out.with_name("maps-heads-deit_small_distilled_patch16_224.png"))


def test_maps_bad_input(photo_folder, tmp_path, capsys):
    base = ["maps", "--images", str(photo_folder), "--random-init", "--img-size", "64", *TINY_KW,
            "--out", str(tmp_path / "m.png")]
    assert main(base + ["--model", "vit_small_patch16_224", "--kind", "cls_max"]) == 2
    assert "unknown map kind" in capsys.readouterr().err
    assert main(base + ["--model", "vit_small_patch16_224", "--checkpoint", "a.pth", "--checkpoint", "b.pth"]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["maps", "--model", "vit_small_patch16_224", "--images", str(empty), "--out",
                 str(tmp_path / "m.png")]) == 2
    assert "no image files" in capsys.readouterr().err


def test_maps_random_banner_is_a_red_title_and_a_missing_block_one_line(photo_folder, tmp_path, capsys,
                                                                          monkeypatch):
    import matplotlib.colors

    import attnflow.plot.style

    saved = []
    real = attnflow.plot.style.save_figure
    monkeypatch.setattr(attnflow.plot.style, "save_figure", lambda fig, path, **kw: saved.append(fig) or
                        real(fig, path, **kw))
    base = ["maps", "--model", "vit_small_patch16_224", "--images", str(photo_folder), "--limit", "1",
            "--random-init", "--img-size", "64", *TINY_KW, "--dpi", "60", "--out", str(tmp_path / "m.png")]
    assert main(base) == 0
    title = saved[0]._suptitle  # noqa: SLF001
    assert "RANDOM-INIT" in title.get_text()
    assert matplotlib.colors.to_hex(title.get_color()) == "#c00000" and title.get_fontweight() == "bold"
    capsys.readouterr()
    assert main(base + ["--block", "2"]) == 2  # TINY has 2 blocks: 0, 1 (or -1, -2)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "block 2 does not exist" in err


def test_maps_skips_corrupt_empty_and_oversized_images(photos, tmp_path, monkeypatch, caplog):
    """Every unreadable kind is skipped with its reason, and the readable images are kept in order."""
    from PIL import Image

    from attnflow.data.images import load_images

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(photos["rocket"]).resize((40, 40)).save(folder / "a_good.png")
    Image.fromarray(photos["chelsea"]).resize((100, 100)).save(folder / "b_huge.png")  # 10,000 px
    (folder / "c_empty.jpg").write_bytes(b"")
    (folder / "d_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    Image.fromarray(photos["coffee"]).resize((30, 20)).save(folder / "e_good.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses images over twice this many pixels
    with caplog.at_level("WARNING"):
        paths, images = load_images(folder, None)
    assert [p.name for p in paths] == ["a_good.png", "e_good.jpg"]
    assert [im.size for im in images] == [(40, 40), (30, 20)]
    text = caplog.text
    assert "b_huge.png: too large" in text and "c_empty.jpg: empty file" in text and "d_corrupt.jpg" in text


def test_maps_replaces_an_unreadable_chosen_image_by_the_next_readable_one(photos, tmp_path):
    from PIL import Image

    from attnflow.data.images import load_images

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(photos["rocket"]).resize((20 + i, 20)).save(folder / f"{i}.png")
    (folder / "0.png").write_bytes(b"not a png")  # evenly spaced choice of 2 out of 5: files 0 and 4
    paths, images = load_images(folder, 2)
    assert [p.name for p in paths] == ["1.png", "4.png"] and [im.size for im in images] == [(21, 20), (24, 20)]
