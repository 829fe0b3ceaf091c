"""``attnflow run`` on tiny configs: compute once, reuse, invalidate, resume, render the listed figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import attnflow.stats
from attnflow.cli import main
from attnflow.models.load import load_model, sha256_file
from attnflow.result import Result
from attnflow.runner import load_config
from attnflow.runner.figures import output_files

TINY_KW = "{depth = 2, embed_dim = 32, num_heads = 4, mlp_ratio = 2.0}"
from conftest import TINY
from interrupts import fail_at_step
from brute_force import block_attention_by_hand


@pytest.fixture()
def env(offline, monkeypatch) -> Path:
    """Empty, offline weight caches; no sockets; the working directory is the test's tmp_path."""
    monkeypatch.chdir(offline)
    return offline


@pytest.fixture()
def calls(monkeypatch) -> list[str]:
    """Model names attention_stats was called with (it still runs)."""
    seen: list[str] = []
    real = attnflow.stats.attention_stats

    def counting(model, data, **kwargs):
        seen.append(kwargs["model_name"])
        return real(model, data, **kwargs)

    monkeypatch.setattr(attnflow.stats, "attention_stats", counting)
    return seen


def mae_checkpoint(path: Path, seed: int) -> Path:
    """A tiny MAE-format file ``{'model': state_dict}`` with seeded random values."""
    model = load_model("mae-vit-b16", random_init=True, img_size=64, **TINY)
    gen = torch.Generator().manual_seed(seed)
    torch.save({"model": {k: torch.randn(v.shape, generator=gen) * 0.5 for k, v in model.state_dict().items()}},
               path)
    return path


def write_config(folder: Path, photos: Path, *, extra_models: str = "", figures: str | None = None,
                 checkpoint: Path | None = None, data_extra: str = "") -> Path:
    ckpt = f'checkpoint = "{checkpoint}"' if checkpoint else "random_init = true"
    figures = figures if figures is not None else """
[[figures]]
name = "set"
kind = "set"
formats = ["png"]
per_head = true

[[figures]]
name = "fig4"
kind = "metric"
metrics = ["cls_patch_entropy"]

[[figures]]
name = "maps"
kind = "maps"
limit = 2
"""
    text = f"""
name = "tiny"
run_dir = "runs/tiny"

[data]
root = "{photos}"
img_size = 64
batch_size = 3
workers = 0
{data_extra}

[defaults]
model_kw = {TINY_KW}

[[models]]
name = "vit_small_patch16_224"
id = "tiny-rand"
random_init = true
label = "tiny random"
family = "JEA"

[[models]]
name = "mae-vit-b16"
{ckpt}
{extra_models}
{figures}
"""
    path = folder / "tiny.toml"
    path.write_text(text)
    return path


def run(capsys, *args: str) -> tuple[int, str]:
    code = main(["run", *args, "--no-progress"])
    return code, capsys.readouterr().out


def status(out: str) -> dict[str, str]:
    """``{model id: "compute" | "reuse"}`` from the printed plan."""
    found = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("compute", "reuse", "maps", "skip"):
            found[parts[1]] = parts[0]
    return found


# ------------------------------------------------------------------------------------------------ tests

def test_computes_once_then_reuses_and_writes_every_listed_figure(env, photo_folder, calls, capsys):
    cfg_path = write_config(env, photo_folder, checkpoint=mae_checkpoint(env / "mae.pth", 0))
    code, out = run(capsys, str(cfg_path))
    assert code == 0 and status(out) == {"tiny-rand": "compute", "mae-vit-b16": "compute"}
    assert sorted(calls) == ["mae-vit-b16", "tiny-rand"]
    cfg = load_config(cfg_path)
    listed = [p for f in cfg.figures for p in output_files(f, cfg.figures_dir)]
    assert len(listed) == 1 + 4 + 4 + 2 + 1  # set: metrics, 4 metrics, 4 heads; fig4 pdf+png; maps png
    for path in listed:
        assert path.is_file() and path.stat().st_size > 1000, path
        assert f"wrote {path}" in out
    first = {p.name: p.stat().st_mtime_ns for p in (env / "runs/tiny/stats").glob("*.parquet")}

    code, out = run(capsys, str(cfg_path))
    assert code == 0 and status(out) == {"tiny-rand": "reuse", "mae-vit-b16": "reuse"}
    assert len(calls) == 2  # attention_stats was not called again
    assert {p.name: p.stat().st_mtime_ns for p in (env / "runs/tiny/stats").glob("*.parquet")} == first
    assert "done: 0 computed, 2 reused" in out
    for path in listed:
        assert path.is_file()


def test_stored_result_is_what_a_direct_run_gives(env, photo_folder, calls, capsys):
    """The runner passes the config's checkpoint, resolution and limit through: compare with a direct run."""
    ckpt = mae_checkpoint(env / "mae.pth", 0)
    cfg_path = write_config(env, photo_folder, checkpoint=ckpt, figures="")
    assert run(capsys, str(cfg_path), "--limit", "4")[0] == 0
    stored = next(p for p in (env / "runs/tiny/stats").glob("mae-vit-b16-*.parquet"))
    got = Result.read(stored)
    model = load_model("mae-vit-b16", checkpoint=ckpt, img_size=64, **TINY)
    want = attnflow.stats.attention_stats(model, photo_folder, batch_size=3, workers=0, img_size=64, limit=4,
                                            model_name="mae-vit-b16", progress=False)
    np.testing.assert_allclose(got.frame["mean"], want.frame["mean"], rtol=1e-12, equal_nan=True)
    key = got.meta["analysis_key"]
    assert got.meta["images_used"] == 4 and key["limit"] == 4 and key["img_size"] == 64
    assert key["weights"] == f"sha256:{sha256_file(ckpt)}" and got.meta["checkpoint_sha256"] == sha256_file(ckpt)
    assert key["n_files"] == len(list(photo_folder.iterdir()))


def test_limit_and_checkpoint_changes_invalidate_only_what_they_touch(env, photo_folder, calls, capsys):
    ckpt = mae_checkpoint(env / "mae.pth", 0)
    cfg_path = write_config(env, photo_folder, checkpoint=ckpt, figures="")
    assert status(run(capsys, str(cfg_path))[1]) == {"tiny-rand": "compute", "mae-vit-b16": "compute"}
    # a different limit is a different question: both computed, the full runs are kept
    assert status(run(capsys, str(cfg_path), "--limit", "3")[1]) == {"tiny-rand": "compute", "mae-vit-b16": "compute"}
    assert status(run(capsys, str(cfg_path))[1]) == {"tiny-rand": "reuse", "mae-vit-b16": "reuse"}
    assert status(run(capsys, str(cfg_path), "--limit", "3")[1]) == {"tiny-rand": "reuse", "mae-vit-b16": "reuse"}
    # a limit that covers the whole folder is the same question as no limit
    n = len(list(photo_folder.iterdir()))
    assert status(run(capsys, str(cfg_path), "--limit", str(n + 5))[1]) == {"tiny-rand": "reuse",
                                                                           "mae-vit-b16": "reuse"}
    assert len(calls) == 4
    # new weights in the same file: only that model is recomputed
    mae_checkpoint(ckpt, 1)
    assert status(run(capsys, str(cfg_path))[1]) == {"tiny-rand": "reuse", "mae-vit-b16": "compute"}
    assert calls[4:] == ["mae-vit-b16"]
    # random weights never match real ones (and the random model's own result is reused)
    assert status(run(capsys, str(cfg_path), "--random-init")[1]) == {"tiny-rand": "reuse", "mae-vit-b16": "compute"}
    assert status(run(capsys, str(cfg_path), "--random-init")[1]) == {"tiny-rand": "reuse", "mae-vit-b16": "reuse"}
    assert status(run(capsys, str(cfg_path))[1]) == {"tiny-rand": "reuse", "mae-vit-b16": "reuse"}
    assert len(calls) == 6
    metas = [json.loads(p.read_text()) for p in (env / "runs/tiny/stats").glob("mae-vit-b16-*.json")]
    assert sorted(m["analysis_key"]["weights"][:7] for m in metas) == ["random-"] + ["sha256:"] * 3
    # the first file's weights again (new mtime, same bytes): its stored run is found again
    mae_checkpoint(ckpt, 0)
    assert status(run(capsys, str(cfg_path))[1]) == {"tiny-rand": "reuse", "mae-vit-b16": "reuse"}
    assert len(calls) == 6


def test_decode_path_is_part_of_the_question(env, photo_folder, calls, capsys):
    """A result of one decode path never answers another; a sidecar from before the option (no ``decode`` in its
    key) answers the PIL path it was computed with, under its old file name."""
    from attnflow.runner.cache import RunKey

    cfg_path = write_config(env, photo_folder, figures="")
    both = ("tiny-rand", "mae-vit-b16")
    assert status(run(capsys, str(cfg_path), "--decode", "pil")[1]) == dict.fromkeys(both, "compute")
    assert status(run(capsys, str(cfg_path))[1]) == dict.fromkeys(both, "compute")  # auto: fast
    assert status(run(capsys, str(cfg_path), "--decode", "fast")[1]) == dict.fromkeys(both, "reuse")
    assert len(calls) == 4
    sides = sorted((env / "runs/tiny/stats").glob("tiny-rand-*.json"))
    keys = {json.loads(p.read_text())["analysis_key"]["decode"]: p for p in sides}
    assert sorted(keys) == ["fast", "pil"]
    # the PIL result keeps the name a key without decode had; dropping decode from its sidecar (an old run
    # directory) still answers --decode pil, and not the default
    old_key = {k: v for k, v in json.loads(keys["pil"].read_text())["analysis_key"].items() if k != "decode"}
    assert keys["pil"].stem.endswith(RunKey(**old_key).digest)
    meta = json.loads(keys["pil"].read_text())
    meta["analysis_key"] = old_key
    keys["pil"].write_text(json.dumps(meta))
    keys["fast"].unlink()
    assert status(run(capsys, str(cfg_path), "--decode", "pil")[1])["tiny-rand"] == "reuse"
    assert status(run(capsys, str(cfg_path))[1])["tiny-rand"] == "compute"


def test_dry_run_computes_and_writes_nothing(env, photo_folder, calls, capsys):
    cfg_path = write_config(env, photo_folder)
    code, out = run(capsys, str(cfg_path), "--dry-run")
    assert code == 0 and out.count("would compute") == 2 and not calls
    assert "set-metrics.png" in out and "maps.png" in out
    assert not (env / "runs").exists()


def test_official_weights_from_the_cache_then_missing_reuse_unchecked(env, photo_folder, calls, capsys):
    """Weights found in the torch hub cache are hashed; when they are gone, stored official runs still match."""
    cache = env / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    official = mae_checkpoint(cache / "mae_pretrain_vit_base.pth", 0)
    cfg_path = write_config(env, photo_folder, figures="")
    text = cfg_path.read_text().replace('name = "mae-vit-b16"\nrandom_init = true', 'name = "mae-vit-b16"')
    cfg_path.write_text(text)
    out = run(capsys, str(cfg_path))[1]
    assert status(out)["mae-vit-b16"] == "compute" and "official weights mae_pretrain_vit_base.pth" in out
    stored = json.loads(next((env / "runs/tiny/stats").glob("mae-vit-b16-*.json")).read_text())
    assert stored["analysis_key"]["weights"] == f"sha256:{sha256_file(official)}"
    official.unlink()
    out = run(capsys, str(cfg_path))[1]
    assert status(out)["mae-vit-b16"] == "reuse" and "sha256 not checked" in out
    mae_checkpoint(official, 1)  # different official file: recompute
    assert status(run(capsys, str(cfg_path))[1])["mae-vit-b16"] == "compute"


def test_reuse_without_the_data_folder(env, photo_folder, calls, capsys):
    """Figures re-render from stored results when the data is gone; computing without data asks for a data root."""
    cfg_path = write_config(env, photo_folder, figures='[[figures]]\nname = "p"\nkind = "panel"\nformats = ["png"]\n')
    assert run(capsys, str(cfg_path))[0] == 0
    moved = photo_folder.rename(photo_folder.with_name("elsewhere"))
    code, out = run(capsys, str(cfg_path))
    assert code == 0 and status(out) == {"tiny-rand": "reuse", "mae-vit-b16": "reuse"} and "not found" in out
    assert len(calls) == 2
    code = main(["run", str(cfg_path), "--limit", "2"])
    err = capsys.readouterr().err
    assert code == 2 and str(photo_folder) in err and err.count("\n") == 1
    assert "give a data root (the config's data.root)" in err
    assert moved.exists()


def test_interrupted_run_resumes_to_the_same_numbers(env, photo_folder, monkeypatch, capsys):
    cfg_path = write_config(env, photo_folder, figures='[[figures]]\nname = "p"\nkind = "panel"\nmodels = ["mae-vit-b16"]\n'
                            'formats = ["png"]\n', data_extra="checkpoint_every = 1")

    with monkeypatch.context() as patch:
        fail_at_step(patch, 3)  # two whole batches, then Ctrl-C
        assert main(["run", str(cfg_path), "--no-progress"]) == 130
    capsys.readouterr()
    states = list((env / "runs/tiny/stats").glob("*.state.pt"))
    assert len(states) == 1 and states[0].name.startswith("mae-vit-b16-")
    assert not list((env / "runs/tiny/stats").glob("*.parquet"))

    code, out = run(capsys, str(cfg_path))
    assert code == 0 and "resuming an interrupted run" in out and not states[0].exists()
    resumed = Result.read(next((env / "runs/tiny/stats").glob("mae-vit-b16-*.parquet")))
    assert resumed.meta["resumed"] and resumed.meta["images_used"] == len(list(photo_folder.iterdir()))

    code, out = run(capsys, str(cfg_path), "--run-dir", "runs/fresh")
    fresh = Result.read(next((env / "runs/fresh/stats").glob("mae-vit-b16-*.parquet")))
    assert not fresh.meta["resumed"]
    np.testing.assert_allclose(resumed.frame["mean"], fresh.frame["mean"], rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(resumed.frame["std"], fresh.frame["std"], rtol=1e-9, equal_nan=True)


def test_only_models_a_statistics_figure_uses_are_computed(env, photo_folder, calls, capsys):
    figures = ('[[figures]]\nname = "p"\nkind = "metric"\nmetrics = ["cls_self"]\nmodels = ["tiny-rand"]\n'
               'formats = ["png"]\n[[figures]]\nname = "m"\nkind = "maps"\nmodels = ["mae-vit-b16"]\nlimit = 1\n')
    cfg_path = write_config(env, photo_folder, figures=figures)
    code, out = run(capsys, str(cfg_path))
    assert code == 0 and status(out) == {"tiny-rand": "compute", "mae-vit-b16": "maps"}
    assert calls == ["tiny-rand"]
    assert (env / "runs/tiny/figures/p.png").is_file() and (env / "runs/tiny/figures/m.png").is_file()
    assert "RANDOM-INIT" in out


def test_maps_figure_draws_the_configured_block(env, photo_folder, monkeypatch, capsys):
    """``block = 0`` in a maps figure: its [cls] maps are those of the first block, not the last; ``kinds`` may name
    ``rollout``, the published rollout (Abnar & Zuidema) of blocks 0..0."""
    import importlib

    from attnflow.data.images import load_images
    from attnflow.data.transforms import eval_transform
    from attnflow.runner.execute import load_entry

    execute_mod = importlib.import_module("attnflow.runner.execute")  # the package exports a function of that name
    drawn = {}
    real = execute_mod.render_figures

    def recording(plan, results, maps):
        drawn.update(maps)
        return real(plan, results, maps)

    monkeypatch.setattr(execute_mod, "render_figures", recording)
    figures = ('[[figures]]\nname = "m0"\nkind = "maps"\nmodels = ["tiny-rand"]\nlimit = 1\nblock = 0\n'
               'kinds = ["cls_mean", "rollout"]\n')
    cfg_path = write_config(env, photo_folder, figures=figures)
    code, out = run(capsys, str(cfg_path))
    assert code == 0 and status(out)["tiny-rand"] == "maps"
    got = drawn["m0"].maps["tiny-rand"][0]

    cfg = load_config(cfg_path)
    model = load_entry(cfg.model("tiny-rand"), 64)
    _, images = load_images(photo_folder, 1)
    x = eval_transform(model, img_size=64, crop_pct=0.875)(images[0])[None]
    grid = 64 // 16
    for b, should_match in ((0, True), (len(model.blocks) - 1, False)):
        cls_row = block_attention_by_hand(model, x, b)[0, :, 0, 1:].double()  # [H, patches]
        want = (cls_row.mean(0) / cls_row.mean(0).sum()).reshape(grid, grid).numpy()
        assert np.allclose(got.cls_mean, want, atol=1e-6) == should_match, b
    from brute_force import published_rollout

    joint = published_rollout([block_attention_by_hand(model, x, 0).double().numpy()])[0, 0, 1:]
    assert np.allclose(got.rollout, (joint / joint.sum()).reshape(grid, grid), atol=1e-6)


def test_titled_heads_figure_names_each_metric(tmp_path, monkeypatch):
    """A `heads` figure writes one file per metric; a configured title must not hide which metric it is."""
    import attnflow.plot.style
    from attnflow.runner.config import FigureEntry
    from attnflow.runner.figures import render_stats_figure
    from plot_results import FAMILIES, make_result

    titles = {}

    def fake_save(fig, path, **kw):
        titles[Path(path).stem] = fig.get_suptitle()
        return []

    monkeypatch.setattr(attnflow.plot.style, "save_figure", fake_save)
    entry = FigureEntry(name="heads", kind="heads", title="ViT-B", metrics=("cls_self", "patch_self"),
                        formats=("png",))
    render_stats_figure(entry, make_result({"mim": FAMILIES["mim"]}), tmp_path)
    assert titles == {"heads-cls_self": "ViT-B: [cls]-[cls] attention",
                      "heads-patch_self": "ViT-B: patch-patch attention (self, relative)"}


def test_full_disk_keeps_the_finished_statistics_for_the_next_run(env, photo_folder, calls, capsys, monkeypatch):
    import errno
    import shutil

    cfg_path = write_config(env, photo_folder, figures="")
    runs = env / "runs" / "tiny"
    assert run(capsys, str(cfg_path))[0] == 0  # an uninterrupted run, for reference
    reference = Result.read(next(runs.rglob("tiny-rand*.parquet")))
    shutil.rmtree(runs)
    real_write = Result.write

    def disk_full(self, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(Result, "write", disk_full)
    code = main(["run", str(cfg_path), "--no-progress"])
    err = capsys.readouterr().err
    states = sorted(runs.rglob("*.state.pt"))
    assert code == 2 and "No space left on device" in err and len(states) == 1 and states[0].name in err, err
    monkeypatch.setattr(Result, "write", real_write)
    assert run(capsys, str(cfg_path))[0] == 0 and not list(runs.rglob("*.state.pt"))
    assert calls.count("tiny-rand") == 3  # reference, full disk, then a resume of the finished state
    stored = Result.read(next(runs.rglob("tiny-rand*.parquet")))
    pd.testing.assert_frame_equal(stored.frame, reference.frame, check_exact=False, rtol=1e-12)
