"""`attnflow probe` end to end on a tiny random-init model and a fake CUB tree; `attnflow table` on stored runs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from attnflow.cli import main
from attnflow.errors import AttnflowError
from attnflow.encode import TokenEncoder
from attnflow.probes.outputs import load_head
from attnflow.probes.protocols import resolve_config
from probe_data import folder_task, one_thread  # noqa: F401  (one_thread: autouse fixture)
from cub_data import TINY, probe
from interrupts import interrupt_at_call, training_stopped_after

def test_probe_cub_end_to_end_and_saved_abmilp_scores(cub, tmp_path, capsys):
    out = tmp_path / "run"
    assert probe(cub, out) == 0
    table = pd.read_parquet(out / "results.parquet")
    assert list(table.columns) == ["model", "task", "block", "head", "lr", "seed", "epoch", "top1", "top5",
                                   "train_loss", "holdout_top1", "holdout_loss", "selected"]
    assert set(table["block"]) == {1}  # the last of 2 blocks, 0-based
    assert table["selected"].all() and table["holdout_top1"].isna().all()  # one lr: kept, no held-out split
    assert len(table) == 4 * 2 * 2  # heads x seeds x epochs
    assert set(table["task"]) == {"cub"} and set(table["seed"]) == {0, 1}
    meta = json.loads((out / "results.json").read_text())
    assert meta["config"]["optimizer"] == "sgd" and meta["config"]["momentum"] == 0.0  # the cub preset
    assert meta["data"]["n_train"] == 8 and meta["data"]["n_val"] == 4 and meta["accum_steps"] == 2
    assert "top-1" in capsys.readouterr().out
    head = load_head(out / "seed0" / "heads" / "abmilp.pt")
    assert head.meta["task"] == "cub" and head.spec.name == "abmilp"
    assert head.meta["random_init"] is True and head.meta["checkpoint_sha256"] is None  # the backbone's weights
    assert len(head.meta["weights"]) == 16 and head.meta["img_size"] == [32, 32]
    tokens = torch.randn(3, 1 + 4, 32)
    scores = head.scores(tokens)
    assert scores.shape == (3, 5) and torch.allclose(scores.sum(1), torch.ones(3))
    assert scores[:, 0].eq(0).all()  # patches only
    # finishing again with --resume changes nothing; without --resume the run directory is protected
    assert probe(cub, out, "--resume") == 0
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), table)
    assert probe(cub, out) == 2
    assert "already holds a probe run" in capsys.readouterr().err


def test_image_path_resume_equals_uninterrupted_and_one_encoder_pass(cub, tmp_path, monkeypatch, capsys):
    calls = interrupt_at_call(monkeypatch, TokenEncoder, "__call__", 0)  # counts the encoder's calls only
    assert probe(cub, tmp_path / "whole", "--seeds", "1", "--epochs", "3", "--heads", "cls") == 0
    one_head = len(calls)
    calls.clear()
    assert probe(cub, tmp_path / "whole4", "--seeds", "1", "--epochs", "3") == 0
    assert len(calls) == one_head == 3 * (2 * 2 + 2)  # epochs x (steps x micro-batches + val batches)

    with training_stopped_after(2):
        assert probe(cub, tmp_path / "part", "--seeds", "1", "--epochs", "3") == 130
    capsys.readouterr()
    for changed in (["--lr", "3.0"], ["--momentum", "0.9"], ["--train-aug", "none"]):  # would mix two runs
        assert probe(cub, tmp_path / "part", "--seeds", "1", "--epochs", "3", "--resume", *changed) == 2
        err = capsys.readouterr().err
        assert "cannot resume" in err and "config" in err, err
    assert probe(cub, tmp_path / "part", "--seeds", "1", "--epochs", "3", "--resume") == 0
    whole = pd.read_parquet(tmp_path / "whole4" / "results.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "part" / "results.parquet"), whole)
    for name in ("cls", "avg", "abmilp", "ap1"):
        a = load_head(tmp_path / "whole4" / "seed0" / "heads" / f"{name}.pt").state_dict()
        b = load_head(tmp_path / "part" / "seed0" / "heads" / f"{name}.pt").state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_probe_from_feature_cache(cub, tmp_path):
    out = tmp_path / "cached"
    assert probe(cub, out, "--cache", "--views", "2", "--seeds", "1") == 0
    manifest = json.loads((out / "cache" / "train" / "manifest.json").read_text())
    assert manifest["views"] == 2 and manifest["complete"] and manifest["shape"] == [2, 8, 5, 32]
    assert "RandomResizedCrop" in manifest["transform"]
    assert json.loads((out / "cache" / "val" / "manifest.json").read_text())["views"] == 1
    assert len(pd.read_parquet(out / "results.parquet")) == 4 * 2


def test_probe_of_several_blocks_equals_one_run_per_block_from_one_encoder_pass(cub, tmp_path, monkeypatch,
                                                                                   capsys):
    from attnflow.encode import BlockTokenEncoder

    calls = interrupt_at_call(monkeypatch, BlockTokenEncoder, "__call__", 0)  # counts the encoder's calls only
    args = ("--seeds", "1", "--epochs", "2", "--heads", "cls,avg,abmilp")
    assert probe(cub, tmp_path / "both", *args, "--blocks", "all") == 0
    assert len(calls) == 2 * (2 * 2 + 2)  # epochs x (steps x micro-batches + val batches): both blocks, one pass
    out = capsys.readouterr().out
    assert "blocks:       all" in out and "block 1 abmilp" in out and "blocks.png" in out
    both = pd.read_parquet(tmp_path / "both" / "results.parquet")
    assert sorted(set(both["block"])) == [0, 1] and len(both) == 2 * 3 * 2  # blocks x heads x epochs
    assert (tmp_path / "both" / "blocks.pdf").stat().st_size > 0 and (tmp_path / "both" / "blocks.png").is_file()
    for block in (0, 1):
        assert probe(cub, tmp_path / f"b{block}", *args, "--block", str(block)) == 0
        alone = pd.read_parquet(tmp_path / f"b{block}" / "results.parquet")
        pd.testing.assert_frame_equal(both[both["block"] == block].reset_index(drop=True), alone)
        for head in ("cls", "avg", "abmilp"):
            mine = load_head(tmp_path / "both" / "seed0" / "heads" / f"block{block}" / f"{head}.pt")
            ref = load_head(tmp_path / f"b{block}" / "seed0" / "heads" / f"{head}.pt")
            assert mine.meta["block"] == ref.meta["block"] == block
            assert all(torch.equal(v, ref.state_dict()[k]) for k, v in mine.state_dict().items()), (block, head)
    meta = json.loads((tmp_path / "both" / "results.json").read_text())
    assert meta["blocks"] == [0, 1] and meta["n_blocks"] == 2 and set(meta["chosen_lrs"]["seed0"]) == {
        f"block{b}/{h}" for b in (0, 1) for h in ("cls", "avg", "abmilp")}

    with training_stopped_after(1):
        assert probe(cub, tmp_path / "part", *args, "--blocks", "0,1") == 130
    assert probe(cub, tmp_path / "part", *args, "--blocks", "0,-1", "--resume") == 0  # the same blocks
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "part" / "results.parquet"), both)


def test_cached_probe_of_several_blocks_equals_a_cached_run_of_one_block(cub, tmp_path):
    args = ("--seeds", "1", "--epochs", "1", "--heads", "avg,abmilp", "--cache")
    assert probe(cub, tmp_path / "both", *args, "--blocks", "0,1") == 0
    assert probe(cub, tmp_path / "b0", *args, "--block", "0") == 0
    train = tmp_path / "both" / "cache" / "train"
    assert sorted(p.name for p in train.glob("tokens*.npy")) == ["tokens_b0.npy", "tokens_b1.npy"]
    assert (tmp_path / "both" / "blocks.png").is_file() and not (tmp_path / "b0" / "blocks.png").exists()
    both = pd.read_parquet(tmp_path / "both" / "results.parquet")
    pd.testing.assert_frame_equal(both[both["block"] == 0].reset_index(drop=True),
                                  pd.read_parquet(tmp_path / "b0" / "results.parquet"))


def test_block_options_are_checked_in_one_line(cub, tmp_path, capsys):
    out = str(tmp_path / "x")
    with pytest.raises(SystemExit):
        main(["probe", *TINY, "--task", "cub", "--data", str(cub), "--out", out, "--block", "1", "--blocks", "all"])
    assert "not allowed with argument" in capsys.readouterr().err
    assert main(["probe", *TINY, "--task", "cub", "--data", str(cub), "--out", out, "--blocks", "0,2"]) == 2
    assert "block 2 does not exist: the model has 2 blocks" in capsys.readouterr().err
    assert main(["probe", *TINY, "--task", "cub", "--data", str(cub), "--out", out, "--blocks", "6-12"]) == 2
    assert "counted from 0 (e.g. 5,8,11)" in capsys.readouterr().err
    assert main(["probe", *TINY, "--task", "cub", "--data", str(cub), "--out", out, "--blocks", "all",
                 "--aggregation", "cls_mean"]) == 2
    assert "use block, not blocks" in capsys.readouterr().err


def test_bad_cli_input_is_one_line(cub, tmp_path, capsys):
    assert main(["probe", *TINY, "--task", "cub", "--data", str(cub), "--out", str(tmp_path / "x"),
                 "--heads", "abmlip"]) == 2
    assert "did you mean abmilp" in capsys.readouterr().err
    assert main(["probe", *TINY, "--task", "imagenett", "--data", str(cub), "--out", str(tmp_path / "x")]) == 2
    assert "did you mean imagenet" in capsys.readouterr().err
    assert main(["probe", *TINY, "--task", "cub", "--data", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "x")]) == 2


def test_protocol_presets_toml_and_flags(tmp_path):
    imagenet = resolve_config("imagenet")
    assert (imagenet.optimizer, imagenet.batch_size, imagenet.momentum, imagenet.warmup_epochs) == ("lars", 16384,
                                                                                                    0.9, 10.0)
    assert imagenet.peak_lrs() == [0.1 * 16384 / 256] and imagenet.seeds == [0, 1, 2]
    assert imagenet.resolved_epochs("B") == 90 and imagenet.resolved_epochs("L") == 50
    assert imagenet.resolved_accum_steps(world_size=8) == 2 and not imagenet.layernorm
    cub = resolve_config("cub")
    assert (cub.optimizer, cub.batch_size, cub.momentum, cub.resolved_epochs("L")) == ("sgd", 1024, 0.0, 90)
    config = tmp_path / "probe.toml"
    config.write_text('[probe]\nheads = ["abmilp", "ap12"]\nepochs = 7\nlr = 0.3\nbatch-size = 512\n')
    merged = resolve_config("imagenet", config, epochs=3)
    assert (merged.heads, merged.epochs, merged.lr, merged.batch_size) == ("abmilp,ap12", 3, [0.3], 512)
    config.write_text("epoch = 3\n")
    with pytest.raises(AttnflowError, match="did you mean epochs"):
        resolve_config("imagenet", config)
    with pytest.raises(AttnflowError, match="unknown optimizer"):
        resolve_config("cub", optimizer="adam")


def write_run(root: Path, model: str, task: str, values: dict[str, list[float]]) -> None:
    """A stored run: per head, the final top-1 of seeds 0, 1, 2 (plus an earlier, better epoch)."""
    rows = []
    for head, per_seed in values.items():
        for seed, top1 in enumerate(per_seed):
            rows.append(dict(model=model, task=task, head=head, lr=0.4, seed=seed, epoch=1, top1=top1 + 5,
                             top5=99.0, train_loss=1.0))
            rows.append(dict(model=model, task=task, head=head, lr=0.4, seed=seed, epoch=2, top1=top1, top5=99.0,
                             train_loss=0.5))
    root.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(root / "results.parquet")


def test_table_renders_mean_and_std_over_seeds(tmp_path, capsys):
    write_run(tmp_path / "runs" / "probe-mae", "mae-vit-b16", "imagenet",
              {"cls": [67.0, 68.0, 69.0], "avg": [65.0, 66.0, 66.5], "abmilp": [71.0, 71.5, 72.3]})
    write_run(tmp_path / "runs" / "probe-capi", "capi-vit-l14", "imagenet", {"avg": [76.0, 76.4, 76.2],
                                                                              "abmilp": [82.0, 82.2, 83.0]})
    out = tmp_path / "figures" / "table1.md"
    assert main(["table", str(tmp_path / "runs" / "probe-mae"), str(tmp_path / "runs" / "probe-capi"),
                 "--out", str(out)]) == 0
    text = out.read_text().splitlines()
    assert text[0].startswith("| Model | avg | cls | abmilp |")  # the paper's Table 1 column order
    mae_row = next(line for line in text if "MAE" in line or "mae" in line)
    # cls: mean 68.0, sample std 1.0; abmilp: mean 71.6, std of (71.0, 71.5, 72.3) = 0.656 -> 0.7 (best: bold)
    assert "68.0 ± 1.0" in mae_row and "**71.6 ± 0.7**" in mae_row
    capi_row = next(line for line in text if "CAPI" in line or "capi" in line)
    assert "| – |" in capi_row and "**82.4 ± 0.5**" in capi_row  # no [cls] for CAPI
    assert main(["table", str(tmp_path / "runs"), "--value", "best", "--out", str(tmp_path / "t.csv")]) == 0
    summary = pd.read_csv(tmp_path / "t.csv")
    row = summary[(summary["model"] == "mae-vit-b16") & (summary["head"] == "cls")].iloc[0]
    assert row["mean"] == pytest.approx(73.0) and row["n_seeds"] == 3  # best epoch = final + 5
    assert main(["table", str(tmp_path / "runs"), "--heads", "abmilp,avg", "--out", str(tmp_path / "t.tex")]) == 0
    tex = (tmp_path / "t.tex").read_text()
    assert r"Model & abmilp & avg \\" in tex and r"\textbf{71.6 $\pm$ 0.7}" in tex
    assert main(["table", str(tmp_path / "runs"), "--out", str(tmp_path / "t.xlsx")]) == 2
    assert "use .md, .tex or .csv" in capsys.readouterr().err
    assert main(["table", str(tmp_path / "runs"), "--heads", "cls,abmlip"]) == 2  # not a silently dropped column
    assert "no run has head 'abmlip'; did you mean abmilp?" in capsys.readouterr().err


def test_probe_reads_weights_under_checkpoint_key(cub, tmp_path, capsys):
    from attnflow.models.load import load_model

    model = load_model("vit_small_patch16_224", random_init=True, img_size=32, depth=2, embed_dim=32, num_heads=4,
                       mlp_ratio=2.0)
    weights = tmp_path / "ijepa-like.pth"
    torch.save({"target_encoder": model.state_dict()}, weights)  # no weights under the format's default keys
    args = [a for a in TINY if a != "--random-init"] + ["--checkpoint", str(weights)]
    common = ["--task", "cub", "--data", str(cub), "--heads", "avg", "--seeds", "1", "--epochs", "1",
              "--batch-size", "4", "--workers", "0", "--no-progress"]
    assert main(["probe", *args, *common, "--out", str(tmp_path / "nokey")]) == 2
    capsys.readouterr()
    assert main(["probe", *args, "--checkpoint-key", "target_encoder", *common, "--out", str(tmp_path / "key")]) == 0
    meta = json.loads((tmp_path / "key" / "results.json").read_text())
    assert meta["model_info"]["checkpoint"] == str(weights)


def test_odd_probe_inputs_are_one_line_before_any_work(tmp_path, photos, capsys):
    data = folder_task(tmp_path / "two", photos, classes=2)
    base = ["probe", *TINY, "--task", "folder", "--data", str(data), "--epochs", "1", "--seeds", "1",
            "--batch-size", "4", "--workers", "0", "--no-progress"]
    (tmp_path / "afile").write_text("")
    cases = {("--out", str(tmp_path / "afile")): "is a file",
             ("--seeds", "0"): "no seeds", ("--eval-every", "0"): "eval_every", ("--lr", "0.1,-1"): "positive",
             ("--split-file", str(tmp_path / "afile")): "imagenet-1pct only"}
    for extra, message in cases.items():
        out = [] if "--out" in extra else ["--out", str(tmp_path / "r")]
        assert main([*base, *out, *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    one = folder_task(tmp_path / "one", photos, classes=1)
    assert main([*base, "--data", str(one), "--out", str(tmp_path / "r1")]) == 2
    assert "at least 2" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not (tmp_path / "r1").exists()


def test_model_without_cls_default_heads_and_early_refusal(tmp_path, photos, capsys):
    data = folder_task(tmp_path / "two", photos, classes=2)
    base = ["probe", *TINY, "--model-kw", "class_token=False", "--model-kw", "global_pool=avg", "--task", "folder",
            "--data", str(data), "--epochs", "1", "--seeds", "1", "--batch-size", "4", "--workers", "0",
            "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "run")]) == 0  # Table 1's heads for I-JEPA / CAPI
    assert set(pd.read_parquet(tmp_path / "run" / "results.parquet")["head"]) == {"avg", "abmilp"}
    capsys.readouterr()
    assert main([*base, "--heads", "avg,cls", "--cache", "--out", str(tmp_path / "bad")]) == 2
    assert "cls need a [cls] token" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "cache").exists()  # refused before extracting anything


def test_table_keeps_runs_on_two_datasets_apart(tmp_path):
    """Two `folder` runs of one model on different data roots are two tasks, not one average or one best lr."""
    import json

    for name, scores in (("flowers", [90.0, 92.0]), ("cars", [40.0, 44.0])):
        run = tmp_path / "runs" / name
        write_run(run, "mae-vit-b16", "folder", {"abmilp": scores})
        (run / "results.json").write_text(json.dumps({"data": {"task": "folder", "root": f"/data/{name}"}}))
    out = tmp_path / "t.csv"
    assert main(["table", str(tmp_path / "runs"), "--out", str(out)]) == 0
    summary = pd.read_csv(out).set_index("task")
    assert sorted(summary.index) == ["folder (cars)", "folder (flowers)"]
    assert summary.loc["folder (flowers)", "mean"] == pytest.approx(91.0)
    assert summary.loc["folder (cars)", "mean"] == pytest.approx(42.0)
    assert (summary["n_seeds"] == 2).all()


def test_table_bolds_the_best_per_task_and_every_head_tied_as_printed():
    import pandas as pd

    from attnflow.probes.summary import to_latex, to_markdown

    summary = pd.DataFrame({
        "model": ["mae-vit-b16"] * 5,
        "task": ["imagenet", "imagenet", "imagenet", "cub", "cub"],
        "head": ["cls", "abmilp", "fixed:cls_mean", "cls", "abmilp"],
        "lr": [0.1] * 5,
        "mean": [68.0, 71.62, 71.58, 40.0, 39.0],   # 71.62 and 71.58 both print as 71.6
        "std": [float("nan")] * 5,
        "n_seeds": [1] * 5,
    })
    md = to_markdown(summary)
    row = md.splitlines()[2]
    # ImageNet: the two heads printed as 71.6 are both best; CUB is compared on its own (40.0 beats 39.0 there,
    # although an ImageNet head is higher)
    assert row.count("**71.6**") == 2 and "**40.0**" in row and "**68.0**" not in row and "**39.0**" not in row
    assert to_latex(summary).count(r"\textbf{") == 3


@pytest.mark.parametrize("extra", [[], ["--cache"]], ids=["images", "cache"])
def test_unreadable_images_are_counted_in_results_json_and_the_summary(tmp_path, photos, capsys, extra):
    """n_train and n_val count the files; the unreadable ones among them are counted and listed, per split."""
    data = folder_task(tmp_path / "two", photos, classes=2)
    (data / "train" / "class0" / "9_truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 a download cut short")
    (data / "val" / "class1" / "9_empty.jpg").write_bytes(b"")
    out = tmp_path / "run"
    assert main(["probe", *TINY, "--task", "folder", "--data", str(data), "--out", str(out), "--heads", "cls",
                 "--epochs", "1", "--seeds", "1", "--lr", "0.1", "--holdout", "0", "--workers", "0",
                 "--no-progress", *extra]) == 0
    meta = json.loads((out / "results.json").read_text())
    assert meta["data"]["n_train"] == 9 and meta["data"]["n_val"] == 5
    assert meta["images_skipped"] == {"train": 1, "val": 1}
    assert [(s["split"], Path(s["path"]).name) for s in meta["skipped"]] == [("train", "9_truncated.jpg"),
                                                                            ("val", "9_empty.jpg")]
    assert meta["skipped"][1]["reason"] == "empty file"
    stdout = capsys.readouterr().out
    assert "skipped 2 unreadable file(s) (train 1, val 1):" in stdout and "val: " in stdout
