"""Benchmark: attention_stats vs a plain inference forward (timm's default fused attention), one run.

Reports, for each configuration, the wall time per batch of
  * ``plain``   - ``model(x)`` under inference_mode (+ autocast on GPU), fused SDPA attention;
  * ``unfused`` - the same with fused attention switched off (the cost of materialising the maps);
  * ``stats``   - :func:`attnflow.attention_stats` over the same batches (hooks + metrics + reduction);
    on CUDA with its default route (plain ViT blocks keep flash attention; the Triton kernel of
    ``attnflow.kernels.qk_metrics`` turns their queries and keys into metrics);
  * ``stats_torch_qk`` (CUDA) - the same with the metrics from q/k computed by compiled torch instead;
  * ``stats_2n`` (CUDA) - ``stats`` over twice the batches, which splits a run's time into a per-batch cost
    once it is going and a fixed cost per run;
and the ratios stats/plain and unfused/plain, images/s, and the peak memory for N and 2N batches (which
must be equal: memory does not grow with the number of images).

Usage::

    python benchmarks/bench_stats.py                       # CPU: ViT-S/16 at 224 and 448, batch 16
    python benchmarks/bench_stats.py --gpu                 # + ViT-B/16 bf16 batch 256 on CUDA
    python benchmarks/bench_stats.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import platform
import resource
import time
from contextlib import nullcontext

import timm
import torch

from attnflow.stats import attention_stats


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _time_plain(model, batches, device, dtype, unfused: bool) -> float:
    ctx = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    saved = [b.attn.fused_attn for b in model.blocks]
    if unfused:
        for b in model.blocks:
            b.attn.fused_attn = False
    try:
        with torch.inference_mode(), ctx:
            model(batches[0])
            _sync(device)
            t = time.perf_counter()
            for x in batches:
                model(x)
            _sync(device)
            return (time.perf_counter() - t) / len(batches)
    finally:
        for b, f in zip(model.blocks, saved):
            b.attn.fused_attn = f


def _time_stats(model, batches, device, amp, compile_stats, qk_kernel: str = "auto") -> tuple[float, dict]:
    """Seconds per batch, and the run's provenance (which q/k kernel ran, any fallback)."""
    kwargs = dict(device=device, amp=amp, progress=False, compile=compile_stats, qk_kernel=qk_kernel)
    attention_stats(model, batches[:2], **kwargs)  # warm-up: compilation, autotuning, the kernel's check
    _sync(device)
    t = time.perf_counter()
    result = attention_stats(model, batches, **kwargs)
    _sync(device)
    return (time.perf_counter() - t) / len(batches), result.meta


def _cpu_peak_rss(arch: str, img_size: int, batch: int, n_batches: int, compile_stats: bool) -> int:
    """Peak RSS (bytes) of a fresh process that runs attention_stats over ``n_batches`` CPU batches."""
    torch.set_num_threads(torch.get_num_threads())
    model = timm.create_model(arch, pretrained=False, num_classes=0, img_size=img_size).eval()
    x = torch.randn(batch, 3, img_size, img_size)
    attention_stats(model, (x for _ in range(n_batches)), device="cpu", progress=False, compile=compile_stats)
    return _peak_bytes(torch.device("cpu"))


def bench(arch: str, img_size: int, batch: int, n_batches: int, device: torch.device, amp: str,
          compile_stats: bool, repeats: int) -> dict:
    model = timm.create_model(arch, pretrained=False, num_classes=0, img_size=img_size).to(device).eval()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    gen = torch.Generator(device="cpu").manual_seed(0)
    batches = [torch.randn(batch, 3, img_size, img_size, generator=gen).to(device) for _ in range(n_batches)]
    rows: dict[str, list[float]] = {"plain": [], "unfused": [], "stats": []}
    if device.type == "cuda":
        rows["stats_torch_qk"] = []
        rows["stats_2n"] = []     # the same run over twice the batches: its per-batch cost and fixed cost
    meta: dict = {}
    for _ in range(repeats):  # interleave so drift affects all alike; report the best of each
        rows["plain"].append(_time_plain(model, batches, device, dtype, unfused=False))
        rows["unfused"].append(_time_plain(model, batches, device, dtype, unfused=True))
        seconds, meta = _time_stats(model, batches, device, amp, compile_stats)
        rows["stats"].append(seconds)
        if "stats_torch_qk" in rows:
            rows["stats_torch_qk"].append(_time_stats(model, batches, device, amp, compile_stats, "torch")[0])
            rows["stats_2n"].append(_time_stats(model, batches * 2, device, amp, compile_stats)[0])
    best = {k: min(v) for k, v in rows.items()}
    # memory: N batches vs 2N batches (same per-batch tensors, so only the state could grow)
    if device.type == "cuda":
        peaks = []
        for factor in (1, 2):
            torch.cuda.reset_peak_memory_stats()
            attention_stats(model, batches * factor, device=device, amp=amp, progress=False, compile=compile_stats)
            peaks.append(_peak_bytes(device))
        peak_n, peak_2n = peaks
    else:  # the process's peak RSS only grows: measure each in a fresh process
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(1) as pool:
            peak_n = pool.apply(_cpu_peak_rss, (arch, img_size, batch, n_batches, compile_stats))
        with ctx.Pool(1) as pool:
            peak_2n = pool.apply(_cpu_peak_rss, (arch, img_size, batch, 2 * n_batches, compile_stats))
    return {
        "arch": arch, "img_size": img_size, "batch": batch, "n_batches": n_batches, "device": str(device),
        "amp": amp, "compile": compile_stats,
        "plain_s_per_batch": best["plain"], "unfused_s_per_batch": best["unfused"],
        "stats_s_per_batch": best["stats"], "qk_kernel": meta.get("qk_kernel"),
        "qk_kernel_fallback": meta.get("qk_kernel_fallback"),
        "stats_over_plain": best["stats"] / best["plain"], "unfused_over_plain": best["unfused"] / best["plain"],
        "stats_images_per_s": batch / best["stats"], "plain_images_per_s": batch / best["plain"],
        "peak_mem_n_batches_mb": peak_n / 2**20, "peak_mem_2n_batches_mb": peak_2n / 2**20,
    } | ({"stats_torch_qk_s_per_batch": best["stats_torch_qk"],
          "stats_torch_qk_over_plain": best["stats_torch_qk"] / best["plain"]} if "stats_torch_qk" in best else {}) \
      | (_split_fixed_cost(best["stats"], best["stats_2n"], n_batches, best["plain"]) if "stats_2n" in best else {})


def _split_fixed_cost(per_batch_n: float, per_batch_2n: float, n_batches: int, plain: float) -> dict:
    """Per-batch cost of a run once it is going, and its fixed cost per run (set-up, the kernel's first-batch
    check, the result table), from the seconds per batch of runs over N and 2N batches:
    ``N * per_batch_n = fixed + N * marginal`` and ``2N * per_batch_2n = fixed + 2N * marginal``."""
    marginal = 2 * per_batch_2n - per_batch_n
    return {"stats_2n_s_per_batch": per_batch_2n, "stats_2n_over_plain": per_batch_2n / plain,
            "stats_marginal_s_per_batch": marginal, "stats_marginal_over_plain": marginal / plain,
            "stats_fixed_s_per_run": n_batches * (per_batch_n - marginal)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="also run ViT-B/16 bf16 batch 256 on CUDA")
    parser.add_argument("--gpu-only", action="store_true")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--sizes", default="224,448", help="CPU resolutions (comma-separated)")
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    compile_stats = not args.no_compile
    configs = []
    if not args.gpu_only:
        cpu = torch.device("cpu")
        configs += [("vit_small_patch16_224", int(size), 16, cpu, "fp32") for size in args.sizes.split(",")]
    if args.gpu or args.gpu_only:
        cuda = torch.device("cuda")
        configs += [("vit_base_patch16_224", 224, 256, cuda, "bf16")]
    rows = []
    for arch, size, batch, device, amp in configs:
        row = bench(arch, size, batch, args.batches, device, amp, compile_stats, args.repeats)
        rows.append(row)
        print(f"{arch} {size}px batch {batch} {device} {amp} compile={compile_stats}: "
              f"plain {row['plain_s_per_batch'] * 1e3:.1f} ms, unfused {row['unfused_s_per_batch'] * 1e3:.1f} ms, "
              f"stats {row['stats_s_per_batch'] * 1e3:.1f} ms per batch -> stats/plain "
              f"{row['stats_over_plain']:.3f}x (unfused/plain {row['unfused_over_plain']:.3f}x), "
              f"{row['stats_images_per_s']:.1f} img/s; peak memory {row['peak_mem_n_batches_mb']:.0f} MB "
              f"for {args.batches} batches, {row['peak_mem_2n_batches_mb']:.0f} MB for {2 * args.batches}; "
              f"q/k kernel {row['qk_kernel']}"
              + (f" (fell back: {row['qk_kernel_fallback']})" if row["qk_kernel_fallback"] else "")
              + (f"; torch q/k route {row['stats_torch_qk_over_plain']:.3f}x" if "stats_torch_qk_over_plain" in row
                 else "")
              + (f"; over {2 * args.batches} batches {row['stats_2n_over_plain']:.3f}x, per batch once running "
                 f"{row['stats_marginal_over_plain']:.3f}x, fixed {row['stats_fixed_s_per_run'] * 1e3:.0f} ms per run"
                 if "stats_marginal_over_plain" in row else ""), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
            json.dump({"host": platform.node(), "gpu": gpu, "torch": torch.__version__, "timm": timm.__version__,
                       "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
