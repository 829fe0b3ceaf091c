"""`attnflow probe --task folder` on a tiny class-folder tree works on the defaults (batch capped by the training
images, workers from default_workers, the lr grid chosen on held-out training images), prints its resolved
settings first, and scores the held-out images as the saved heads do by hand."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from attnflow.cli import build_parser, main
from attnflow.data.images import ImageFolderDataset
from attnflow.data.transforms import eval_transform
from attnflow.models.load import load_model
from attnflow.options import default_workers
from attnflow.encode import TokenEncoder
from attnflow.probes.holdout import holdout_split
from attnflow.probes.outputs import load_head
from attnflow.probes.protocols import DEFAULT_BASE_LRS
from probe_data import folder_task, one_thread  # noqa: F401  (one_thread: autouse fixture)

TINY_KW = dict(depth=2, embed_dim=32, num_heads=4, mlp_ratio=2.0)
TINY = ["--model", "vit_small_patch16_224", "--random-init", "--img-size", "32",
        *[f"--model-kw={k}={v}" for k, v in TINY_KW.items()]]
HEADS = ["cls", "avg", "abmilp", "abmilp+cls"]


def printed_settings(out: str) -> dict[str, str]:
    lines = out.split("attnflow probe: settings\n", 1)[1].splitlines()
    settings = {}
    for line in lines:
        if not line.startswith("  ") or line.startswith("   "):  # the block ends at the next unindented line
            break
        name, value = line.strip().split(":", 1)
        settings[name.strip()] = value.strip()
    return settings


def test_small_folder_trains_on_defaults_and_prints_its_settings(tmp_path, photos, capsys, monkeypatch):
    data = folder_task(tmp_path / "flowers", photos, classes=2)  # 8 training images, 4 validation images
    encoded = []
    real_call = TokenEncoder.__call__

    def counting(self, images):
        encoded.append(len(images))
        return real_call(self, images)

    monkeypatch.setattr(TokenEncoder, "__call__", counting)
    out = tmp_path / "run"
    # only the run's length is shortened: the batch, workers, lrs, optimizer and heads are the folder defaults
    assert main(["probe", *TINY, "--task", "folder", "--data", str(data), "--out", str(out), "--epochs", "2",
                 "--seeds", "2", "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    settings = printed_settings(stdout)
    batch = 6  # 8 images, one per class held out: min(256, 6)
    assert settings["task"] == "folder" and settings["heads"] == ",".join(HEADS)
    assert (settings["batch"], settings["held out"], settings["accum_steps"]) == (str(batch), "2", "1")
    assert settings["workers"] == str(default_workers()) and settings["seeds"] == "0, 1"
    assert settings["lrs"] == ", ".join(f"{b * batch / 256:.3g}" for b in DEFAULT_BASE_LRS)
    assert settings["lr choice"] == "per head, on the held-out images" and settings["epochs"] == "2"
    assert settings["amp"] == "auto (float32)" and settings["optimizer"] == "sgd"
    assert stdout.index("attnflow probe: settings") < stdout.index("top-1")  # before the results
    assert sum(encoded) == 2 * 2 * (6 + 2 + 4)  # seeds x epochs x (trained + held-out + validation images)

    table = pd.read_parquet(out / "results.parquet")
    assert len(table) == len(HEADS) * len(DEFAULT_BASE_LRS) * 2 * 2  # heads x lrs x epochs x seeds
    last = table[table["epoch"] == 2]
    kept = last[last["selected"]]
    assert sorted(kept.groupby("seed")["head"].apply(sorted)) == [sorted(HEADS)] * 2  # one lr per head and seed
    meta = json.loads((out / "results.json").read_text())
    assert meta["lr_selection"] == "held-out" and meta["n_holdout"] == 2 and meta["batch_size"] == batch
    assert meta["chosen_lrs"] == {f"seed{s}": dict(zip(rows["head"], rows["lr"]))
                                  for s, rows in kept.groupby("seed")}
    assert meta["config"]["workers"] is None and "num_workers" not in meta["config"]
    for head in HEADS:  # the printed summary names each head's chosen lr and its held-out score
        lrs = ",".join(f"{x:.3g}" for x in dict.fromkeys(kept[kept["head"] == head]["lr"]))
        assert any(line.split()[:3] == [head, "lr", lrs] and "held-out top-1" in line
                   for line in stdout.splitlines()), (head, lrs, stdout)

    # the held-out images, scored by hand with each saved head of seed 0, give the table's held-out top-1
    model = load_model("vit_small_patch16_224", random_init=True, img_size=32, **TINY_KW)
    train = ImageFolderDataset(data / "train", eval_transform(model, img_size=32, crop_pct=0.875))
    held = holdout_split(torch.tensor(train.labels), 0.1, seed=0).held
    images = torch.stack([train[int(i)][0] for i in held])
    tokens = real_call(TokenEncoder(model, amp="fp32"), images)
    labels = torch.tensor(train.labels)[held]
    seed0 = last[last["seed"] == 0]
    saved = sorted((out / "seed0" / "heads").glob("*.pt"))
    # one file per (head, lr), and each head's kept one again under the spec's own name (what --head takes)
    assert len(saved) == len(HEADS) * len(DEFAULT_BASE_LRS) + len(HEADS)
    for head_name in HEADS:
        kept_head = load_head(out / "seed0" / "heads" / f"{head_name}.pt")
        assert kept_head.meta["selected"] and kept_head.meta["lr"] == meta["chosen_lrs"]["seed0"][head_name]
    for path in saved:
        head = load_head(path)
        with torch.no_grad():
            logits = head(tokens)
        row = seed0[(seed0["head"] == head.spec.name) & (seed0["lr"] == head.meta["lr"])]
        assert row["holdout_top1"].item() == pytest.approx(100 * (logits.argmax(1) == labels).float().mean().item())
        loss = torch.nn.functional.cross_entropy(logits, labels).item()  # continuous: other tokens would differ
        assert row["holdout_loss"].item() == pytest.approx(loss, rel=1e-4), path.name
        assert row["selected"].item() == head.meta["selected"]


def test_folder_layout_is_in_the_help():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    helps = {a.dest: a.help for a in sub.choices["probe"]._actions}
    for dest in ("task", "data"):
        assert "ROOT/train/<class>/*.jpg" in helps[dest] and "ROOT/val/<class>/*" in helps[dest]
        assert "ROOT/test/<class>/*" in helps[dest]


def test_folder_without_val_says_which_folders_it_reads(tmp_path, photos, capsys):
    data = folder_task(tmp_path / "f", photos, classes=2)
    (data / "val").rename(data / "validation")
    assert main(["probe", *TINY, "--task", "folder", "--data", str(data), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "has no val or test folder; the folder task reads ROOT/train/<class>/*" in err and "\n" not in err.strip()


@pytest.mark.parametrize("views", [1, 2])
def test_cached_held_out_images_are_scored_through_the_validation_transform(tmp_path, photos, views):
    """With augmented cached views (views > 1) the held-out images get tokens of the validation transform, in
    their own cache; with one view the training cache already holds those."""
    from attnflow.probes.cache import TokenCache

    data = folder_task(tmp_path / "f", photos, classes=2)
    out = tmp_path / "run"
    args = ["probe", *TINY, "--task", "folder", "--data", str(data), "--out", str(out), "--epochs", "1", "--seeds",
            "1", "--heads", "avg,abmilp", "--cache", "--views", str(views), "--workers", "0", "--no-progress"]
    assert main(args) == 0
    manifests = {split: json.loads((out / "cache" / split / "manifest.json").read_text())
                 for split in ("train", "val", "train-eval") if (out / "cache" / split).exists()}
    assert ("train-eval" in manifests) == (views > 1)
    held_cache = TokenCache.open(out / "cache" / ("train-eval" if views > 1 else "train"))
    assert manifests[held_cache.root.name]["transform"] == manifests["val"]["transform"]
    assert ("RandomResizedCrop" in manifests["train"]["transform"]) == (views > 1)
    train = TokenCache.open(out / "cache" / "train")
    rows = train.valid[holdout_split(train.labels[train.valid], 0.1, seed=0).held]
    tokens, labels = held_cache.tokens[0, rows].float(), held_cache.labels[rows]
    table = pd.read_parquet(out / "results.parquet")
    for path in sorted((out / "seed0" / "heads").glob("*.pt")):
        head = load_head(path)
        with torch.no_grad():
            logits = head(tokens)
        row = table[(table["head"] == head.spec.name) & (table["lr"] == head.meta["lr"])]
        assert row["holdout_top1"].item() == pytest.approx(100 * (logits.argmax(1) == labels).float().mean().item())
        loss = torch.nn.functional.cross_entropy(logits, labels).item()  # augmented tokens would give another
        assert row["holdout_loss"].item() == pytest.approx(loss, rel=1e-4), path.name
    before = pd.read_parquet(out / "results.parquet")
    assert main([*args, "--resume"]) == 0  # a finished run resumes to the same table
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), before)
