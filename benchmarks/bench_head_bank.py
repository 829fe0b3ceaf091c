"""Benchmark: cost of training K probe heads on one encoder pass against one head, measured in one run.

For each head set it times one micro-batch training step of the head bank (forward of every head, summed
cross-entropy, backward, gradient normalisation, one optimizer step per head) on the same tokens, and one
frozen-encoder forward that produces such tokens. It then reports

* ``step``        - time per step of the bank alone (heads only);
* ``x 1 head``    - that time over the one-head (abmilp) bank;
* ``+ encoder``   - (encoder + bank) over (encoder + one head): the real cost of K heads per image batch;
* ``vs separate`` - K separate runs, each paying the encoder, over one bank run: the saving of the bank.

Usage::

    python benchmarks/bench_head_bank.py                   # CPU: ViT-S/16 tokens, batch 32
    python benchmarks/bench_head_bank.py --gpu             # CUDA: ViT-B/16 bf16 encoder, batch 1024
    python benchmarks/bench_head_bank.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import timm
import torch

from attnflow.probes.bank import HeadBank
from attnflow.encode import TokenEncoder
from attnflow.probes.specs import parse_head_list

HEAD_SETS = {
    "abmilp (1 head)": ("abmilp", [1.0]),
    "Table 1 (4 heads)": ("cls,avg,abmilp,abmilp+cls", [1.0]),
    "Table 4 (4 AbMILP variants)": ("abmilp,abmilp-mlp-tanh,abmilp-mlp-relu,sa-abmilp", [1.0]),
    "Table 6 (abmilp, ap1, ap12)": ("abmilp,ap1,ap12", [1.0]),
    "all 9 specs": ("cls,avg,abmilp,abmilp+cls,abmilp-mlp-tanh,abmilp-mlp-relu,sa-abmilp,ap1,ap12", [1.0]),
    "Table 1 x 4 lrs (16 entries)": ("cls,avg,abmilp,abmilp+cls", [0.5, 1.0, 2.0, 4.0]),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def bench(arch: str, batch: int, device: torch.device, warmup: int, iters: int, classes: int) -> dict:
    model = timm.create_model(arch, pretrained=False, num_classes=0)
    encoder = TokenEncoder(model, device=device)
    images = torch.randn(batch, 3, 224, 224, device=device)
    tokens = encoder(images).float()  # [B, 1 + N, D]
    labels = torch.randint(0, classes, (batch,), device=device)
    t_encoder = _time(lambda: encoder(images), device, warmup, iters)
    rows = []
    for name, (specs, lrs) in HEAD_SETS.items():
        bank = HeadBank(parse_head_list(specs), lrs, dim=tokens.shape[2], num_classes=classes, has_cls=True,
                        optimizer="lars").to(device)
        bank.train()

        def step() -> None:
            bank.zero_grad()
            bank.losses(tokens, labels).sum().backward()
            bank.finish_step(batch, device)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t = _time(step, device, warmup, iters)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        rows.append({"heads": name, "entries": len(bank.entries), "step_ms": 1e3 * t, "peak_mib": peak})
    one = rows[0]["step_ms"] / 1e3
    for r in rows:
        t = r["step_ms"] / 1e3
        r["x_one_head"] = t / one
        r["with_encoder_x"] = (t_encoder + t) / (t_encoder + one)
        r["separate_over_bank"] = r["entries"] * (t_encoder + one) / (t_encoder + t)
    return {"arch": arch, "batch": batch, "device": str(device), "encoder_ms": 1e3 * t_encoder, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="CUDA, ViT-B/16, batch 1024 (bf16 encoder)")
    parser.add_argument("--arch", help="timm architecture (default vit_small_patch16_224 / vit_base_patch16_224)")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    device = torch.device("cuda" if args.gpu else "cpu")
    arch = args.arch or ("vit_base_patch16_224" if args.gpu else "vit_small_patch16_224")
    batch = args.batch or (1024 if args.gpu else 32)
    result = bench(arch, batch, device, args.warmup, args.iters, args.classes)
    result["machine"] = torch.cuda.get_device_name(device) if args.gpu else platform.processor() or "cpu"
    result["torch"] = torch.__version__
    print(f"{arch} batch {batch} on {result['machine']}: encoder forward {result['encoder_ms']:.1f} ms")
    print(f"{'heads':32s} {'entries':>7s} {'step ms':>9s} {'x 1 head':>9s} {'+ encoder':>10s} {'vs separate':>12s}"
          f" {'peak MiB':>9s}")
    for r in result["rows"]:
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        print(f"{r['heads']:32s} {r['entries']:7d} {r['step_ms']:9.2f} {r['x_one_head']:9.2f} "
              f"{r['with_encoder_x']:10.3f} {r['separate_over_bank']:12.2f} {peak:>9s}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
