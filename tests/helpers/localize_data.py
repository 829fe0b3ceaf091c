"""The tiny random-init model and the box files of the localization tests."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

KW = dict(depth=2, embed_dim=32, num_heads=4, mlp_ratio=2.0)


ARCH = "vit_small_patch16_224.dino"


MODEL = ["--model", ARCH, "--random-init", "--img-size", "64",
         *[x for k, v in KW.items() for x in ("--model-kw", f"{k}={v}")]]


def write_boxes(folder: Path, path: Path) -> dict[str, list[tuple[int, int, int, int]]]:
    """A path,x1,y1,x2,y2 file: one or two boxes per photo, one for the corrupt file, none for one photo."""
    boxes: dict[str, list[tuple[int, int, int, int]]] = {}
    photos = [p for p in sorted(folder.glob("*.JPEG")) if p.name != "ILSVRC2012_val_00000099.JPEG"]
    for i, image in enumerate(photos):
        if i == 2:
            continue  # no box: counted, not evaluated
        w, h = Image.open(image).size
        boxes[image.name] = [(w // 5, h // 6, 4 * w // 5 - 1, h - 1)]
        if i % 3 == 0:
            boxes[image.name].append((0, 0, w // 3, h // 3))
    boxes["ILSVRC2012_val_00000099.JPEG"] = [(1, 1, 10, 10)]
    lines = ["path,x1,y1,x2,y2"] + [f"{name},{','.join(map(str, b))}" for name, bs in boxes.items() for b in bs]
    path.write_text("\n".join(lines) + "\n")
    return boxes
