"""Render the example figures in ``figures/`` from SYNTHETIC, illustrative data.

The numbers are made up to resemble the paper's curves (MAE's [cls] near the entropy bound, JEA's [cls]
becoming selective in late blocks); they are not measurements. Every file is named ``example-*`` and every
figure says "illustrative synthetic data". Real figures come from ``attnflow demo`` / ``attnflow run``.

Run from the repository root::

    python figures/make_examples.py            # writes figures/example-*.png
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import skimage.data
from PIL import Image

from attnflow.maps import patch_maps
from attnflow.plot import plot_attention_maps, plot_blocks, plot_head_maps, plot_heads, plot_metrics, plot_size_grid, save_figure
from attnflow.result import COLUMNS, Result

NOTE = "illustrative synthetic data, not measurements"
DPI = 120

# (name, method, family, size, blocks, heads); the paper's ViT-S/B/L line-up (Appendix C.1).
MODELS = [
    ("mae-vit-s16", "MAE", "MIM", "S", 12, 6), ("dino-vit-s16", "DINO", "JEA", "S", 12, 6),
    ("mocov3-vit-s16", "MoCo-v3", "JEA", "S", 12, 12), ("ibot-vit-s16", "iBOT", "JEA", "S", 12, 6),
    ("mae-ft-vit-s16", "MAE-FT", "MIM+FT", "S", 12, 6),
    ("mae-vit-b16", "MAE", "MIM", "B", 12, 12), ("dino-vit-b16", "DINO", "JEA", "B", 12, 12),
    ("mocov3-vit-b16", "MoCo-v3", "JEA", "B", 12, 12), ("ibot-vit-b16", "iBOT", "JEA", "B", 12, 12),
    ("mae-ft-vit-b16", "MAE-FT", "MIM+FT", "B", 12, 12),
    ("mae-vit-l16", "MAE", "MIM", "L", 24, 16), ("ibot-vit-l16", "iBOT", "JEA", "L", 24, 16),
    ("mae-ft-vit-l16", "MAE-FT", "MIM+FT", "L", 24, 16),
]

# Per method: late-block level of each metric (the curve ramps from an early value to it).
_CURVES = {  # metric: (early, late)
    "MAE": {"cls_self": (0.05, 0.45), "cls_patch_entropy": (5.1, 5.2), "patch_self": (0.06, 0.22),
            "patch_patch_entropy": (4.0, 3.4)},
    "MAE-FT": {"cls_self": (0.05, 0.55), "cls_patch_entropy": (5.0, 3.6), "patch_self": (0.06, 0.08),
               "patch_patch_entropy": (4.0, 3.5)},
    "DINO": {"cls_self": (0.08, 0.04), "cls_patch_entropy": (5.0, 3.1), "patch_self": (0.05, 0.04),
             "patch_patch_entropy": (4.3, 4.7)},
    "MoCo-v3": {"cls_self": (0.10, 0.06), "cls_patch_entropy": (5.1, 3.9), "patch_self": (0.06, 0.05),
                "patch_patch_entropy": (4.2, 4.9)},
    "iBOT": {"cls_self": (0.07, 0.05), "cls_patch_entropy": (5.0, 3.4), "patch_self": (0.05, 0.05),
             "patch_patch_entropy": (4.3, 4.6)},
}


def synthetic_result(seed: int = 0) -> Result:
    """A made-up :class:`Result` for every model of :data:`MODELS` (196 patches, 50 'images')."""
    rng = np.random.default_rng(seed)
    results = []
    for name, method, family, size, n_blocks, n_heads in MODELS:
        rows = []
        for metric, (early, late) in _CURVES[method].items():
            t = np.linspace(0, 1, n_blocks) ** 2.5  # changes happen mostly in the late blocks
            head_spread = 0.12 * abs(late - early) + (0.25 if "entropy" in metric else 0.02)
            for b in range(n_blocks):
                level = early + (late - early) * t[b]
                for h in range(n_heads):
                    v = level + head_spread * rng.normal() * (0.5 + t[b])
                    if "entropy" in metric:
                        v = min(v, math.log(196) - 0.005)
                    v = max(v, 0.005)
                    rows.append((name, b, h, metric, v, 0.3 * head_spread + 0.02 * v, 50))
        meta = {"model": name, "method": method, "family": family, "size": size, "label": f"{method} ViT-{size}/16",
                "n_patches": 196, "img_size": 224, "synthetic": True}
        results.append(Result(pd.DataFrame(rows, columns=COLUMNS), meta))
    return Result.concat(results)


def _crop(img: np.ndarray, size: int = 224) -> np.ndarray:
    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return np.asarray(Image.fromarray(img[top:top + s, left:left + s]).resize((size, size), Image.BICUBIC))


def synthetic_attention(rng: np.random.Generator, spots: list[tuple[float, float]], selective: bool,
                        n_heads: int = 12, grid: int = 14) -> np.ndarray:
    """A made-up ``[H, 1 + grid^2, 1 + grid^2]`` softmax attention: [cls] peaked on ``spots`` (rows, cols in
    [0, 1]) when ``selective``, almost uniform otherwise; patches attend locally."""
    yy, xx = np.mgrid[0:grid, 0:grid] + 0.5
    pos = np.stack([yy.ravel(), xx.ravel()], axis=1) / grid  # [P, 2]
    n = 1 + grid * grid
    logits = np.zeros((n_heads, n, n))
    for h in range(n_heads):
        spot = np.array(spots[h % len(spots)])
        d2 = ((pos - spot) ** 2).sum(1)
        if selective:
            cls = (4.0 + 2 * rng.random()) * np.exp(-d2 / (2 * 0.06 ** 2)) + 0.4 * rng.normal(size=len(pos))
        else:
            cls = 0.3 * np.exp(-d2 / (2 * 0.2 ** 2)) + 0.12 * rng.normal(size=len(pos))
        logits[h, 0, 1:] = cls
        logits[h, 0, 0] = 1.0 if selective else 4.5
        pd2 = ((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1)  # [P, P]
        width = 0.08 if selective else 0.05
        logits[h, 1:, 1:] = -pd2 / (2 * width ** 2) * 0.2 + 0.3 * rng.normal(size=pd2.shape)
        logits[h, 1:, 0] = 0.5
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def main(out: Path) -> list[Path]:
    """Render every example figure into ``out``; returns the written paths."""
    out.mkdir(parents=True, exist_ok=True)
    result = synthetic_result()
    vit_b = [m for m, *_rest in MODELS if m.endswith("-b16")]
    written = []

    fig = plot_metrics(result, models=vit_b, title=f"ViT-B/16, Figs. 3-6 layout ({NOTE})")
    written.append(save_figure(fig, out / "example-fig3-6-vit-b.png", dpi=DPI))

    ax = plot_blocks(result, "cls_patch_entropy", models=vit_b, band="heads",
                     title="Fig. 4 layout (illustrative synthetic data)")
    written.append(save_figure(ax.figure, out / "example-fig4-cls-patch-entropy.png", dpi=DPI))

    fig = plot_size_grid(result, title=f"ViT-S/B/L, Figs. 10-13 layout ({NOTE})")
    written.append(save_figure(fig, out / "example-fig10-13-sizes.png", dpi=DPI))

    fig = plot_heads(result, "cls_patch_entropy", models=vit_b, title=f"[cls]-patch entropy per head ({NOTE})")
    written.append(save_figure(fig, out / "example-heads-cls-patch-entropy.png", dpi=DPI))

    rng = np.random.default_rng(0)
    layout = SimpleNamespace(num_prefix=1, has_cls=True, grid=(14, 14), patch_size=(16, 16))
    images = [_crop(skimage.data.astronaut()), _crop(skimage.data.chelsea())]
    spots = [[(0.2, 0.43), (0.25, 0.82), (0.6, 0.33)], [(0.38, 0.32), (0.45, 0.81), (0.8, 0.62)]]
    maps = {
        "MAE ViT-B/16": [patch_maps(synthetic_attention(rng, s, selective=False), layout) for s in spots],
        "DINO ViT-B/16": [patch_maps(synthetic_attention(rng, s, selective=True), layout) for s in spots],
    }
    fig = plot_attention_maps(images, maps, title=f"Fig. 9 layout ({NOTE})")
    written.append(save_figure(fig, out / "example-fig9-maps.png", dpi=DPI))

    fig = plot_head_maps(images[1], maps["DINO ViT-B/16"][1], title=f"DINO-like [cls] attention per head ({NOTE})")
    written.append(save_figure(fig, out / "example-head-maps.png", dpi=DPI))
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    for path in main(parser.parse_args().out):
        print(path)
