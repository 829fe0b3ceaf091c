"""Micro-benchmark (CUDA): one block's metrics from q/k, Triton kernel vs compiled torch, vs the block's own
flash attention (``F.scaled_dot_product_attention``) on the same tensors.

    python benchmarks/bench_qk_kernel.py                    # ViT-B/16 224 px and 448 px, batch 256, bf16
    python benchmarks/bench_qk_kernel.py --json out.json

Prints milliseconds per call and the ratio to SDPA: what one block adds on top of the attention it taps.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from attnflow.stats import metrics_from_qk
from attnflow.kernels.qk_metrics import _kernels, qk_metrics_triton
from attnflow.kernels.route import disagreement
from attnflow.metrics import patch_distances


def _time(fn, repeats: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def bench(batch: int, heads: int, grid: int, head_dim: int, num_prefix: int, dtype: torch.dtype) -> dict:
    n = num_prefix + grid * grid
    gen = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(batch, n, 3, heads, head_dim, device="cuda", generator=gen).to(dtype).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)                                  # timm's strided views
    dist = patch_distances((grid, grid), (16, 16), "cuda")
    args = (head_dim ** -0.5, num_prefix, num_prefix > 0, dist)
    compiled = torch.compile(metrics_from_qk)
    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
        sdpa = _time(lambda: F.scaled_dot_product_attention(q, k, v))
        kernel = _time(lambda: qk_metrics_triton(q, k, *args))   # the first call autotunes
        torch_route = _time(lambda: compiled(q, k, *args))
        problem = disagreement(qk_metrics_triton(q, k, *args), compiled(q, k, *args))
    tuned = _kernels()[1]
    timings = getattr(tuned, "configs_timings", None) or {}  # Triton's autotuner: Config -> [ms, ...]
    configs = sorted(({"config": str(c), "ms": float(t[0] if isinstance(t, (list, tuple)) else t)}
                      for c, t in timings.items()), key=lambda row: row["ms"])
    return {"batch": batch, "heads": heads, "tokens": n, "head_dim": head_dim, "dtype": str(dtype),
            "sdpa_ms": sdpa, "triton_ms": kernel, "torch_ms": torch_route,
            "triton_over_sdpa": kernel / sdpa, "torch_over_sdpa": torch_route / sdpa, "disagreement": problem,
            "best_config": str(getattr(tuned, "best_config", None)), "config_ms": configs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    for grid in (14, 28):
        row = bench(args.batch, 12, grid, 64, 1, torch.bfloat16)
        rows.append(row)
        print(f"ViT-B/16 {grid * 16}px batch {args.batch} bf16: SDPA {row['sdpa_ms']:.3f} ms, Triton metrics "
              f"{row['triton_ms']:.3f} ms ({row['triton_over_sdpa']:.2f}x SDPA), torch metrics {row['torch_ms']:.3f} ms "
              f"({row['torch_over_sdpa']:.2f}x SDPA); routes agree: {row['disagreement'] is None}", flush=True)
        for config in row["config_ms"]:
            print(f"  {config['ms']:.3f} ms  {config['config']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
