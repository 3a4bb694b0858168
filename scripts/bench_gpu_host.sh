#!/usr/bin/env bash
# The project's benchmarks on the GPU host, in one call, side by side with the peers.
# Run from the repository root on the GPU machine with gpu-pack/ (scripts/pack_gpu.sh) and
# .whl/ (scripts/fetch_wheels.sh) carried along:
#   bash scripts/bench_gpu_host.sh [tests]
# Writes everything under $OUT/results/ and packs it as $OUT/results.tgz (the device tool
# brings back at most 8 files).
set -uo pipefail
OUT=${OUT:-/tmp/nsa-out}
R=$OUT/results
mkdir -p "$R"
P=${PACK:-gpu-pack}
DATE=$(date -u +%F)
export NSA_KERNEL_CACHE=/tmp/nsa-kernels PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$R/gpu.txt"
lscpu | grep -E "Model name|^CPU\(s\)" >> "$R/gpu.txt"
if [[ ${1:-} == tests ]]; then
  OUT=$R timeout 110 bash $P/run_gpu.sh tests > "$R/gpu-tests.log" 2>&1
  grep -E "test result|FAILED|panicked" "$R/gpu-tests.log" | head -20
fi
# forward: our sweep, merged with the peers' forward records measured earlier on this kind
timeout 60 $P/bin/nsa bench --device cuda --name h100-fwd --out-dir "$R" \
  --peers bench/results/peers-gpu-$DATE.json > "$R/h100-fwd.log" 2>&1
tail -3 "$R/h100-fwd.log"
# backward and decode timings (standalone timing binaries)
timeout 45 $P/bin/cuda_bench_bwd > "$R/h100-bwd.log" 2>&1; tail -8 "$R/h100-bwd.log"
timeout 40 $P/bin/cuda_bench_decode > "$R/h100-decode.log" 2>&1; tail -12 "$R/h100-decode.log"
# dense decode peers in the same call
timeout 60 python3 bench/peers.py --device cuda --op decode --head-dims 128:128 \
  --gqa-groups "" --budget-s 45 --out "$R/peers-decode.json" > "$R/peers-decode.log" 2>&1
grep -E "decode" "$R/peers-decode.log" | tail -24
# CPU: 16 threads, NSA vs our dense and PyTorch CPU SDPA (peer records of this host)
timeout 60 $P/bin/nsa bench --device cpu --threads 16 --ops forward,decode --lengths 8192,32768 \
  --decode 8192,65536 --decode-batch 1 --reps 3 --no-dense --name cpu --out-dir "$R" \
  --peers bench/results/peers-cpu-fwd-$DATE.json > "$R/cpu.log" 2>&1
tail -5 "$R/cpu.log"
timeout 30 $P/bin/nsa bench --device cpu --threads 16 --ops forward_backward --lengths 2048,8192 \
  --reps 1 --no-dense --name cpu-fwd-bwd --out-dir "$R" \
  --peers bench/results/peers-cpu-fb-$DATE.json > "$R/cpu-fb.log" 2>&1
tail -3 "$R/cpu-fb.log"
tar czf "$OUT/results.tgz" -C "$OUT" results
