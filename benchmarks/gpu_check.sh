#!/usr/bin/env bash
# One prepared run on a lent GPU machine, most important figure first, each step under its own time limit
# (8-9 minutes typically, about 10 at most): environment, the end-to-end benchmark (ViT-B/16 bf16 batch 256,
# Triton and torch q/k routes; its warm-up autotunes the kernel on this machine), the loader end to end
# (attention_stats over 20,000 ImageNet-val-like JPEGs with decode fast, gpu and pil against the model alone,
# issue 16 item 5), the kernel, GPU and GPU-decode tests, the q/k kernel micro-benchmark with the autotuner's
# timing of every config, a profile of where the time goes.
# Usage (from the repo root): bash benchmarks/gpu_check.sh OUTDIR
# The loader figure on the full 50,000 JPEGs, separately (about 2-3 minutes):
#   timeout -k 10 300 python3 benchmarks/bench_loader_gpu.py --json OUTDIR/bench_loader_gpu_50k.json
set -uo pipefail
out=${1:-gpu-out}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/env.txt"
python3 -c "import torch, timm, triton; print('torch', torch.__version__, 'timm', timm.__version__, 'triton', triton.__version__)" \
    | tee -a "$out/env.txt"
nproc | sed 's/^/cpus /' | tee -a "$out/env.txt"
timeout 130 python3 benchmarks/bench_stats.py --gpu-only --batches 16 --repeats 3 --json "$out/bench_gpu.json" 2>&1 \
    | grep -v -i warn | tee "$out/bench.txt"
# every step is printed and written to the JSON as it completes: a timeout keeps the finished ones
timeout -k 10 150 python3 benchmarks/bench_loader_gpu.py --images 20000 --json "$out/bench_loader_gpu.json" 2>&1 \
    | grep -v -i warn | tee "$out/bench_loader.txt"
# 55 tests, most of them autotuning the kernel for a new shape (compilation on the CPU): run in 8 processes
# where pytest-xdist is installed (serially, 180 s covered only 36 of them on an H200).
xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
timeout 200 python3 -m pytest -q -p no:cacheprovider $xdist tests/kernels/test_kernels.py tests/test_gpu.py tests/test_gpu_analyses.py 2>&1 | tail -n 25 \
    | tee "$out/tests.txt"
echo "pytest exit status ${PIPESTATUS[0]} (124: timed out)" | tee -a "$out/tests.txt"
timeout 80 python3 benchmarks/bench_qk_kernel.py --json "$out/bench_qk_kernel.json" 2>&1 | grep -v -i warn \
    | tee "$out/bench_qk.txt"
timeout 40 python3 benchmarks/profile_stats.py --json "$out/profile.json" 2>&1 | grep -v -i warn | tee "$out/profile.txt"
