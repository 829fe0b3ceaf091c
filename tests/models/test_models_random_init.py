"""Random weights (``--random-init``) are seeded by the run's name, by one rule in ``load_model``: two presets of
one architecture differ, one name twice is identical, and the runner keeps the weights it always drew."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import attnflow.maps
from attnflow.cli import main
from attnflow.models.load import load_model, random_init_seed
from attnflow.result import Result
from attnflow.runner.config import ModelEntry
from attnflow.runner.execute import load_entry

from conftest import TINY

IMG = 32
"""Input size of the tiny models (2 x 2 patches of 16 px)."""

TINY_CLI = ["--img-size", "64", "--model-kw", "depth=2", "--model-kw", "embed_dim=32", "--model-kw", "num_heads=4"]


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two models hold bit-identical state dicts."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def differing(a: torch.nn.Module, b: torch.nn.Module) -> set[str]:
    """State-dict entries whose values differ."""
    sa, sb = a.state_dict(), b.state_dict()
    return {k for k in sa if not torch.equal(sa[k], sb[k])}


def test_presets_of_one_architecture_get_different_random_weights_and_one_name_the_same():
    rng = torch.get_rng_state()
    mae = load_model("mae-vit-b16", random_init=True, img_size=IMG, **TINY)
    dino = load_model("dino-vit-b16", random_init=True, img_size=IMG, **TINY)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random stream is left alone
    assert mae.attnflow_info.arch == dino.attnflow_info.arch == "vit_base_patch16_224"
    # every weight is re-drawn, the patch embedding and the attention included (biases start at zero)
    assert {"patch_embed.proj.weight", "pos_embed", "cls_token", "blocks.0.attn.qkv.weight",
            "blocks.1.mlp.fc2.weight"} <= differing(mae, dino)
    assert same_weights(mae, load_model("mae-vit-b16", random_init=True, img_size=IMG, **TINY))
    assert mae.attnflow_info.seed_name == "mae-vit-b16" and mae.attnflow_info.random_init


def test_seed_name_picks_the_weights_not_the_model_name():
    renamed = load_model("mae-vit-b16", random_init=True, img_size=IMG, seed_name="dino-vit-b16", **TINY)
    assert same_weights(renamed, load_model("dino-vit-b16", random_init=True, img_size=IMG, **TINY))
    assert renamed.attnflow_info.seed_name == "dino-vit-b16"
    other = load_model("mae-vit-b16", random_init=True, img_size=IMG, seed_name="mae-b16-run2", **TINY)
    assert not same_weights(renamed, other)
    assert random_init_seed("mae-b16-run2") == zlib.crc32(b"mae-b16-run2")


def old_runner_weights(arch: str, entry_id: str, **kwargs) -> torch.nn.Module:
    """The runner's formula before the rule moved into ``load_model``: build under seed 0, then timm's
    ``init_weights`` under ``crc32(entry id)``."""
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=0, img_size=IMG, **kwargs)
    torch.manual_seed(zlib.crc32(entry_id.encode()))
    model.init_weights()
    return model


@pytest.mark.parametrize("name,entry_id", [("mae-vit-b16", "mae-vit-b16"), ("ibot-vit-b16", "ibot-b16-second"),
                                           ("vit_small_patch16_224", "tiny-rand")])
def test_runner_random_weights_equal_the_old_formula(name, entry_id):
    entry = ModelEntry(name=name, id=entry_id, random_init=True, model_kw=dict(TINY))
    got = load_entry(entry, IMG)
    arch = "vit_small_patch16_224" if name.startswith("vit_") else "vit_base_patch16_224"
    with torch.random.fork_rng(devices=[]):
        want = old_runner_weights(arch, entry_id, **TINY)
    assert same_weights(got, want)
    assert got.attnflow_info.seed_name == entry_id and not got.training


def stats_means(tmp_path: Path, photos: Path, *args: str) -> np.ndarray:
    out = tmp_path / f"{len(list(tmp_path.glob('*.parquet')))}.parquet"
    assert main(["stats", "--data", str(photos), "--out", str(out), "--random-init", "--limit", "2",
                 "--batch-size", "2", "--workers", "0", "--no-progress", *TINY_CLI, *args]) == 0
    return Result.read(out).frame["mean"].to_numpy()


def test_stats_random_init_seeds_by_name_or_model(photo_folder, tmp_path, capsys):
    mae = stats_means(tmp_path, photo_folder, "--model", "mae-vit-b16")
    dino = stats_means(tmp_path, photo_folder, "--model", "dino-vit-b16")
    assert np.abs(mae - dino).max() > 1e-6  # one line per model in the plots, not one line under two labels
    np.testing.assert_array_equal(mae, stats_means(tmp_path, photo_folder, "--model", "mae-vit-b16"))
    # --name is the run's name: it seeds the weights (a DINO-named MAE run draws DINO's random weights)
    renamed = stats_means(tmp_path, photo_folder, "--model", "mae-vit-b16", "--name", "dino-vit-b16")
    np.testing.assert_array_equal(renamed, dino)


def test_maps_random_init_differs_between_presets_of_one_architecture(photo_folder, tmp_path, monkeypatch, capsys):
    grids: dict[int, list[np.ndarray]] = {}
    real = attnflow.maps.model_maps

    def recording(model, images, **kwargs):
        crops, maps = real(model, images, **kwargs)
        grids[len(grids)] = [m.get("cls_mean") for m in maps]
        return crops, maps

    monkeypatch.setattr(attnflow.maps, "model_maps", recording)
    out = tmp_path / "maps.png"
    assert main(["maps", "--model", "mae-vit-b16", "--model", "dino-vit-b16", "--random-init", "--images",
                 str(photo_folder), "--limit", "1", "--out", str(out), *TINY_CLI]) == 0
    assert out.is_file() and len(grids) == 2
    assert not np.allclose(grids[0][0], grids[1][0])
