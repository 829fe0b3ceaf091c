"""A fake CUB-200-2011 release tree and the tiny probe command run on it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from attnflow.cli import main

CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]

TINY = ["--model", "vit_small_patch16_224", "--random-init", "--img-size", "32", "--model-kw", "depth=2",
        "--model-kw", "embed_dim=32", "--model-kw", "num_heads=4", "--model-kw", "mlp_ratio=2.0"]


def write_cub_tree(tmp_path: Path, photos: dict[str, np.ndarray]) -> Path:
    """A CUB-200-2011 release tree with 12 images: 8 train, 4 test, 3 classes (the ``cub`` fixture)."""
    root = tmp_path / "CUB_200_2011"
    keys = sorted(photos)
    rows = []
    for i in range(1, 13):
        cls = (i - 1) % 3 + 1
        rel = f"{CLASSES[cls - 1]}/img_{i:04d}.jpg"
        path = root / "images" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(photos[keys[i % len(keys)]]).resize((40, 36)).save(buf, format="JPEG")
        path.write_bytes(buf.getvalue())
        rows.append((i, rel, int(i <= 8), cls))
    (root / "images.txt").write_text("".join(f"{i} {rel}\n" for i, rel, _, _ in rows))
    (root / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, t, _ in rows))
    (root / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, _, c in rows))
    (root / "classes.txt").write_text("".join(f"{k} {name}\n" for k, name in enumerate(CLASSES, start=1)))
    return root


def probe(cub: Path, out: Path, *extra: str) -> int:
    torch.manual_seed(0)  # the random-init encoder must be the same model in every call
    return main(["probe", *TINY, "--task", "cub", "--data", str(cub), "--out", str(out), "--heads",
                 "cls,avg,abmilp,ap1", "--seeds", "2", "--epochs", "2", "--batch-size", "4", "--micro-batch", "2",
                 "--lr", "0.5", "--warmup-epochs", "1", "--workers", "0", "--no-progress", *extra])
