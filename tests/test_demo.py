"""``attnflow demo`` offline: every indexed file exists (and only those), the banner, mixed weights, one probe."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import attnflow.models.files as model_files
from attnflow.cli import main
from attnflow.demo import DEMO_MODELS, write_photos
from attnflow.models.load import load_model, sha256_file

TINY_ARGS = ["--img-size", "64", "--model-kw", "depth=2", "--model-kw", "embed_dim=32", "--model-kw", "num_heads=4"]
TINY = dict(depth=2, embed_dim=32, num_heads=4)


@pytest.fixture()
def offline(tmp_path, monkeypatch) -> Path:
    """Empty weight caches, HF_HUB_OFFLINE, no sockets."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("ATTNFLOW_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    return tmp_path


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory) -> tuple[Path, str]:
    """One offline tiny demo over 3 photos, shared by the tests that only read its output: (folder, stdout)."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(root / "torch"))
        mp.setenv("HF_HOME", str(root / "hf"))
        mp.delenv("HF_HUB_CACHE", raising=False)
        mp.delenv("ATTNFLOW_OFFLINE", raising=False)
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(AssertionError("network")))
        mp.setattr(socket.socket, "connect", lambda *a, **k: (_ for _ in ()).throw(AssertionError("network")))
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            assert main(["demo", "--out", str(root / "demo"), "--limit", "3", *TINY_ARGS]) == 0
    return root / "demo", buffer.getvalue()


def indexed_files(out: Path) -> list[str]:
    """Relative paths linked from index.md."""
    return re.findall(r"^\| \[([^\]]+)\]\(\1\) \| .+ \|$", (out / "index.md").read_text(), flags=re.M)


def demo(capsys, out: Path, *args: str) -> str:
    assert main(["demo", "--out", str(out), *TINY_ARGS, *args]) == 0
    return capsys.readouterr().out


def test_photos_are_real_distinct_images(tmp_path):
    paths = write_photos(tmp_path)
    assert len(paths) >= 7 and paths[0].name == "01_astronaut.jpg"
    arrays = [np.asarray(Image.open(p)) for p in paths]
    for a in arrays:
        assert a.ndim == 3 and a.shape[2] == 3 and min(a.shape[:2]) >= 200 and a.std() > 20
    assert len({a.tobytes()[:5000] for a in arrays}) == len(arrays)
    assert write_photos(tmp_path / "two", limit=2) == [tmp_path / "two" / "01_astronaut.jpg",
                                                        tmp_path / "two" / "02_chelsea.jpg"]


def test_offline_demo_writes_every_indexed_file_behind_the_banner(tiny_demo):
    out, stdout = tiny_demo
    torch_home = out.parent / "torch"
    # the banner: loud, names every model, says meaningless, and how to get weights
    assert stdout.count("RANDOM-INIT WEIGHTS: " + ", ".join(DEMO_MODELS)) == 2  # before and after the run
    assert "MEANINGLESS" in stdout and "or give the file as its checkpoint: mocov3-vit-b16=PATH" in stdout
    assert "the network is off or unreachable" in stdout
    assert "https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar" in stdout
    assert str(torch_home / "hub" / "checkpoints" / "vit-b-300ep.pth.tar") in stdout
    # the index lists exactly the files in the folder, each with a description
    listed = indexed_files(out)
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()
                     and p.name not in ("index.md", "index.html"))
    assert sorted(listed) == on_disk and len(listed) >= 30 - 4
    for rel in ("summary.csv", "per_block.csv", "results.parquet", "figures/blocks-metrics.png",
                "figures/blocks-metrics.pdf", "figures/blocks-cls_patch_entropy.pdf", "figures/maps.png",
                "figures/heads-patch_patch_entropy.png", "photos/01_astronaut.jpg"):
        assert rel in listed, rel
    index_md, index_html = (out / "index.md").read_text(), (out / "index.html").read_text()
    assert "RANDOM-INIT WEIGHTS" in index_md and "RANDOM-INIT WEIGHTS" in index_html
    assert all(f'href="{rel}"' in index_html for rel in listed)
    for rel in listed:
        if rel.endswith(".png"):
            with Image.open(out / rel) as img:
                assert min(img.size) > 100


def test_summary_tables_match_the_stored_statistics(tiny_demo):
    out, _ = tiny_demo
    summary = pd.read_csv(out / "summary.csv")
    assert summary["model"].tolist() == list(DEMO_MODELS)
    assert (summary["weights"] == "random-init").all() and (summary["images"] == 3).all()
    per_block = pd.read_csv(out / "per_block.csv")
    for model in DEMO_MODELS:
        table = pd.read_parquet(next((out / "stats").glob(f"{model}-*.parquet")))
        for metric in ("cls_self", "cls_patch_entropy", "patch_self", "patch_patch_entropy"):
            # brute force: mean over heads of each block, by loops over the tidy rows
            sums: dict[int, list[float]] = {}
            for row in table.itertuples():
                if row.model == model and row.metric == metric:
                    sums.setdefault(row.block, []).append(row.mean)
            by_block = [sum(v) / len(v) for _, v in sorted(sums.items())]
            got = summary.loc[summary["model"] == model].iloc[0]
            assert got[f"{metric}_last_block"] == pytest.approx(by_block[-1], rel=1e-12)
            assert got[f"{metric}_mean_over_blocks"] == pytest.approx(sum(by_block) / len(by_block), rel=1e-12)
            col = per_block.loc[per_block["model"] == model].sort_values("block")
            assert col["block"].tolist() == sorted(sums) == list(range(len(by_block)))  # 0-based, as the table
            np.testing.assert_allclose(col[metric].to_numpy(), by_block, rtol=1e-12)
    # different random models differ (each is seeded by its name)
    assert summary["cls_self_last_block"].nunique() == len(DEMO_MODELS)


def test_cached_weights_are_used_and_the_banner_names_only_the_others(offline, capsys):
    target = offline / "torch" / "hub" / "checkpoints" / "vit-b-300ep.pth.tar"
    target.parent.mkdir(parents=True)
    sd = load_model("mocov3-vit-b16", random_init=True, img_size=64, **TINY).state_dict()
    gen = torch.Generator().manual_seed(3)
    torch.save({"state_dict": {f"module.base_encoder.{k}": torch.randn(v.shape, generator=gen) * 0.3
                               for k, v in sd.items()}}, target)
    out = offline / "demo"
    stdout = demo(capsys, out, "--limit", "2")
    others = [m for m in DEMO_MODELS if m != "mocov3-vit-b16"]
    assert "RANDOM-INIT WEIGHTS: " + ", ".join(others) + "\n" in stdout
    assert "mocov3-vit-b16=PATH" not in stdout
    summary = pd.read_csv(out / "summary.csv").set_index("model")
    assert summary.loc["mocov3-vit-b16", "weights"] == "cached"
    assert summary.loc["mocov3-vit-b16", "sha256"] == sha256_file(target)
    assert (summary.loc[others, "weights"] == "random-init").all()
    meta = json.loads(next((out / "stats").glob("mocov3-vit-b16-*.json")).read_text())
    assert meta["random_init"] is False and meta["checkpoint"] == str(target)
    assert "`mocov3-vit-b16`: cached" in (out / "index.md").read_text()


def test_network_is_probed_once_and_never_used_for_downloads(tmp_path, monkeypatch, capsys):
    """Online mode, unreachable network: one probe for all four models, no download attempt, env restored."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "ATTNFLOW_OFFLINE", "HF_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    probes: list[str] = []

    def unreachable(url, timeout=3.0):
        probes.append(url)
        return False

    monkeypatch.setattr(model_files, "reachable", unreachable)
    monkeypatch.setattr(socket, "create_connection",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("network used")))
    monkeypatch.setattr(socket.socket, "connect",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("network used")))
    stdout = demo(capsys, tmp_path / "demo", "--limit", "2")
    assert probes == ["https://huggingface.co"]
    assert "network unavailable" in stdout and "RANDOM-INIT WEIGHTS" in stdout
    import os

    assert "ATTNFLOW_OFFLINE" not in os.environ


def test_the_network_probe_never_waits_longer_than_its_timeout(monkeypatch):
    import time

    from attnflow.demo import network_available

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "ATTNFLOW_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(model_files, "_REACHABLE", {})  # no answer cached by an earlier test
    monkeypatch.setenv("HF_ENDPOINT", "https://hanging-dns.example")
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: time.sleep(30) or [])  # a name lookup that hangs
    start = time.perf_counter()
    assert network_available(timeout=0.2) is False
    assert time.perf_counter() - start < 2.0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(model_files, "reachable", lambda *a, **k: pytest.fail("probed while offline"))
    assert network_available() is False


def test_second_demo_reuses_the_statistics(tiny_demo, offline, capsys):
    out, _ = tiny_demo
    stdout = demo(capsys, out, "--limit", "3")
    assert stdout.count("  reuse ") == len(DEMO_MODELS) and "computing" not in stdout
    assert sorted(indexed_files(out)) == sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                                                if p.is_file() and p.name not in ("index.md", "index.html"))


def test_bad_demo_arguments_are_one_line_errors(offline, capsys):
    assert main(["demo", "--out", str(offline / "d"), "--checkpoint", "nonsense"]) == 2
    assert "MODEL=PATH" in capsys.readouterr().err
    assert main(["demo", "--out", str(offline / "d"), "--checkpoint", "dino-vit-s16=x.pth"]) == 2
    assert "a checkpoint is given for dino-vit-s16, which the demo does not run" in capsys.readouterr().err
    assert main(["demo", "--out", str(offline / "d"), "--limit", "0"]) == 2


@pytest.mark.slow
def test_default_demo_real_vit_b_presets(offline, capsys):
    """The real default path: the four ViT-B/16 presets at 224 px (random weights offline)."""
    out = offline / "demo"
    assert main(["demo", "--out", str(out), "--limit", "4"]) == 0
    stdout = capsys.readouterr().out
    assert "RANDOM-INIT WEIGHTS" in stdout
    table = pd.read_parquet(out / "results.parquet")
    assert set(table["model"]) == set(DEMO_MODELS)
    assert table["block"].nunique() == 12 and table["head"].nunique() == 12
    meta = json.loads(next((out / "stats").glob("mae-vit-b16-*.json")).read_text())
    assert meta["n_patches"] == 196 and meta["images_used"] == 4
    entropy = table[(table["metric"] == "cls_patch_entropy")]["mean"]
    assert (entropy <= np.log(196) + 1e-9).all()
    assert sorted(indexed_files(out)) == sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                                                if p.is_file() and p.name not in ("index.md", "index.html"))
