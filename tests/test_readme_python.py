"""Every Python block of README.md and docs/*.md runs as written, with only what cannot exist offline substituted:
tiny random weights for downloaded checkpoints (and for full-size random models, to keep this fast), a folder of
real photos for ImageNet-val, a small boxes file; the relative paths the blocks read (``attnflow-demo/photos``,
``photos/``, a saved head under ``runs/``) are made in a temporary working directory."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = "depth=2, embed_dim=32, num_heads=4"
"""What a substitution adds to a full-size model: a tiny one of the same architecture (patch 16, 224 px)."""

HEAD = "runs/probe-mae/seed0/heads/abmilp.pt"
"""The head file the docs load: an (untrained) AbMILP head of the tiny MAE, saved there before the blocks run."""


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def tiny(call: str) -> str:
    """``attnflow.load_model("x", ...)`` -> the same call building a tiny random model."""
    return re.sub(r",? ?checkpoint=\"[^\"]+\"", ", random_init=True", call)[:-1] + f", {TINY})"


@dataclass
class Page:
    """What a page's Python blocks need: how many there are, the offline substitutions (doc text -> stand-in; each
    must still be in the page) and what the page's comments promise (checked on the blocks' namespace)."""

    blocks: int
    substitutions: dict[str, str] = field(default_factory=dict)
    check: Callable[[dict[str, Any], Path, Path], None] = lambda env, cwd, photos: None


def _check_readme(env: dict[str, Any], cwd: Path, photos: Path) -> None:
    n_photos = len(list(photos.iterdir()))
    assert list(env["df"].columns) == ["model", "block", "head", "metric", "mean", "std", "count"]
    assert env["result"].meta["images_used"] == n_photos
    assert {p.name for p in (cwd / "runs").iterdir()} >= {f"mae-python.{e}" for e in ("parquet", "csv", "json")}
    assert list(env["result"].per_block("cls_patch_entropy")["block"]) == [0, 1]  # 0-based blocks
    assert [tuple(m.shape) for m in env["maps"]] == [(2, 4, 197, 197)] * 2  # [B, H, N, N] per block
    assert env["tap"].layout.grid == (14, 14) and env["tap"].layout.num_prefix == 1


def _check_metrics(env: dict[str, Any], cwd: Path, photos: Path) -> None:
    assert env["both"].models == ["run-a", "run-b"]
    assert env["a"].meta["images_used"] == env["b"].meta["images_used"] == 8
    torch.testing.assert_close(torch.tensor(env["a"].frame["mean"].to_numpy()),
                               torch.tensor(env["b"].frame["mean"].to_numpy()), equal_nan=True)
    assert list(env["entropy"].columns) == ["model", "block", "value"] and len(env["entropy"]) == 4


def _check_figures(env: dict[str, Any], cwd: Path, photos: Path) -> None:
    assert (cwd / "figs" / "metrics.pdf").stat().st_size > 0
    maps = env["maps"]
    assert len(maps) == 2 and maps[0].cls_mean.shape == (14, 14) and 0 <= maps[0].min_entropy_head < 4
    assert maps[0].rollout.shape == (14, 14) and abs(maps[0].rollout.sum() - 1) < 1e-12
    assert tuple(env["weights"].shape) == (2, 14, 14)
    torch.testing.assert_close(env["weights"].sum((1, 2)), torch.ones(2))


def _check_models(env: dict[str, Any], cwd: Path, photos: Path) -> None:
    assert env["record"].preset == "dino-vit-s16" and len(env["names"]) == 22 and "dino-vit-s16" in env["names"]
    assert env["spec"].arch == "vit_small_patch16_224"


def _check_data(env: dict[str, Any], cwd: Path, photos: Path) -> None:
    assert len(env["photos"]) == 4 and env["photos"].classes == []


def _check_probes(env: dict[str, Any], cwd: Path, photos: Path) -> None:
    table = env["table"]
    assert list(table["head"]) == ["cls", "avg", "abmilp"] and (table["epoch"] == 10).all()
    assert table["selected"].all() and table["holdout_top1"].notna().all()  # one row per head, lr held-out chosen
    fit = env["fit"]
    assert len(fit.table) == 4 and not fit.table["selected"].any() and fit.table["holdout_top1"].isna().all()
    assert sorted(fit.history["epoch"].unique()) == [1, 2, 3, 4, 5] and len(fit.bank.entries) == 4


def _check_aggregation(env: dict[str, Any], cwd: Path, photos: Path) -> None:
    assert tuple(env["features"].shape) == (2, 32) and tuple(env["weights"].shape) == (2, 196)  # [B, D], [B, P]
    # reference:NAME gives the official dino feature: weights = the reference's [cls] -> patch attention / N, not
    # renormalised, so each image's weights sum to its [cls] -> patch mass over N (docs/official-code.md)
    mass = env["weights"].sum(1) * 196
    assert ((mass > 0) & (mass <= 1 + 1e-6)).all()
    agg = env["agg"].frame
    assert set(agg["metric"]) == {"entropy", "kld"} and (agg["count"] == len(list(photos.iterdir()))).all()
    assert "head:abmilp" in set(agg["source"]) and env["agg"].labels["head:abmilp"] == "AbMILP"


def _check_localization(env: dict[str, Any], cwd: Path, photos: Path) -> None:
    scores = env["loc"].max_box_acc_v2()
    assert set(scores) == {"cls_mean", "head:abmilp"} and all(0 <= v <= 100 for v in scores.values())
    assert env["loc"].frame["images"].unique().tolist() == [len(list(photos.iterdir()))]
    strict = env["strict"].frame
    assert set(strict["iou_threshold"].dropna()) == {50} and set(strict["source"]) == {"cls_mean"}


PAGES: dict[str, Page] = {
    "README.md": Page(1, {
        'attnflow.load_model("mae-vit-b16", random_init=True)': tiny('attnflow.load_model("mae-vit-b16", random_init=True)'),
    }, _check_readme),
    "docs/running.md": Page(1),
    "docs/metrics.md": Page(1, {
        'attnflow.load_model("vit_small_patch16_224", random_init=True)':
            tiny('attnflow.load_model("vit_small_patch16_224", random_init=True)'),
    }, _check_metrics),
    "docs/figures.md": Page(2, {
        'attnflow.load_model("vit_small_patch16_224", random_init=True)':
            tiny('attnflow.load_model("vit_small_patch16_224", random_init=True)'),
        'attnflow.load_model("mae-vit-b16", random_init=True)': tiny('attnflow.load_model("mae-vit-b16", random_init=True)'),
    }, _check_figures),
    "docs/models.md": Page(1, {
        'attnflow.load_model("dino-vit-s16", random_init=True, img_size=448)':
            tiny('attnflow.load_model("dino-vit-s16", random_init=True, img_size=448)'),
    }, _check_models),
    "docs/data.md": Page(1, {}, _check_data),
    "docs/probes.md": Page(1, {"epochs=30)": "epochs=10)"}, _check_probes),
    "docs/aggregation.md": Page(1, {
        'attnflow.load_model("mae-vit-b16", checkpoint="mae_pretrain_vit_base.pth")':
            tiny('attnflow.load_model("mae-vit-b16", checkpoint="mae_pretrain_vit_base.pth")'),
        'attnflow.load_model("dino-vit-b16", checkpoint="dino_vitbase16_pretrain.pth")':
            tiny('attnflow.load_model("dino-vit-b16", checkpoint="dino_vitbase16_pretrain.pth")').replace(
                TINY, "depth=1, embed_dim=48, num_heads=4"),
        'aggregation_statistics(mae, "/data/imagenet/val"': "aggregation_statistics(mae, PHOTOS",
    }, _check_aggregation),
    "docs/localization.md": Page(1, {
        'attnflow.load_model("mae-vit-b16", checkpoint="mae_pretrain_vit_base.pth")':
            tiny('attnflow.load_model("mae-vit-b16", checkpoint="mae_pretrain_vit_base.pth")'),
        'read_boxes("/data/imagenet/LOC_val_solution.csv")': "read_boxes(BOXES)",
        'localize(mae, "/data/imagenet/val", truth,': "localize(mae, PHOTOS, truth,",
    }, _check_localization),
}


def test_every_page_with_python_is_covered():
    """A new page, or a new block on a page, must come with its substitutions and checks here."""
    found = {p.relative_to(ROOT).as_posix(): len(python_blocks(p))
             for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if python_blocks(p)}
    assert found == {name: page.blocks for name, page in PAGES.items()}


def _workspace(cwd: Path, photos: Path) -> None:
    """The relative paths the blocks read: the demo's photo folder, ``photos/`` and a saved AbMILP head of the tiny
    MAE (what ``attnflow probe`` would have left)."""
    from attnflow.probes import save_head
    from attnflow.probes.heads import ProbeHead
    from attnflow.probes.specs import parse_head_spec

    shutil.copytree(photos, cwd / "attnflow-demo" / "photos")
    shutil.copytree(photos, cwd / "photos")
    torch.manual_seed(0)
    head = ProbeHead(parse_head_spec("abmilp"), 32, 3, True)
    (cwd / HEAD).parent.mkdir(parents=True)
    save_head(cwd / HEAD, head, meta={"model": "mae-vit-b16", "block": -1, "layernorm": False})


@pytest.mark.parametrize("name", list(PAGES))
def test_page_python_blocks_run(name, photo_folder, tmp_path, monkeypatch):
    page = PAGES[name]
    code = "\n".join(python_blocks(ROOT / name))
    for old, new in page.substitutions.items():
        assert old in code, f"{name} no longer has {old!r}: update this test"
        code = code.replace(old, new)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    _workspace(cwd, photo_folder)
    monkeypatch.chdir(cwd)
    monkeypatch.setattr("attnflow.options.default_workers", lambda: 0)  # no DataLoader processes: seconds count
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("".join(f"{p.name},10,10,100,100\n" for p in sorted(photo_folder.iterdir())))
    env: dict[str, Any] = {"PHOTOS": str(photo_folder), "BOXES": str(boxes), "__name__": "__docs__"}
    exec(compile(code, str(ROOT / name), "exec"), env)
    page.check(env, cwd, photo_folder)
