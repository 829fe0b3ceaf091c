"""Analysis configs: parsing, validation errors (one line, close matches), the configs shipped in analyses/."""

from __future__ import annotations

from pathlib import Path

import pytest

from attnflow.cli import main
from attnflow.runner import ConfigError, load_config, parse_config
from attnflow.runner.figures import output_files

ANALYSES = Path(__file__).resolve().parents[2] / "analyses"


def minimal(**top) -> dict:
    raw = {"data": {"root": "photos"}, "models": [{"name": "mae-vit-b16"}]}
    raw.update(top)
    return raw


def test_defaults_and_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = parse_config(minimal(), name="x")
    assert cfg.name == "x" and cfg.run_dir == Path("runs/x") and cfg.figures_dir == Path("runs/x/figures")
    assert cfg.img_size == 224 and cfg.crop_pct is None and cfg.limit is None and cfg.batch_size == 64
    assert [m.id for m in cfg.models] == ["mae-vit-b16"] and not cfg.models[0].random_init
    # no figures: statistics of every model
    assert [m.id for m in cfg.stats_models()] == ["mae-vit-b16"]


def test_defaults_model_kw_merge_into_each_model():
    cfg = parse_config(minimal(defaults={"model_kw": {"depth": 2, "embed_dim": 32}},
                               models=[{"name": "mae-vit-b16", "model_kw": {"depth": 3}}, {"name": "dino-vit-b16"}]))
    assert cfg.models[0].model_kw == {"depth": 3, "embed_dim": 32}
    assert cfg.models[1].model_kw == {"depth": 2, "embed_dim": 32}


def test_env_vars_expand_with_defaults_and_unset_ones_fail(monkeypatch):
    monkeypatch.setenv("ATTNFLOW_TEST_ROOT", "/somewhere/val")
    cfg = parse_config(minimal(data={"root": "${ATTNFLOW_TEST_ROOT:-x}/sub"}))
    assert cfg.data_root == Path("/somewhere/val/sub")
    monkeypatch.delenv("ATTNFLOW_TEST_ROOT")
    assert parse_config(minimal(data={"root": "${ATTNFLOW_TEST_ROOT:-fallback}"})).data_root == Path("fallback")
    with pytest.raises(ConfigError, match="ATTNFLOW_TEST_ROOT is not set"):
        parse_config(minimal(data={"root": "${ATTNFLOW_TEST_ROOT}"}))


@pytest.mark.parametrize("raw, message", [
    (minimal(data={"root": "x", "batchsize": 8}), "unknown key 'batchsize'; did you mean batch_size"),
    (minimal(modles=[]), "unknown key 'modles'; did you mean models"),
    (minimal(models=[{"name": "mae-vit-b"}]), "unknown model 'mae-vit-b'.*did you mean .*mae-vit-b16"),
    (minimal(models=[{"name": "mae-vit-b16"}, {"name": "mae-vit-b16"}]), "appears twice.*distinct id"),
    (minimal(models=[]), "at least one"),
    (minimal(models=[{"name": "mae-vit-b16", "checkpoint": "a.pth", "random_init": True}]), "exclude each other"),
    (minimal(figures=[{"name": "f", "kind": "metrics"}]), "unknown kind 'metrics'; did you mean metric"),
    (minimal(figures=[{"name": "f", "kind": "metric"}]), "exactly one metric"),
    (minimal(figures=[{"name": "f", "metrics": ["cls_entropy"]}]), "unknown metric 'cls_entropy'.*cls_patch_entropy"),
    (minimal(figures=[{"name": "f", "models": ["dino-vit-b16"]}]), "'dino-vit-b16' is not among the config's models"),
    (minimal(figures=[{"name": "f", "band": "head"}]), "unknown band 'head'; did you mean heads"),
    (minimal(figures=[{"name": "f", "formats": ["jpg"]}]), "unknown format 'jpg'"),
    (minimal(figures=[{"name": "f"}, {"name": "f"}]), "share a name"),
    (minimal(figures=[{"name": "../f"}]), "plain file stem"),
    (minimal(data={"root": "x", "img_size": "224"}), "img_size must be of type int"),
    (minimal(data={"root": "x", "limit": 0}), "limit must be positive"),
    (minimal(models=[{"name": "vit_small_patch16_224", "family": "SSL"}]), "family must be one of"),
])
def test_bad_configs_raise_one_clear_line(raw, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_config(raw)
    assert "\n" not in str(err.value)


def test_cli_prints_config_errors_as_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[data]\nroot = "x"\nimgsize = 64\n[[models]]\nname = "mae-vit-b16"\n')
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean img_size" in err and str(bad) in err
    broken = tmp_path / "broken.toml"
    broken.write_text("[data\n")
    assert main(["run", str(broken)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.toml")]) == 2
    assert "no such config file" in capsys.readouterr().err


def test_overrides():
    cfg = parse_config(minimal(run_dir="runs/a"))
    new = cfg.with_overrides(data="/d", run_dir="/r", limit=10, random_init=True, batch_size=4)
    assert new.data_root == Path("/d") and new.run_dir == Path("/r") and new.figures_dir == Path("/r/figures")
    assert new.limit == 10 and new.batch_size == 4 and all(m.random_init and m.checkpoint is None for m in new.models)
    with pytest.raises(ConfigError, match="^limit must be positive, got 0$"):
        cfg.with_overrides(limit=0)


# ------------------------------------------------------------------------------------------ shipped configs

def test_fig3_6_config_names_the_papers_vit_b_models_and_figures():
    cfg = load_config(ANALYSES / "fig3_6_vit_b.toml")
    assert [m.name for m in cfg.models] == ["mae-vit-b16", "mae-ft-vit-b16", "dino-vit-b16", "mocov3-vit-b16",
                                            "ibot-vit-b16"]
    assert cfg.img_size == 224 and cfg.expected_images == 50000 and cfg.limit is None
    by_name = {f.name: f for f in cfg.figures}
    assert [by_name[f"fig{i}"].metrics for i in (3, 4, 5, 6)] == [("cls_self",), ("cls_patch_entropy",),
                                                                   ("patch_self",), ("patch_patch_entropy",)]
    assert by_name["fig4"].paper == "Fig. 4"


def test_fig10_13_config_has_every_public_size_and_a_grid_per_metric():
    from attnflow.models.registry import get_spec

    cfg = load_config(ANALYSES / "fig10_13_sizes.toml")
    sizes: dict[str, set[str]] = {}
    for m in cfg.models:
        spec = get_spec(m.name)
        sizes.setdefault(spec.size, set()).add(spec.method)
    assert sizes == {"S": {"DINO", "MoCo-v3", "iBOT"}, "B": {"MAE", "MAE-FT", "DINO", "MoCo-v3", "iBOT"},
                     "L": {"MAE", "MAE-FT", "iBOT"}}
    grids = {f.name: f.metrics for f in cfg.figures if f.kind == "sizes"}
    assert grids["fig10"] == ("cls_self",) and grids["fig13"] == ("patch_patch_entropy",)
    assert "MAE ViT-S" in (ANALYSES / "fig10_13_sizes.toml").read_text()  # the gap is documented


@pytest.mark.parametrize("name", ["fig3_6_vit_b", "fig10_13_sizes", "fig9_maps"])
def test_shipped_configs_dry_run(name, photo_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(ANALYSES / f"{name}.toml"), "--data", str(photo_folder), "--dry-run"]) == 0
    out = capsys.readouterr().out
    cfg = load_config(ANALYSES / f"{name}.toml")
    for m in cfg.models:
        assert m.id in out
    verb = "maps" if name == "fig9_maps" else "would compute"
    assert out.count(verb) >= len(cfg.models) and "not cached" in out
    for fig in cfg.figures:
        assert all(p.name in out for p in output_files(fig, cfg.figures_dir)[:4])
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


@pytest.mark.parametrize("name", ["fig3_6_vit_b", "fig10_13_sizes", "fig9_maps"])
def test_shipped_configs_dry_run_without_data(name, tmp_path, monkeypatch, capsys):
    """As analyses/README.md shows it: no --data; the plan is printed and says what data a real run lacks."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("IMAGENET_VAL", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(ANALYSES / f"{name}.toml"), "--dry-run"]) == 0
    captured = capsys.readouterr()
    out, cfg = captured.out, load_config(ANALYSES / f"{name}.toml")
    assert captured.err == "" and all(m.id in out for m in cfg.models)
    assert "data data/imagenet/val (not found: not checked by a dry run)" in out
    missing = [line for line in out.splitlines() if line.startswith("  missing  ")]
    maps = [f.name for f in cfg.figures if f.kind == "maps"]
    assert len(missing) == (len(maps) if maps else 1)
    assert all("give a data root (the config's data.root)" in line for line in missing)
    if not maps:
        assert out.count("would compute") == len(cfg.models) and "statistics of " + cfg.models[0].id in missing[0]
    assert out.splitlines()[-1].startswith("  dry run: nothing was read")
    assert not (tmp_path / "runs").exists()
    # the real run stops before loading any model, with the first 'missing' line as its one-line error
    assert main(["run", str(ANALYSES / f"{name}.toml")]) == 2
    err = capsys.readouterr().err
    assert err == f"attnflow run: error: {name}: {missing[0].removeprefix('  missing  ')}\n"
    assert not (tmp_path / "runs").exists()


def test_dry_run_with_data_reports_nothing_missing(photo_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(ANALYSES / "fig9_maps.toml"), "--data", str(photo_folder), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"data {photo_folder} ({len(list(photo_folder.iterdir()))} images)" in out
    assert "missing" not in out and "dry run:" not in out


def test_a_config_that_is_not_utf8_text_is_one_line(tmp_path, capsys):
    from attnflow.cli import main

    config = tmp_path / "latin1.toml"
    config.write_bytes('name = "réseau"\n'.encode("latin-1"))  # saved by an editor in Latin-1
    assert main(["run", str(config), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"attnflow run: error: {config}: not a UTF-8 text file (byte 0xe9 at offset 9); a TOML config is "
                   "UTF-8 text")
