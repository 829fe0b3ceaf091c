"""Compile the Triton q/k metrics kernel ahead of time for NVIDIA targets, without a GPU.

Triton lowers the kernel to PTX and assembles it with the ``ptxas`` it bundles, so this checks on any
machine that every autotuning config builds for the given architectures, and reports each build's registers
per thread, spilled stack bytes and shared memory (``cuobjdump -res-usage``)::

    python benchmarks/kernel_resources.py                   # sm_80 and sm_90, bf16 and fp32, every config
    python benchmarks/kernel_resources.py --arch 90 --dtype bf16 --json out.json
    python benchmarks/kernel_resources.py --arch 90 --dtype bf16 --pipes   # + a static model of the hot loop

``--pipes`` reads the hot loop's SASS (``nvdisasm``) and reports, per pipe, the SM cycles its instructions
need per 1000 logits at that pipe's issue rate: which unit bounds the loop, and by how much a change moves
it, before any GPU times it.

Run it without ``TRITON_INTERPRET`` (the interpreter replaces the compiler). Exit status 1 if a build fails.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile


# Issue rates per SM and clock of the units each SASS opcode runs on (threads, i.e. lanes), Hopper-class
# (CUDA C++ Programming Guide, "Arithmetic Instructions"; Nsight Compute's pipe names): fp32 add/multiply/FMA
# 128, integer and compare/select/min-max ("alu") 64, the transcendental and conversion unit ("xu": MUFU,
# fp32 <-> 16-bit and rounding conversions; F2FP's unit is undocumented, counted there too) 16, shared/global
# memory and shuffles ("lsu") 32. Opcodes in none of these (tensor cores, uniform datapath, branches) are
# not counted.
PIPES = {"fma": (128, ("FFMA", "FADD", "FMUL", "IMAD", "HFMA2", "HADD2", "HMUL2")),
         "alu": (64, ("FMNMX", "FSEL", "FSETP", "ISETP", "IADD3", "LOP3", "SHF", "SEL", "LEA", "I2FP", "PRMT",
                      "IABS", "IMNMX", "FCHK", "VIADD", "VIMNMX")),
         "xu": (16, ("MUFU", "F2F", "FRND", "F2I", "I2F", "F2FP")),
         "lsu": (32, ("LDG", "LDS", "LDSM", "STS", "STG", "SHFL", "LDGSTS", "LD", "ST"))}


def hot_loop_pipes(cubin: bytes, elements_per_thread: int) -> dict:
    """Static throughput model of the kernel's hottest loop, read from its SASS (``nvdisasm``).

    The hot loop is the longest innermost loop with at least ``elements_per_thread`` ``MUFU.EX2`` (one
    exponential per logit of a full key tile of each head). Returns its opcode counts and, per pipe, the SM
    clock cycles that its instructions need per 1000 logits at the pipe's issue rate (:data:`PIPES`): the
    largest is the loop's bound if nothing else (latency, memory) limits it. A model, not a measurement."""
    import re
    from collections import Counter

    import triton

    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
    body: list[tuple[str | None, str]] = []              # (label defined here, opcode) in program order
    label = None
    for line in text.splitlines():
        if (m := re.match(r"^(\.L_x_\d+):", line)):
            label = m.group(1)
        elif (m := re.match(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*);", line)):
            body.append((label, m.group(1) + m.group(2)))
            label = None
    starts = {lab: i for i, (lab, _) in enumerate(body) if lab}
    loops = []                                             # (first, last) instruction of each backward branch
    for i, (_, ins) in enumerate(body):
        if ins.startswith("BRA") and (m := re.search(r"(\.L_x_\d+)", ins)) and starts.get(m.group(1), i + 1) <= i:
            loops.append((starts[m.group(1)], i))
    innermost = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    for a, b in sorted(innermost, key=lambda ab: ab[1] - ab[0], reverse=True):
        # opcodes without modifiers, but MUFU by function (EX2, SQRT, ...)
        ops = Counter(".".join(ins.split()[0].split(".")[:2 if ins.startswith("MUFU") else 1])
                      for _, ins in body[a:b + 1])
        if sum(1 for _, ins in body[a:b + 1] if ins.startswith("MUFU.EX2")) >= elements_per_thread:
            per_k = {pipe: 1000 * sum(n for op, n in ops.items() if op.split(".")[0] in names)
                     / elements_per_thread / rate for pipe, (rate, names) in PIPES.items()}
            return {"instructions": b - a + 1, "opcodes": dict(ops.most_common()),
                    "sm_cycles_per_1000_logits": {k: round(v, 2) for k, v in per_k.items()},
                    "bound": max(per_k, key=per_k.get)}
    return {}


def compile_config(kernel, config, *, arch: int, dtype: str, head_dim: int, pipes: bool = False) -> dict:
    """Build ``kernel`` with one autotuning ``config`` for ``sm_<arch>``; resources of the cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature = {name: "i32" for name in names}
    signature.update({"Q": f"*{dtype}", "K": f"*{dtype}", "DIST": "*fp32", "COORDS": "*fp32", "OUT": "*fp32",
                      "scale": "fp32"})
    constants = {"HEAD_DIM": head_dim, "BLOCK_D": max(16, 1 << (head_dim - 1).bit_length()),
                 "ROUND": dtype != "fp32", "UPCAST": False, "stride_qd": 1, "stride_kd": 1, **config.kwargs}
    signature.update({name: "constexpr" for name in constants})
    aligned = ("Q", "K", "DIST", "COORDS", "OUT", "stride_dist", "stride_coord", "stride_qb", "stride_qh", "stride_qn",
               "stride_kb", "stride_kh", "stride_kn")
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    compiled = triton.compile(ASTSource(kernel, signature, constants, attrs), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages,
                                       **({"maxnreg": config.maxnreg} if config.maxnreg else {})})
    row = {"arch": arch, "dtype": dtype, "head_dim": head_dim, **config.kwargs, "num_warps": config.num_warps,
           "num_stages": config.num_stages, "maxnreg": config.maxnreg, "shared_bytes": compiled.metadata.shared}
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(cuobjdump):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
        fields = dict(item.split(":", 1) for line in usage.splitlines() if "REG:" in line for item in line.split())
        row |= {"registers": int(fields["REG"]), "stack_bytes": int(fields["STACK"])}
    if pipes:
        # logits per thread and hot-loop iteration: a full key tile of each head of the program
        elements = (config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] * config.kwargs.get("HEADS", 1)
                    // (32 * config.num_warps))
        row["hot_loop"] = hot_loop_pipes(compiled.asm["cubin"], elements)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="80,90", help="compute capabilities, comma-separated")
    parser.add_argument("--dtype", default="bf16,fp32", help="input dtypes: bf16, fp16, fp32")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--configs", type=int, default=None, help="only the first N autotuning configs")
    parser.add_argument("--pipes", action="store_true",
                        help="also model the hot loop's SASS: SM cycles per 1000 logits on each pipe")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter does not compile kernels", file=sys.stderr)
        return 2
    from attnflow.kernels import qk_metrics

    if qk_metrics.triton is None:
        print("Triton is not installed", file=sys.stderr)
        return 2
    rows, failed = [], 0
    for arch in (int(a) for a in args.arch.split(",")):
        for dtype in args.dtype.split(","):
            for config in qk_metrics._CONFIGS[:args.configs]:
                try:
                    row = compile_config(qk_metrics.qk_metrics_kernel, config, arch=arch, dtype=dtype,
                                         head_dim=args.head_dim, pipes=args.pipes)
                except Exception as err:  # noqa: BLE001 - report every failing build, then fail
                    failed += 1
                    print(f"sm_{arch} {dtype} {config}: FAILED {type(err).__name__}: {err}", flush=True)
                    continue
                rows.append(row)
                print(f"sm_{arch} {dtype} d={args.head_dim} BLOCK_M={row['BLOCK_M']} BLOCK_N={row['BLOCK_N']} "
                      f"heads={row['HEADS']} "
                      f"{'grid' if row['DIST_FROM_GRID'] else 'read'} distances "
                      f"warps={row['num_warps']} stages={row['num_stages']}: {row.get('registers', '?')} registers, "
                      f"{row.get('stack_bytes', '?')} B stack, {row['shared_bytes']} B shared", flush=True)
                if row.get("hot_loop"):
                    cycles = row["hot_loop"]["sm_cycles_per_1000_logits"]
                    print("    hot loop, SM cycles per 1000 logits: "
                          + ", ".join(f"{pipe} {c:.1f}" for pipe, c in cycles.items())
                          + f" (bound: {row['hot_loop']['bound']})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
