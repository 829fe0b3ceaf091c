"""Compile the Triton q/k metrics kernel ahead of time for NVIDIA targets, without a GPU.

Triton lowers the kernel to PTX and assembles it with the ``ptxas`` it bundles, so this checks on any
machine that every autotuning config builds for the given architectures, and reports each build's registers
per thread, spilled stack bytes and shared memory (``cuobjdump -res-usage``)::

    python benchmarks/kernel_resources.py                   # sm_80 and sm_90, bf16 and fp32, every config
    python benchmarks/kernel_resources.py --arch 90 --dtype bf16 --json out.json

Run it without ``TRITON_INTERPRET`` (the interpreter replaces the compiler). Exit status 1 if a build fails.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile


def compile_config(kernel, config, *, arch: int, dtype: str, head_dim: int) -> dict:
    """Build ``kernel`` with one autotuning ``config`` for ``sm_<arch>``; resources of the cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature = {name: "i32" for name in names}
    signature.update({"Q": f"*{dtype}", "K": f"*{dtype}", "DIST": "*fp32", "OUT": "*fp32", "scale": "fp32",
                      "PATCH_H": "fp32", "PATCH_W": "fp32"})
    constants = {"HEAD_DIM": head_dim, "BLOCK_D": max(16, 1 << (head_dim - 1).bit_length()),
                 "ROUND": dtype != "fp32", "UPCAST": False, "stride_qd": 1, "stride_kd": 1, **config.kwargs}
    signature.update({name: "constexpr" for name in constants})
    aligned = ("Q", "K", "DIST", "OUT", "stride_dist", "stride_qb", "stride_qh", "stride_qn", "stride_kb", "stride_kh", "stride_kn")
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    compiled = triton.compile(ASTSource(kernel, signature, constants, attrs), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    row = {"arch": arch, "dtype": dtype, "head_dim": head_dim, **config.kwargs, "num_warps": config.num_warps,
           "num_stages": config.num_stages, "shared_bytes": compiled.metadata.shared}
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(cuobjdump):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
        fields = dict(item.split(":", 1) for line in usage.splitlines() if "REG:" in line for item in line.split())
        row |= {"registers": int(fields["REG"]), "stack_bytes": int(fields["STACK"])}
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="80,90", help="compute capabilities, comma-separated")
    parser.add_argument("--dtype", default="bf16,fp32", help="input dtypes: bf16, fp16, fp32")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--configs", type=int, default=None, help="only the first N autotuning configs")
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
                                         head_dim=args.head_dim)
                except Exception as err:  # noqa: BLE001 - report every failing build, then fail
                    failed += 1
                    print(f"sm_{arch} {dtype} {config}: FAILED {type(err).__name__}: {err}", flush=True)
                    continue
                rows.append(row)
                print(f"sm_{arch} {dtype} d={args.head_dim} BLOCK_M={row['BLOCK_M']} BLOCK_N={row['BLOCK_N']} "
                      f"{'grid' if row['DIST_FROM_GRID'] else 'read'} distances "
                      f"warps={row['num_warps']} stages={row['num_stages']}: {row.get('registers', '?')} registers, "
                      f"{row.get('stack_bytes', '?')} B stack, {row['shared_bytes']} B shared", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
