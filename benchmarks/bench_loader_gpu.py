"""Benchmark: attention_stats end to end over a folder of ImageNet-val-like JPEGs, per decode path, against the
model alone (issue 16 item 5; made for a CUDA machine, runs on the CPU with tiny settings as a smoke test).

Writes ``--distinct`` JPEGs in parallel (a process pool over all cores, ``write_jpegs`` of
``benchmarks/bench_loader.py``: ImageNet-val's spread of sizes, qualities, some grayscale) and hard-links them
(copies where links fail) under ImageNet-val names until the folder holds ``--images`` files: every file is still
opened, read and decoded, so the decode cost per file is that of real files; the page cache holds the few hundred
distinct ones (a cold disk is not measured). Then, one step at a time, each printed as it completes and added to
the JSON at once (a run cut short by ``timeout`` keeps its finished steps):

* ``model alone``: a plain forward (timm's fused attention, bf16 autocast on CUDA) over pre-decoded tensors
  already on the device, as many images as the folder holds: the denominator of every ratio;
* ``stats on pre-decoded``: ``attention_stats`` over the same device tensors (no loader): the best a loader can
  reach, since the statistics themselves cost ~1.15x a plain forward on CUDA (docs/performance.md);
* ``attention_stats`` over the folder with ``decode=fast``, ``gpu`` (CUDA only) and ``pil``: images/s of the
  whole call (worker start-up, listing, every batch, the result table), after a warm-up call of one batch.

Every rate is reported with its ratio to ``model alone`` (issue 16's goal: >= 0.90 with the CPU loader on a
16-core machine, >= 0.95 with GPU decode) and to ``stats on pre-decoded``.

Usage::

    python benchmarks/bench_loader_gpu.py --json out.json                 # CUDA: 50,000 JPEGs, ViT-B/16 bf16, batch 256
    python benchmarks/bench_loader_gpu.py --images 20000 --json out.json  # shorter (benchmarks/gpu_check.sh)
    python benchmarks/bench_loader_gpu.py --device cpu --arch vit_small_patch16_224 --images 64 --batch 16  # smoke test
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import PIL
import timm
import torch
import torchvision

from attnflow.data.images import load_rgb
from attnflow.data.transforms import eval_transform
from attnflow.stats import attention_stats
from bench_loader import write_jpegs  # benchmarks/ is sys.path[0] when this script runs

DECODE_ORDER = ("fast", "gpu", "pil")
"""The end-to-end runs, the default path first (a run cut short by its time limit keeps the most important)."""


def _write_chunk(job: tuple[str, int, int]) -> list[str]:
    folder, n, seed = job
    Path(folder).mkdir(parents=True, exist_ok=True)
    return [str(p) for p in write_jpegs(Path(folder), n, seed=seed)]


def write_folder(root: Path, images: int, distinct: int, processes: int) -> tuple[Path, list[Path], dict[str, Any]]:
    """``root/val`` with ``images`` JPEG names linked to ``distinct`` JPEGs written in ``root/distinct`` by a pool of
    ``processes``; an existing ``root/val`` with exactly ``images`` files is reused. Returns the folder, the
    distinct files and what was done."""
    val, source = root / "val", root / "distinct"
    if val.is_dir() and len(os.listdir(val)) == images and source.is_dir():
        kept = sorted(source.rglob("*.JPEG"))
        return val, kept, {"reused": str(val), "distinct": len(kept)}
    start = time.perf_counter()
    distinct = min(distinct, images)
    chunks = [(str(source / f"{k:03d}"), distinct // processes + (k < distinct % processes), k)
              for k in range(processes)]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        written = [Path(p) for chunk in pool.map(_write_chunk, [c for c in chunks if c[1] > 0]) for p in chunk]
    wrote = time.perf_counter() - start
    val.mkdir(parents=True, exist_ok=True)
    copies = 0
    for i in range(images):
        target = val / f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        try:
            os.link(written[i % len(written)], target)
        except OSError:
            shutil.copyfile(written[i % len(written)], target)
            copies += 1
    how = {"distinct": len(written), "processes": processes, "write_seconds": round(wrote, 2),
           "link_seconds": round(time.perf_counter() - start - wrote, 2), "copied_not_linked": copies,
           "bytes_distinct": sum(p.stat().st_size for p in written)}
    return val, written, how


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, amp: str) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp == "bf16" else nullcontext()


def model_alone(model: torch.nn.Module, x: torch.Tensor, n_batches: int, amp: str) -> dict[str, float]:
    """Images/s of a plain forward (timm's fused attention) over ``n_batches`` copies of the device batch ``x``."""
    with torch.inference_mode(), _autocast(x.device, amp):
        for _ in range(2):
            model(x)
        _sync(x.device)
        start = time.perf_counter()
        for _ in range(n_batches):
            model(x)
        _sync(x.device)
    seconds = time.perf_counter() - start
    return {"images_per_s": n_batches * x.shape[0] / seconds, "seconds": seconds, "images": n_batches * x.shape[0]}


def _timed_stats(model: torch.nn.Module, data: Any, images: int, **kwargs: Any) -> dict[str, Any]:
    start = time.perf_counter()
    result = attention_stats(model, data, progress=False, **kwargs)
    seconds = time.perf_counter() - start
    used = int(result.meta.get("images_used", images))
    return {"images_per_s": used / seconds, "seconds": seconds, "images": used,
            "images_skipped": int(result.meta.get("images_skipped", 0)),
            **{k: result.meta[k] for k in ("decode", "qk_kernel", "qk_kernel_fallback", "dtype")
               if result.meta.get(k)}}


def stats_predecoded(model: torch.nn.Module, x: torch.Tensor, n_batches: int, amp: str) -> dict[str, Any]:
    """``attention_stats`` over ``n_batches`` copies of the device batch ``x`` (after a two-batch warm-up)."""
    opts = {"device": str(x.device), "amp": amp, "batch_size": x.shape[0]}
    start = time.perf_counter()
    attention_stats(model, [x, x], progress=False, **opts)  # compiles and autotunes for this shape
    warm = time.perf_counter() - start
    return _timed_stats(model, [x] * n_batches, n_batches * x.shape[0], **opts) | {"warm_up_seconds": warm}


def end_to_end(model: torch.nn.Module, folder: Path, images: int, decode: str, opts: dict[str, Any]) -> dict:
    """``attention_stats`` over the folder with ``decode``: one warm-up call of one batch, then the timed run."""
    start = time.perf_counter()
    attention_stats(model, folder, progress=False, decode=decode, limit=opts["batch_size"], **opts)
    warm = time.perf_counter() - start
    return _timed_stats(model, folder, images, decode=decode, **opts) | {"warm_up_seconds": warm}


def _save(result: dict, path: str | None) -> None:
    if path:
        tmp = Path(path + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(path)


def _step(result: dict, key: str, value: dict, path: str | None) -> None:
    """Add one finished step: its ratios to the model alone and to the statistics on pre-decoded tensors, then
    print it and write the JSON."""
    runs = result["images_per_s"]
    for base, name in (("model alone", "vs_model_alone"), ("stats on pre-decoded", "vs_stats_predecoded")):
        if key != base and base in runs and "images_per_s" in value:
            value[name] = round(value["images_per_s"] / runs[base]["images_per_s"], 4)
    runs[key] = {k: round(v, 4) if isinstance(v, float) else v for k, v in value.items()}
    print(f"{key}: " + ", ".join(f"{k} {v}" for k, v in runs[key].items()), flush=True)
    _save(result, path)


def _environment(args: argparse.Namespace, device: torch.device, workers: int) -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"host": platform.node(), "cpus": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "timm": timm.__version__, "pillow": PIL.__version__,
            "arch": args.arch, "img_size": 224, "batch": args.batch, "amp": "bf16" if device.type == "cuda" else "fp32",
            "workers": workers, "images": args.images, "date": time.strftime("%Y-%m-%d"), "images_per_s": {}}


def run(args: argparse.Namespace, root: Path) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    workers = args.workers if args.workers is not None else min(16, os.cpu_count() or 1)
    result = _environment(args, device, workers)
    folder, distinct, how = write_folder(root, args.images, args.distinct, os.cpu_count() or 1)
    result["jpegs"] = how | {"note": f"{args.images} files hard-linked to {len(distinct)} distinct JPEGs: every file "
                                     "is read and decoded; the distinct ones sit in the page cache"}
    print(f"jpegs: {json.dumps(result['jpegs'])}", flush=True)
    _save(result, args.json)
    torch.manual_seed(0)
    model = timm.create_model(args.arch, pretrained=False, num_classes=0).eval().to(device)
    exact = eval_transform(model, 224)
    x = torch.stack([exact(load_rgb(distinct[i % len(distinct)])) for i in range(args.batch)]).to(device)
    n_batches = -(-args.images // args.batch)
    amp = result["amp"]
    _step(result, "model alone", model_alone(model, x, n_batches, amp), args.json)
    _step(result, "stats on pre-decoded", stats_predecoded(model, x, n_batches, amp), args.json)
    del x
    opts = {"device": str(device), "amp": amp, "batch_size": args.batch, "workers": workers}
    for decode in args.decodes.split(","):
        key = f"attention_stats, decode={decode}"
        if decode == "gpu" and device.type != "cuda":
            _step(result, key, {"skipped": "decode=gpu needs a CUDA device"}, args.json)
            continue
        _step(result, key, end_to_end(model, folder, args.images, decode, opts), args.json)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000, help="JPEG files in the folder (default 50,000)")
    parser.add_argument("--distinct", type=int, default=512, help="distinct JPEGs written (default 512)")
    parser.add_argument("--arch", default="vit_base_patch16_224", help="timm architecture, random weights")
    parser.add_argument("--batch", type=int, default=256, help="batch size (default 256)")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default min(16, CPUs))")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--decodes", default=",".join(DECODE_ORDER), help="end-to-end runs, in order (default "
                        "fast,gpu,pil)")
    parser.add_argument("--dir", help="keep the JPEGs here (reused when it already holds them); default: a "
                        "temporary folder, removed at the end")
    parser.add_argument("--json", help="write the results here, after every step")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # timeout's SIGTERM: the temporary folder is removed
    if args.dir:
        run(args, Path(args.dir))
        return
    with tempfile.TemporaryDirectory(prefix="bench_loader_gpu_") as tmp:
        run(args, Path(tmp))


if __name__ == "__main__":
    main()
