"""Where the time of ``attention_stats`` goes (CUDA): torch profiler over a few batches, after a warm-up.

    python benchmarks/profile_stats.py                      # ViT-B/16 224 px, bf16, batch 256
    python benchmarks/profile_stats.py --qk-kernel torch --json out.json

Prints the kernels that take the most GPU time, for the plain forward and for the statistics run, so the
difference between the two (what the statistics add) can be read kernel by kernel.
"""
from __future__ import annotations

import argparse
import json

import timm
import torch
from torch.profiler import ProfilerActivity, profile

from attnflow.stats import attention_stats


def _top_kernels(prof, n_batches: int, limit: int) -> list[dict]:
    """The ``limit`` events with the most self GPU time, milliseconds per batch."""
    rows = []
    for event in prof.key_averages():
        self_us = getattr(event, "self_device_time_total", None)
        if self_us is None:
            self_us = getattr(event, "self_cuda_time_total", 0.0)
        if self_us > 0:
            rows.append({"name": event.key[:100], "ms_per_batch": self_us / 1000 / n_batches,
                         "calls_per_batch": event.count / n_batches})
    return sorted(rows, key=lambda row: -row["ms_per_batch"])[:limit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_base_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--qk-kernel", default="auto", choices=("auto", "triton", "torch"))
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--json")
    args = parser.parse_args()
    model = timm.create_model(args.arch, pretrained=False, num_classes=0, img_size=args.img_size).cuda().eval()
    batches = [torch.randn(args.batch, 3, args.img_size, args.img_size, device="cuda") for _ in range(args.batches)]
    kwargs = dict(device="cuda", amp="bf16", progress=False, qk_kernel=args.qk_kernel)

    def plain() -> None:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            for x in batches:
                model(x)

    report = {}
    for name, fn in (("plain", plain), ("stats", lambda: attention_stats(model, batches, **kwargs))):
        fn()  # warm-up: compilation, autotuning, the route's check
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        report[name] = _top_kernels(prof, args.batches, args.top)
        print(f"--- {name}: top GPU events, ms per batch of {args.batch}", flush=True)
        for row in report[name]:
            print(f"{row['ms_per_batch']:8.3f} ms  x{row['calls_per_batch']:<6.1f} {row['name']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
