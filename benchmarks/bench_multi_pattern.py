"""Benchmark: multi-pattern AbMILP (``abmilp-kK``) next to AbMILP and attentive probing with 1 and 12 heads.

Part 1, cost at ViT-B width: for each head, its trainable parameters, the floating-point operations of one
training step's forward + backward (counted by ``torch.utils.flop_counter.FlopCounterMode``) and its measured
time on random tokens ``[batch, 1 + 196, 768]`` with 1,000 classes (the head alone: the frozen encoder's pass is
the same for every head and is not timed). Timed steps are interleaved across the heads; the best wall time, the
median and the best process CPU time (all threads) are reported, with the load average before and after: on a
shared machine compare the FLOPs first and the best times second.

Part 2, the planted XOR task of ``tests/helpers/planted_patterns.py`` (one Selective Aggregation pattern is provably at
most 75% right there, chance 50%): validation top-1 of every head trained together in one bank by ``fit_heads``,
per seed, with the settings of ``tests/probes/test_probes_multi_pattern.py``.

Usage::

    python benchmarks/bench_multi_pattern.py                              # both parts, CPU
    python benchmarks/bench_multi_pattern.py --json benchmarks/results/cpu_multi_pattern_2core.json
    python benchmarks/bench_multi_pattern.py --iters 1 --seeds 0          # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from attnflow.probes.fit import fit_heads
from attnflow.probes.heads import build_head, num_trainable
from attnflow.probes.specs import parse_head_spec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "helpers"))
from planted_patterns import xor_tokens  # noqa: E402  (the task is defined, and proved, next to its test)

HEADS = ("abmilp", "abmilp-k2", "abmilp-k4", "abmilp-k12", "abmilp-k2-mean", "abmilp-k4-mean", "abmilp-k12-mean",
         "ap1", "ap12")
PLANTED = dict(epochs=10, batch_size=128, lr=8.0, optimizer="lars", warmup_epochs=1, device="cpu")
"""The planted task's training settings (those of tests/probes/test_probes_multi_pattern.py)."""


def _step(head: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> None:
    head.zero_grad(set_to_none=True)
    F.cross_entropy(head(tokens), labels).backward()


def cost(specs: tuple[str, ...], tokens: torch.Tensor, labels: torch.Tensor, classes: int, warmup: int,
         iters: int) -> list[dict]:
    """Parameters, forward + backward FLOPs and timed training steps (train mode) of each head; the timed steps
    are interleaved across heads (round ``r`` times every head once) so that a slow spell of a shared machine
    does not land on one head; the best and the median are reported."""
    heads = {s: build_head(parse_head_spec(s), tokens.shape[2], classes, has_cls=True, seed=0).train() for s in specs}
    rows = {}
    for spec, head in heads.items():
        counter = FlopCounterMode(display=False)
        with counter:
            _step(head, tokens, labels)
        rows[spec] = {"head": spec, "params": num_trainable(head), "gflop_fwd_bwd": counter.get_total_flops() / 1e9,
                      "ms_all": [], "cpu_ms_all": []}
    for r in range(warmup + iters):
        for spec, head in heads.items():
            start, cpu = time.perf_counter(), time.process_time()
            _step(head, tokens, labels)
            if r >= warmup:
                rows[spec]["ms_all"].append(round(1e3 * (time.perf_counter() - start), 1))
                rows[spec]["cpu_ms_all"].append(round(1e3 * (time.process_time() - cpu), 1))
    for row in rows.values():
        row["ms_fwd_bwd"] = min(row["ms_all"])
        row["ms_median"] = statistics.median(row["ms_all"])
        row["cpu_ms_fwd_bwd"] = min(row["cpu_ms_all"])
    return list(rows.values())


def planted(seeds: list[int], heads: tuple[str, ...]) -> list[dict]:
    """Validation top-1 of every head on the XOR task, one bank per seed."""
    rows = []
    for seed in seeds:
        train, val = xor_tokens(2048, seed=10 * seed), xor_tokens(1024, seed=10 * seed + 1)
        start = time.perf_counter()
        frame = fit_heads(train, val, list(heads), seed=seed, **PLANTED)
        rows.append({"seed": seed, "seconds": round(time.perf_counter() - start, 1),
                     "top1": {h: round(float(a), 1) for h, a in zip(frame["head"], frame["top1"])}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=768, help="token width (ViT-B: 768)")
    parser.add_argument("--tokens", type=int, default=197, help="tokens per image, [cls] included (ViT-B/16: 197)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--iters", type=int, default=5, help="timed steps per head, interleaved (best and median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="planted-task seeds (none: skip)")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(args.batch, args.tokens, args.dim, generator=g)
    labels = torch.randint(0, args.classes, (args.batch,), generator=g)
    result = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "dim": args.dim,
              "tokens": args.tokens, "batch": args.batch, "classes": args.classes, "cost": [], "planted": []}
    print(f"heads on [{args.batch}, {args.tokens}, {args.dim}] tokens, {args.classes} classes, CPU "
          f"({result['cpus']} cores, {result['threads']} threads, torch {result['torch']})")
    print(f"{'head':18s} {'params':>11s} {'GFLOP f+b':>10s} {'best ms':>9s} {'median ms':>10s} {'CPU ms':>9s} "
          f"{'x abmilp':>9s}")
    result["load_before"] = os.getloadavg()
    result["cost"] = cost(HEADS, tokens, labels, args.classes, args.warmup, args.iters)
    result["load_after"] = os.getloadavg()
    for row in result["cost"]:
        ratio = row["ms_fwd_bwd"] / result["cost"][0]["ms_fwd_bwd"]
        print(f"{row['head']:18s} {row['params']:11,d} {row['gflop_fwd_bwd']:10.2f} {row['ms_fwd_bwd']:9.1f} "
              f"{row['ms_median']:10.1f} {row['cpu_ms_fwd_bwd']:9.1f} {ratio:9.2f}")
    print(f"load average before / after: {result['load_before'][0]:.1f} / {result['load_after'][0]:.1f}")
    if args.seeds:
        torch.set_num_threads(1)  # tiny heads: one thread is faster than waking a second
        result["planted"] = planted(args.seeds, HEADS)
        print("planted XOR task (one pattern: at most 75%, chance 50%), validation top-1 per seed:")
        for spec in HEADS:
            accs = [r["top1"][spec] for r in result["planted"]]
            print(f"{spec:18s} " + " ".join(f"{a:5.1f}" for a in accs) + f"   mean {sum(accs) / len(accs):5.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
