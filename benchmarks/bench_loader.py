"""Benchmark: the image loader on ImageNet-val-like JPEGs, and attention_stats end to end, in one run.

Writes JPEGs from the photos that ship with scikit-image, matplotlib and scikit-learn with ImageNet-val's spread:
mostly 500 px on the long side (375-500 on the short), a few much larger (up to 2,000 px), some grayscale, JPEG
quality 75-95. Then reports, on this machine:

* loader-only images/s **per core** (one process, one thread) for each decode path:
  ``pil+timm`` (PIL decode + timm's eval transform to a normalised float tensor: the exact path),
  ``fast`` (libjpeg-turbo via torchvision.io + uint8 resize and crop: :mod:`attnflow.data.decode`),
  ``pil-decode`` (PIL decode alone, a floor for any PIL-based path);
* the largest difference of every metric (dataset mean over the images, and per image) between the exact and the
  fast path, for a ViT-S/16 with random weights and with its attention sharpened (logits x 8) as trained models'
  is, the harder case;
* end to end: images/s of ``attention_stats`` over the JPEG folder (ViT-S/16, 224 px, CPU, each decode path)
  against the model alone on pre-decoded tensors.

Usage::

    python benchmarks/bench_loader.py                      # 120 JPEGs
    python benchmarks/bench_loader.py --images 400 --json benchmarks/results/cpu_loader.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import timm
import PIL
import torch
import torchvision
from PIL import Image

from attnflow.data.decode import TensorTransform
from attnflow.data.images import ImageBatch, load_rgb
from attnflow.data.transforms import eval_transform
from attnflow.demo import _photo_sources
from attnflow.metrics import METRICS, attention_metrics, patch_distances
from attnflow.stats import attention_stats
from attnflow.tap import AttentionTap


def write_jpegs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` JPEGs with ImageNet-val's spread of sizes and qualities, cropped and resized from the shipped photos."""
    rng = random.Random(seed)
    photos = [np.asarray(load()) for _, load in _photo_sources()]
    paths = []
    for i in range(n):
        img = Image.fromarray(photos[i % len(photos)]).convert("RGB")
        w, h = img.size
        box = (rng.randint(0, w // 5), rng.randint(0, h // 5), w - rng.randint(0, w // 5), h - rng.randint(0, h // 5))
        img = img.crop(box)
        long_side = 500 if rng.random() < 0.9 else rng.randint(800, 2000)   # mostly 500 px, a few much larger
        short = rng.randint(int(long_side * 0.66), long_side)
        img = img.resize((long_side, short) if rng.random() < 0.75 else (short, long_side), Image.BICUBIC)
        if rng.random() < 0.03:
            img = img.convert("L")                                              # ImageNet-val has some
        path = folder / f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        img.save(path, quality=rng.randint(75, 95))
        paths.append(path)
    return paths


def per_core(read: Callable[[Path], Any], paths: list[Path], repeats: int = 2) -> float:
    """Images per second of ``read`` in this process on one thread (best of ``repeats``)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for path in paths:
            read(path)
        best = min(best, time.perf_counter() - start)
    return len(paths) / best


def loader_rates(paths: list[Path], model: torch.nn.Module) -> dict[str, float]:
    exact = eval_transform(model, 224)
    fast = TensorTransform.of(exact)
    assert fast is not None

    def pil_timm(path: Path) -> torch.Tensor:
        return exact(load_rgb(path))

    def pil_decode(path: Path) -> Any:
        with Image.open(path) as img:
            return img.convert("RGB")

    def pil_decode_uint8_resize(path: Path) -> Any:  # the fast path's geometry after PIL's (identical) decode
        return fast.geometry(torch.from_numpy(np.asarray(load_rgb(path)).copy()).permute(2, 0, 1))

    def normalised(path: Path) -> torch.Tensor:  # fast + the conversion the device does, here on this core
        return fast.on_device(_batch(fast(path)[None]), torch.device("cpu")).images
    return {"pil+timm": per_core(pil_timm, paths), "fast": per_core(fast, paths),
            "fast incl. float conversion + normalise": per_core(normalised, paths),
            "pil-decode + uint8 resize": per_core(pil_decode_uint8_resize, paths),
            "pil-decode": per_core(pil_decode, paths)}


def _batch(images: torch.Tensor) -> ImageBatch:
    n = images.shape[0]
    return ImageBatch(images, torch.full((n,), -1), torch.arange(n), [])


def metric_differences(paths: list[Path], model: torch.nn.Module) -> dict[str, dict[str, float]]:
    """Largest |exact - fast| of each metric: of the dataset mean (over blocks and heads) and per image."""
    exact = eval_transform(model, 224)
    fast = TensorTransform.of(exact)
    assert fast is not None
    a = torch.stack([exact(load_rgb(p)) for p in paths])
    b = fast.on_device(_batch(torch.stack([fast(p) for p in paths])), torch.device("cpu")).images
    levels = float(((a - b).abs() * torch.tensor(fast.std).view(1, 3, 1, 1)).amax() * 255)
    distances = patch_distances((14, 14), (16, 16))
    out: dict[str, dict[str, float]] = {"pixels": {"max abs difference, uint8 levels": round(levels, 3)}}
    for label, sharpen in (("random weights", 1.0), ("sharpened attention x8", 8.0)):
        sharp = _sharpened(model, sharpen)
        ma, mb = _per_image_metrics(sharp, a, distances), _per_image_metrics(sharp, b, distances)  # [L, B, H, M]
        mean_diff = (ma.mean(1) - mb.mean(1)).abs().amax(dim=(0, 1))
        image_diff = (ma - mb).abs().amax(dim=(0, 1, 2))
        out[label] = {f"{m} (mean)": float(mean_diff[i]) for i, m in enumerate(METRICS)} | {
            f"{m} (per image)": float(image_diff[i]) for i, m in enumerate(METRICS)}
    return out


def _sharpened(model: torch.nn.Module, factor: float) -> torch.nn.Module:
    sharp = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()
    sharp.load_state_dict(model.state_dict())
    dim = sharp.embed_dim
    with torch.no_grad():
        for block in sharp.blocks:
            block.attn.qkv.weight[: 2 * dim] *= factor ** 0.5       # queries and keys: logits x factor
    return sharp


def _per_image_metrics(model: torch.nn.Module, images: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """``[L, B, H, M]`` metrics of every image (chunks of 16)."""
    rows: list[torch.Tensor] = []
    current: dict[int, torch.Tensor] = {}

    def keep(block: int, attn: torch.Tensor) -> None:
        current[block] = attention_metrics(attn, 1, True, distances)
    with AttentionTap(model, callback=keep), torch.inference_mode():
        for chunk in images.split(16):
            current.clear()
            model(chunk)
            rows.append(torch.stack([current[b] for b in sorted(current)]))  # [L, b, H, M]
    return torch.cat(rows, dim=1)


def end_to_end(folder: Path, paths: list[Path], model: torch.nn.Module, workers: int) -> dict[str, float]:
    """Images/s of attention_stats over the folder per decode path, and of the model alone on decoded tensors."""
    exact = eval_transform(model, 224)
    batches = torch.stack([exact(load_rgb(p)) for p in paths]).split(16)
    with torch.inference_mode():
        model(batches[0])
        start = time.perf_counter()
        for batch in batches:
            model(batch)
        alone = len(paths) / (time.perf_counter() - start)
    rates = {"model alone (pre-decoded)": alone}
    for decode in ("pil", "fast"):
        attention_stats(model, folder, batch_size=16, device="cpu", workers=workers, progress=False, limit=16,
                        decode=decode, compile=False)  # warm-up
        start = time.perf_counter()
        attention_stats(model, folder, batch_size=16, device="cpu", workers=workers, progress=False,
                        decode=decode, compile=False)
        rates[f"attention_stats, decode={decode}, workers={workers}"] = len(paths) / (time.perf_counter() - start)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=120, help="JPEGs to write (default 120)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers end to end (default 1)")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    cores = torch.get_num_threads()
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = write_jpegs(folder, args.images)
        torch.set_num_threads(1)
        rates = loader_rates(paths, model)
        differences = metric_differences(paths[:48], model)
        torch.set_num_threads(cores)
        e2e = end_to_end(folder, paths, model, args.workers)
    result = {"host": platform.node(), "cpus": cores, "torch": torch.__version__,
              "torchvision": torchvision.__version__, "pillow": PIL.__version__,
              "images": args.images, "loader_images_per_s_per_core": rates,
              "fast_over_pil_timm": rates["fast"] / rates["pil+timm"], "metric_max_abs_difference": differences,
              "end_to_end_images_per_s": e2e, "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
