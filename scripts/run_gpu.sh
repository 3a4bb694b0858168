#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with gpu-pack/ carried along:
#   bash gpu-pack/run_gpu.sh [tests|bench|all] [extra bench args...]
# (the folder is wherever pack_gpu.sh put it: PACK=... scripts/pack_gpu.sh)
# Tests first (each CUDA test executable), then the benchmark. Logs go to $OUT when set.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE/.."
WHAT=${1:-all}; shift || true
LOG=${OUT:-/tmp}
export NSA_KERNEL_CACHE=${NSA_KERNEL_CACHE:-/tmp/nsa-kernels}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
status=0
if [[ $WHAT == tests || $WHAT == all ]]; then
  for t in $HERE/tests/*; do
    [[ -x $t ]] || continue
    echo "=== $t"
    "$t" --test-threads=16 --nocapture 2>&1 | tee "$LOG/$(basename "$t").log" | grep -E "^(test |seed|selection|.*rel RMS|.*panicked|thread|failures|---- )|test result" || true
    [[ ${PIPESTATUS[0]} == 0 ]] || status=1
  done
fi
if [[ $WHAT == bench || $WHAT == all ]] && [[ -x $HERE/bin/cuda_bench ]]; then
  echo "=== bench"
  $HERE/bin/cuda_bench "$@" 2>&1 | tee "$LOG/bench.log"
fi
exit $status
