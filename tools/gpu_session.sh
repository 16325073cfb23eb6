#!/usr/bin/env bash
# One device call for issue 3's GPU checks: build the CUDA extension with the machine's own torch,
# run the kernel tests natively (no interpreter) including the CUDA-graph capture, run the GPU
# benchmarks, and print the targets. Everything lands in $OUT (at most 8 files come back):
#   build.log  tests.log  bench.log  <device>_<date>_kernels.json  summary.txt
#
#   device run:  bash tools/gpu_session.sh            (timeout_s 540 leaves room for one rerun)
#
# Each step runs under its own time limit and a failing step does not stop the next one, so one
# broken piece still leaves the other measurements. The machine has no package index: it uses its
# image's torch/triton/transformers (not this repo's pins), and faiss is absent there (the CPU
# comparison with faiss runs in CI).
set -u
OUT=${OUT:-/tmp/memoir_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
PY=${PY:-python3}
tag="$($PY -c 'import torch; print(torch.cuda.get_device_name().split()[-1].lower())' 2>/dev/null || echo nogpu)_$(date +%F)"
status=0

step() {  # step NAME SECONDS LOG COMMAND...: run with a limit, append to $OUT/LOG, remember a failure
    local name=$1 limit=$2 log=$OUT/$3; shift 3
    echo "== $name (limit ${limit}s)" | tee -a "$log"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
    [ "$rc" -eq 0 ] || status=1
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
    $PY -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
} 2>&1 | tee "$OUT/build.log"
step build 240 build.log $PY setup.py build_ext --inplace
step native 30 build.log $PY -c 'from memoir_kernels._native import native_has_cuda; assert native_has_cuda(), "CUDA ops missing"; print("CUDA ops loaded")'

# Untuned tiles in the tests (one compilation per kernel variant instead of one per candidate); the
# autotuner itself is tested by test_every_autotuning_config_matches_reference, and the benchmarks tune.
step tests 180 tests.log env MEMOIR_TRITON_AUTOTUNE=0 $PY -m pytest tests/kernels -q -p no:cacheprovider -rs

# CPU-only cases (C++ search, faiss, the CPU reference of the search) are measured in CI, not here.
step bench 300 bench.log $PY -m pytest benchmarks/bench_mask_search.py benchmarks/bench_tophash.py \
    benchmarks/bench_down_proj.py benchmarks/bench_tophash_residual.py benchmarks/bench_decode.py \
    --benchmark-only -q -p no:cacheprovider \
    -k "not test_cpu_kernel and not test_faiss_binary_flat and not (bench_mask_search and test_torch_reference)" \
    --benchmark-json "$OUT/${tag}_kernels.json"

$PY tools/bench_summary.py "$OUT/${tag}_kernels.json" 2>&1 | tee "$OUT/summary.txt"
exit $status
