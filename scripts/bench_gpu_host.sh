#!/usr/bin/env bash
# The project's benchmarks on the GPU host, in one call, side by side with the peers.
# Run from the repository root on the GPU machine with gpu-pack/ (scripts/pack_gpu.sh) and
# .whl/ (scripts/fetch_wheels.sh) carried along:
#   WHAT=gpu|cpu|all bash scripts/bench_gpu_host.sh [tests]     (default all; each part fits
#   one 10-minute call of the device tool)
# Peer records measured earlier are taken from the newest bench/results/peers-{gpu,cpu-*}-*.json
# unless PEERS_GPU / PEERS_CPU_FWD / PEERS_CPU_FB name other files.
# Writes everything under $OUT/results/ and packs it as $OUT/results.tgz (the device tool
# brings back at most 8 files).
set -uo pipefail
OUT=${OUT:-/tmp/nsa-out}
R=$OUT/results
mkdir -p "$R"
P=${PACK:-gpu-pack}
WHAT=${WHAT:-all}
newest() { ls bench/results/$1-*.json 2>/dev/null | sort | tail -1; }
PEERS_GPU=${PEERS_GPU:-$(newest peers-gpu)}
PEERS_CPU_FWD=${PEERS_CPU_FWD:-$(newest peers-cpu-fwd)}
PEERS_CPU_FB=${PEERS_CPU_FB:-$(newest peers-cpu-fb)}
export NSA_KERNEL_CACHE=/tmp/nsa-kernels PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$R/gpu.txt"
lscpu | grep -E "Model name|^CPU\(s\)" >> "$R/gpu.txt"
if [[ ${1:-} == tests ]]; then
  OUT=$R timeout 110 bash $P/run_gpu.sh tests > "$R/gpu-tests.log" 2>&1
  grep -E "test result|FAILED|panicked" "$R/gpu-tests.log" | head -20
fi
if [[ $WHAT == gpu || $WHAT == all ]]; then
# forward: our sweep, merged with the peers' forward records measured earlier on this kind
timeout 60 $P/bin/nsa bench --device cuda --name h100-fwd --out-dir "$R" \
  --peers "$PEERS_GPU" > "$R/h100-fwd.log" 2>&1
tail -3 "$R/h100-fwd.log"
# backward (+ forward+backward) and decode, merged with the peers of the same ops
timeout 90 $P/bin/nsa bench --device cuda --ops backward --name h100-bwd --out-dir "$R" \
  --peers "$PEERS_GPU" > "$R/h100-bwd.log" 2>&1
tail -3 "$R/h100-bwd.log"
# dense decode peers first, so that `nsa bench` can merge them
timeout 150 python3 bench/peers.py --device cuda --op decode --head-dims 128:128 \
  --gqa-groups "" --budget-s 130 --out "$R/peers-decode.json" > "$R/peers-decode.log" 2>&1
grep -E "decode" "$R/peers-decode.log" | tail -24
timeout 90 $P/bin/nsa bench --device cuda --ops decode --name h100-decode --out-dir "$R" \
  --peers "$R/peers-decode.json" > "$R/h100-decode.log" 2>&1
tail -3 "$R/h100-decode.log"
fi
if [[ $WHAT == cpu || $WHAT == all ]]; then
# CPU: 16 threads, NSA vs our dense and PyTorch CPU SDPA (peer records of this host)
timeout 240 $P/bin/nsa bench --device cpu --threads 16 --ops forward,decode --lengths 2048,4096,8192,16384,32768 \
  --decode 8192,16384,32768,65536 --decode-batch 1 --reps 3 --name cpu --out-dir "$R" \
  --peers "$PEERS_CPU_FWD" > "$R/cpu.log" 2>&1
tail -5 "$R/cpu.log"
timeout 120 $P/bin/nsa bench --device cpu --threads 16 --ops forward_backward --lengths 2048,4096,8192 \
  --reps 1 --name cpu-fwd-bwd --out-dir "$R" \
  --peers "$PEERS_CPU_FB" > "$R/cpu-fb.log" 2>&1
tail -3 "$R/cpu-fb.log"
fi
tar czf "$OUT/results.tgz" -C "$OUT" results
