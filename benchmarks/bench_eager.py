"""Benchmark: the default CPU path of attention_stats (eager statistics, not compiled) against a plain forward.

Measures, in one run and on real photos (the demo's built-in photos: scikit-image, matplotlib, scikit-learn),
the wall time per batch of
  * ``plain``   - ``model(x)`` under inference_mode, timm's default fused attention;
  * ``unfused`` - the same with fused attention switched off (the cost of materialising the maps alone);
  * ``stats``   - :func:`attnflow.attention_stats` over the same batches with its defaults, as a user calls it
    (the whole call: set-up, hooks, metrics, sums, the result table); a list of fewer than 50 batches is not
    compiled, so this is the eager path;
  * ``stats_compiled`` (``--compiled``) - the same with ``compile=True``, compiled in a warm-up outside the timing;
for each run length (``--runs``, batches per run), repeated ``--repeats`` times with the three (four) measurements
interleaved in a rotating order, and reports the median of each and the ratios of the medians (stats/plain,
unfused/plain, stats/unfused), from wall time and from the process's CPU time (all threads), which a machine
loaded by other jobs disturbs less; every repeat's time is kept in the JSON.

Usage::

    python benchmarks/bench_eager.py                                  # ViT-S/16, 224 px, batch 16, runs of 2 and 8
    python benchmarks/bench_eager.py --runs 2,8 --repeats 7 --json benchmarks/results/cpu_eager_stats_2core.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable

import timm
import torch
from torch import nn

from attnflow.demo import write_photos
from attnflow.stats import attention_stats


def photo_batches(model: nn.Module, n_batches: int, batch: int, img_size: int, seed: int = 0) -> list[torch.Tensor]:
    """``n_batches`` batches of seeded random crops and flips of the built-in photos, normalised for ``model``."""
    from PIL import Image
    from torchvision import transforms as T

    cfg = timm.data.resolve_data_config({}, model=model)
    crop = T.Compose([T.RandomResizedCrop(img_size, scale=(0.35, 1.0)), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(cfg["mean"], cfg["std"])])
    with tempfile.TemporaryDirectory() as folder:
        photos = []
        for path in write_photos(folder):
            with Image.open(path) as img:
                photos.append(img.convert("RGB"))
    torch.manual_seed(seed)
    images = [crop(photos[i % len(photos)]) for i in range(n_batches * batch)]
    return [torch.stack(images[i * batch:(i + 1) * batch]) for i in range(n_batches)]


def _forward(model: nn.Module, batches: list[torch.Tensor], fused: bool) -> None:
    saved = [blk.attn.fused_attn for blk in model.blocks]
    for blk in model.blocks:
        blk.attn.fused_attn = fused and blk.attn.fused_attn
    try:
        with torch.inference_mode():
            for x in batches:
                model(x)
    finally:
        for blk, value in zip(model.blocks, saved):
            blk.attn.fused_attn = value


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds (all threads) of one call."""
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


def bench_run(model: nn.Module, batches: list[torch.Tensor], repeats: int, compiled: bool) -> dict:
    """Medians (and spreads) of seconds per batch of each measurement over one run length, interleaved."""
    n = len(batches)
    jobs: dict[str, Callable[[], object]] = {
        "plain": lambda: _forward(model, batches, fused=True),
        "unfused": lambda: _forward(model, batches, fused=False),
        "stats": lambda: attention_stats(model, batches, device="cpu", progress=False),
    }
    if compiled:
        jobs["stats_compiled"] = lambda: attention_stats(model, batches, device="cpu", progress=False, compile=True)
    for job in jobs.values():  # warm-up: allocator, caches, the compiled function
        job()
    names = list(jobs)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order: drift hits all alike
            seconds, cpu_seconds = _timed(jobs[name])
            wall[name].append(seconds / n)
            cpu[name].append(cpu_seconds / n)
    row: dict = {"n_batches": n, "images": n * len(batches[0]), "repeats": repeats}
    for prefix, times in (("", wall), ("cpu_", cpu)):
        med = {name: statistics.median(values) for name, values in times.items()}
        for name, values in times.items():
            row[f"{prefix}{name}_s_per_batch"] = med[name]
            row[f"{prefix}{name}_s_per_batch_all"] = values
        row[f"{prefix}unfused_over_plain"] = med["unfused"] / med["plain"]
        for name in names[2:]:
            row[f"{prefix}{name}_over_plain"] = med[name] / med["plain"]
            row[f"{prefix}{name}_over_unfused"] = med[name] / med["unfused"]
            # each repeat's ratio to the plain forward of the same repeat: their median is robust to drift
            row[f"{prefix}{name}_over_plain_per_repeat_median"] = statistics.median(
                s / p for s, p in zip(times[name], times["plain"]))
    return row


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--runs", default="2,8", help="batches per run (comma-separated), each measured apart")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compiled", action="store_true", help="also time compile=True (compiled in a warm-up)")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = timm.create_model(args.arch, pretrained=False, num_classes=0, img_size=args.img_size).eval()
    runs = [int(n) for n in args.runs.split(",")]
    all_batches = photo_batches(model, max(runs), args.batch, args.img_size)
    rows = []
    for n in runs:
        load_before = _load()
        row = {"arch": args.arch, "img_size": args.img_size, "batch": args.batch, "dtype": "fp32",
               "load_before": load_before} | bench_run(model, all_batches[:n], args.repeats, args.compiled)
        row["load_after"] = _load()
        rows.append(row)
        print(f"{args.arch} {args.img_size}px batch {args.batch}, {n} batches, medians of {args.repeats}: plain "
              f"{row['plain_s_per_batch'] * 1e3:.0f} ms, unfused {row['unfused_s_per_batch'] * 1e3:.0f} ms, stats "
              f"{row['stats_s_per_batch'] * 1e3:.0f} ms per batch -> stats/plain {row['stats_over_plain']:.3f}x "
              f"(per-repeat median {row['stats_over_plain_per_repeat_median']:.3f}x), unfused/plain "
              f"{row['unfused_over_plain']:.3f}x, stats/unfused {row['stats_over_unfused']:.3f}x"
              + (f"; compiled {row['stats_compiled_over_plain']:.3f}x" if "stats_compiled_over_plain" in row else "")
              + f"; CPU time: stats/plain {row['cpu_stats_over_plain']:.3f}x, unfused/plain "
                f"{row['cpu_unfused_over_plain']:.3f}x"
              + f"; load {load_before} -> {row['load_after']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"host": platform.node(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "timm": timm.__version__, "commit": _commit(), "rows": rows},
                      f, indent=2)


if __name__ == "__main__":
    main()
