#!/usr/bin/env bash
# One prepared run on a lent GPU machine: environment, q/k kernel micro-benchmark, GPU tests, benchmark
# (ViT-B/16 bf16 batch 256, Triton and torch q/k routes).
# Usage (from the repo root): bash benchmarks/gpu_check.sh OUTDIR
set -uo pipefail
out=${1:-gpu-out}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/env.txt"
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$out/env.txt"
# the q/k kernel alone first: the quickest figure, and whether the Triton route builds on this GPU
python3 benchmarks/bench_qk_kernel.py --json "$out/bench_qk_kernel.json" 2>&1 | grep -v -i warn | tee "$out/bench_qk.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_kernels.py tests/test_tap.py tests/test_metrics.py \
    tests/test_collect.py tests/test_reducers.py 2>&1 | tail -n 25 | tee "$out/tests.txt"
python3 benchmarks/bench_stats.py --gpu-only --batches 8 --repeats 3 --json "$out/bench_gpu.json" 2>&1 \
    | grep -v -i warn | tee "$out/bench.txt"
