#!/usr/bin/env bash
# One command for a GPU machine (no network; its own Python, torch and triton): build the CUDA
# extension, run the GPU-marked tests and every test on CUDA tensors, run the benchmarks, and
# leave logs and result tables under $OUT (default bench/results/gpu-run).
#   bash bench/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 ALIGNOPS_TEST_GPU=1
PY=${PY:-python3}
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"

# Build _C with the CUDA kernels for this GPU: editable install (maps kernels/ to alignops.kernels),
# no isolated env and no dependencies, so nothing is downloaded.
export MAX_JOBS=16
time $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
$PY -m alignops.env | tee -a "$OUT/env.txt"

# Tests: everything (CPU tests included) plus the GPU-marked ones; hypothesis gets more examples.
HYPOTHESIS_PROFILE=ci $PY -m pytest tests -q -x -p no:cacheprovider -m "not distributed" 2>&1 | tee "$OUT/tests.log" | tail -40

# Benchmarks on CUDA tensors: tables land in bench/results/<op>-<gpu>.{csv,md}.
$PY -m bench.run --device cuda --skip fused_linear 2>&1 | tee "$OUT/bench.log"
# Fused lm_head (N=8192 H=4096, V in {128256, 151936}, bf16) vs the bare GEMMs, eager, TRL's chunked
# log-probs and Liger's fused GRPO loss (the peers where installed: make bench-extras) -> also a .png
$PY -m bench.bench_fused_linear --device cuda 2>&1 | tee "$OUT/bench_fused_linear.log"
cp bench/results/*-h[12]00.* "$OUT/" 2>/dev/null || true
