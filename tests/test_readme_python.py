"""Every Python block of README.md runs as written, with only what cannot exist offline substituted:
random tiny weights for the downloaded checkpoint, a folder of real photos for ImageNet-val, small tokens."""

import re
from pathlib import Path

import pytest
import torch
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"

SUBSTITUTIONS = {  # README text -> offline stand-in; each must still be in the README
    'attnflow.load_model("mocov3-vit-b16", checkpoint="vit-b-300ep.pth.tar")':
        'attnflow.load_model("mocov3-vit-b16", random_init=True, depth=2, embed_dim=32, num_heads=4)',
    'attnflow.attention_stats(model, "/data/imagenet/val")':
        'attnflow.attention_stats(model, PHOTOS, workers=0, progress=False)',
    'attnflow.load_model("mae-vit-b16", checkpoint="mae_pretrain_vit_base.pth")':
        'attnflow.load_model("mae-vit-b16", random_init=True, depth=2, embed_dim=32, num_heads=4)',
    'attnflow.load_model("dino-vit-b16", checkpoint="dino_vitbase16_pretrain.pth")':
        'attnflow.load_model("dino-vit-b16", random_init=True, depth=1, embed_dim=48, num_heads=4)',
    'aggregation_statistics(mae, "/data/imagenet/val"': 'aggregation_statistics(mae, PHOTOS, progress=False',
    'head=load_head("runs/probe-mae/seed0/heads/abmilp.pt")': 'head=None',
    'read_boxes("/data/imagenet/LOC_val_solution.csv")': 'read_boxes(BOXES)',
    'localize(mae, "/data/imagenet/val", truth,': 'localize(mae, PHOTOS, truth, progress=False,',
}


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_python_blocks_run(photo_folder, tmp_path, monkeypatch):
    blocks = python_blocks()
    assert len(blocks) == 4, "README's Python blocks changed: update this test"
    code = "\n".join(blocks)
    for old, new in SUBSTITUTIONS.items():
        assert old in code, f"README no longer has {old!r}: update this test"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    from attnflow.data.transforms import eval_transform

    probe = __import__("attnflow").load_model("mocov3-vit-b16", random_init=True, depth=2, embed_dim=32, num_heads=4)
    transform = eval_transform(probe, 224)
    images = torch.stack([transform(Image.open(p).convert("RGB")) for p in sorted(photo_folder.iterdir())[:2]])
    g = torch.Generator().manual_seed(0)
    labels, val_labels = torch.arange(256) % 4, torch.arange(64) % 4
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("".join(f"{p.name},10,10,100,100\n" for p in sorted(photo_folder.iterdir())))
    env = {"PHOTOS": str(photo_folder), "BOXES": str(boxes), "images": images,
           "tokens": torch.randn(256, 5, 8, generator=g), "labels": labels,
           "val_tokens": torch.randn(64, 5, 8, generator=g), "val_labels": val_labels}
    exec(compile(code, str(README), "exec"), env)

    # what the README's comments promise
    assert list(env["df"].columns) == ["model", "block", "head", "metric", "mean", "std", "count"]
    assert env["result"].meta["images_used"] == len(list(photo_folder.iterdir()))
    assert {p.name for p in (tmp_path / "runs").iterdir()} == {f"mocov3-b16.{e}" for e in ("parquet", "csv", "json")}
    assert [tuple(m.shape) for m in env["maps"]] == [(2, 4, 197, 197)] * 2  # [B, H, N, N] per block
    assert env["tap"].layout.grid == (14, 14) and env["tap"].layout.num_prefix == 1
    assert set(env["table"]["head"]) == {"cls", "avg", "abmilp"} and (env["table"]["epoch"] == 30).all()
    assert tuple(env["features"].shape) == (2, 32) and tuple(env["weights"].shape) == (2, 196)  # [B, D], [B, P]
    # reference:NAME gives the official dino feature: weights = the reference's [cls] -> patch attention / N, not
    # renormalised, so each image's weights sum to its [cls] -> patch mass over N (docs/official-code.md)
    mass = env["weights"].sum(1) * 196
    assert ((mass > 0) & (mass <= 1 + 1e-6)).all()
    agg = env["agg"].frame
    assert set(agg["metric"]) == {"entropy", "kld"} and (agg["count"] == len(list(photo_folder.iterdir()))).all()
    scores = env["loc"].max_box_acc_v2()
    assert set(scores) == {"cls_mean"} and 0 <= scores["cls_mean"] <= 100
    assert env["loc"].frame["images"].unique().tolist() == [len(list(photo_folder.iterdir()))]
