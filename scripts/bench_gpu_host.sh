#!/usr/bin/env bash
# The project's benchmarks on the GPU host, side by side with the peers. Run from the repository
# root on the GPU machine with gpu-pack/ (scripts/pack_gpu.sh) and .whl/ (scripts/fetch_wheels.sh)
# carried along. WHAT is a comma-separated list of parts (default fwd,bwd,decode); run them in
# calls of the device tool that each stay under 10 minutes, back to back on the same machine:
#   tests   the CUDA test suites (~4-5 min)
#   peers   dense SDPA (cuDNN, flash) + fla NSA, forward and backward (~9 min)
#   peers-bwd  the backward peers the `peers` part runs out of time for: dk 192 / dv 128 at every
#           length, and the dense G sweep (HKV = 64 / G) at 64k (~5 min)
#   fwd     our forward sweep (~1 min)
#   bwd     our backward sweep, dk 128 and 192, then the G sweep at 64k (~5 min)
#   peers-decode  dense + fla decode peers (~3 min)
#   decode  our decode sweep, dk 128 and 192 (~2 min)
#   cpu     our CPU sweeps (16 threads) + torch CPU forward+backward at 16k/32k (~9.5 min)
#   fused   the fused selection backward (the default where built, NOTES-cuda-bwd.md v17): its
#           GPU test, the whole backward suite, then the per-kernel backward at 64k on the paths
#           it replaced (rows at G = 16, block-outer at G = 8..1) and on the default, back to back
#           (~5 min)
#   selrows sel_attn with 128 / 256 rows per CTA (-DSEL_FWD_ROWS, NOTES-cuda.md v19): the forward
#           suite with 256, then the forward at 8k-64k with 64 (default), 128, 256 (~3 min)
#   overlap the overlapped forward (NSA_FWD_OVERLAP=<chunks>, NOTES-cuda.md v18) and
#           backward (the default; NSA_BWD_OVERLAP=0 turns it off; NOTES-cuda-bwd.md v18): their GPU tests, the forward at
#           8k / 64k / 128k (128/128 and 192/128) sequential and with 4, 8 and 16 chunks, the
#           backward at 64k (G = 16, 4, 1) sequential / overlapped (~5 min)
#   profile Nsight Compute on the 64k kernels (G = 16, 128/128): the forward's cmp_attn, cmp_topn,
#           sel_attn, win_attn and the sequential backward's dQ, dK/dV, fused selection and merge
#           kernels, one launch each (~3 min)
#   sanitize compute-sanitizer racecheck and memcheck on the fused selection backward kernel only
#           (its GPU test, the other kernels unchecked; ~5 min)
#   kw2     the two-key-warpgroup compressed / window dK/dV kernels (NOTES-cuda-bwd.md v19): the
#           backward suite, then the 64k backward per kernel (sequential) and overlapped, with
#           them (default) and with -DBW_KM_ONE_WG (v16's CTAs), back to back (~5 min)
#   stage   the fused selection backward with asynchronous staging (NOTES-cuda-bwd.md v20): the
#           whole GPU suite, then the 64k backward per kernel (sequential) and overlapped (~6 min)
#   meta    the key-major kernels' row metadata by cp.async (NOTES-cuda-bwd.md v21): the backward
#           suite, then the 64k backward per kernel (sequential) and overlapped, with it (default)
#           and with -DBW_WG_SYNC_META, back to back (~5 min)
# Peer records: the ones this call measured, else the newest bench/results/peers-{gpu,decode,cpu-*}-*.json
# (override with PEERS_GPU / PEERS_GPU_BWD / PEERS_DECODE / PEERS_CPU_FWD / PEERS_CPU_FB). Peer
# forward+backward times are the sums of their forward and backward medians (`nsa bench` adds
# them, as for ours).
# Writes everything under $OUT/results/ and packs it as $OUT/results.tgz (the device tool brings
# back at most 8 files).
set -uo pipefail
OUT=${OUT:-/tmp/nsa-out}
R=$OUT/results
mkdir -p "$R"
P=${PACK:-gpu-pack}
WHAT=,${WHAT:-fwd,bwd,decode},
has() { [[ $WHAT == *,$1,* ]]; }
newest() { ls bench/results/$1-20[0-9][0-9]-*.json 2>/dev/null | sort | tail -1; }
export NSA_KERNEL_CACHE=/tmp/nsa-kernels PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$R/gpu.txt"
lscpu | grep -E "Model name|^CPU\(s\)" >> "$R/gpu.txt"
if has tests; then
  OUT=$R timeout 420 bash $P/run_gpu.sh tests > "$R/gpu-tests.log" 2>&1
  grep -E "test result|FAILED|panicked" "$R/gpu-tests.log" | head -20
fi
if has peers; then
  timeout 560 python3 bench/peers.py --device cuda --op forward,backward --budget-s 540 \
    --out "$R/peers-gpu.json" > "$R/peers-gpu.log" 2>&1
  grep -E "forward|backward" "$R/peers-gpu.log" | tail -40
fi
PEERS_GPU=${PEERS_GPU:-$( [[ -f $R/peers-gpu.json ]] && echo $R/peers-gpu.json || newest peers-gpu)}
# (PEERS_BWD_LENGTHS / PEERS_BWD_NAME split the 192/128 lengths over calls; PEERS_BWD_G=0 skips
# the G sweep; PEERS_EXTRA: more peer files for the backward part, space-separated)
PB_NAME=${PEERS_BWD_NAME:-peers-gpu-bwd}
if has peers-bwd; then
  timeout 320 python3 bench/peers.py --device cuda --op backward --head-dims 192:128 \
    --lengths "${PEERS_BWD_LENGTHS:-8192,16384,32768,65536,131072}" \
    --gqa-groups "" --impls torch-sdpa-cudnn,fla-nsa --budget-s 200 --no-check \
    --out "$R/$PB_NAME.json" > "$R/$PB_NAME.log" 2>&1
  grep -E "backward" "$R/$PB_NAME.log" | tail -12
  if [[ ${PEERS_BWD_G:-1} == 1 ]]; then
    timeout 110 python3 bench/peers.py --device cuda --op backward --head-dims 128:128 \
      --lengths "" --gqa-groups 1,2,4,8 --impls torch-sdpa-cudnn,torch-sdpa-flash --budget-s 90 --no-check \
      --out "$R/peers-gpu-bwd-g.json" > "$R/peers-gpu-bwd-g.log" 2>&1
    grep -E "backward" "$R/peers-gpu-bwd-g.log" | tail -8
  fi
fi
PEERS_GPU_BWD=${PEERS_GPU_BWD:-$( [[ -f $R/$PB_NAME.json ]] && echo $R/$PB_NAME.json || newest peers-gpu-bwd)}
PEERS_GPU_BWD_G=${PEERS_GPU_BWD_G:-$( [[ -f $R/peers-gpu-bwd-g.json ]] && echo $R/peers-gpu-bwd-g.json || newest peers-gpu-bwd-g)}
# `--peers` for each peer file that exists
peer_args() { for f in "$@"; do [[ -n $f && -f $f ]] && printf -- '--peers\n%s\n' "$f"; done; }
if has fwd; then
  mapfile -t PA < <(peer_args "$PEERS_GPU")
  timeout 80 $P/bin/nsa bench --device cuda --name h100-fwd --out-dir "$R" \
    "${PA[@]}" > "$R/h100-fwd.log" 2>&1
  tail -3 "$R/h100-fwd.log"
fi
if has bwd; then
  # shellcheck disable=SC2086
  mapfile -t PA < <(peer_args "$PEERS_GPU" "$PEERS_GPU_BWD" "$PEERS_GPU_BWD_G" ${PEERS_EXTRA:-})
  timeout 330 $P/bin/nsa bench --device cuda --ops backward --name h100-bwd --out-dir "$R" \
    "${PA[@]}" > "$R/h100-bwd.log" 2>&1
  tail -3 "$R/h100-bwd.log"
fi
if has peers-decode; then
  # dense (and fla) decode peers, merged by `nsa bench` in the decode part
  timeout 170 python3 bench/peers.py --device cuda --op decode --gqa-groups "" --budget-s 150 \
    --out "$R/peers-decode.json" > "$R/peers-decode.log" 2>&1
  grep -E "decode" "$R/peers-decode.log" | tail -24
fi
if has decode; then
  PEERS_DECODE=${PEERS_DECODE:-$( [[ -f $R/peers-decode.json ]] && echo $R/peers-decode.json || newest peers-decode)}
  mapfile -t PA < <(peer_args "$PEERS_DECODE")
  timeout 150 $P/bin/nsa bench --device cuda --ops decode --name h100-decode --out-dir "$R" \
    "${PA[@]}" > "$R/h100-decode.log" 2>&1
  tail -3 "$R/h100-decode.log"
fi
if has cpu; then
  PEERS_CPU_FWD=${PEERS_CPU_FWD:-$(newest peers-cpu-fwd)}
  PEERS_CPU_FB=${PEERS_CPU_FB:-$(newest peers-cpu-fb)}
  # torch CPU forward+backward at the lengths the earlier peer file lacks (one rep each)
  timeout 150 python3 bench/peers.py --device cpu --op forward_backward --lengths 16384,32768 \
    --threads 16 --min-reps 1 --rep-ms 1 --budget-s 130 --out "$R/peers-cpu-fb-long.json" \
    > "$R/peers-cpu-fb-long.log" 2>&1
  tail -4 "$R/peers-cpu-fb-long.log"
  # CPU: 16 threads, NSA vs our dense and PyTorch CPU SDPA (peer records of this host)
  timeout 250 $P/bin/nsa bench --device cpu --threads 16 --ops forward,decode \
    --lengths 2048,4096,8192,16384,32768 --decode 8192,16384,32768,65536 --decode-batch 1 \
    --reps 3 --name cpu --out-dir "$R" --peers "$PEERS_CPU_FWD" > "$R/cpu.log" 2>&1
  tail -5 "$R/cpu.log"
  timeout 110 $P/bin/nsa bench --device cpu --threads 16 --ops forward_backward \
    --lengths 2048,4096,8192,16384 --reps 1 --name cpu-fwd-bwd --out-dir "$R" \
    --peers "$PEERS_CPU_FB" --peers "$R/peers-cpu-fb-long.json" > "$R/cpu-fb.log" 2>&1
  tail -3 "$R/cpu-fb.log"
  # 32k without our dense baseline (one dense forward+backward there takes ~45 s)
  timeout 60 $P/bin/nsa bench --device cpu --threads 16 --ops forward_backward \
    --lengths 32768 --no-dense --reps 1 --name cpu-fwd-bwd-32k --out-dir "$R" \
    --peers "$R/peers-cpu-fb-long.json" > "$R/cpu-fb-32k.log" 2>&1
  tail -3 "$R/cpu-fb-32k.log"
fi
if has fused; then
  timeout 100 $P/tests/cuda_backward --test-threads=16 --nocapture bwd_fused_selection_path \
    > "$R/fused-test.log" 2>&1
  grep -E "test result|panicked|rel RMS .*(dq|dk_slc|dv_slc)" "$R/fused-test.log" | tail -24
  timeout 150 $P/tests/cuda_backward --test-threads=16 > "$R/fused-suite.log" 2>&1
  grep -E "test result|panicked" "$R/fused-suite.log" | tail -6
  NSA_SEL_DQ_PATH=rows timeout 60 $P/bin/cuda_bench_bwd 65536 > "$R/bwd-rows.log" 2>&1
  NSA_SEL_DQ_PATH=block timeout 100 $P/bin/cuda_bench_bwd 65536 --g-list=8,4,2,1 > "$R/bwd-block.log" 2>&1
  timeout 120 $P/bin/cuda_bench_bwd 65536 --g-list=16,8,4,2,1 > "$R/bwd-fused.log" 2>&1
  for f in rows block fused; do echo "== $f"; tail -6 "$R/bwd-$f.log"; done
fi
if has selrows; then
  NSA_CUDA_DEFINES=-DSEL_FWD_ROWS=256 timeout 150 $P/tests/cuda_forward --test-threads=16 \
    > "$R/selrows-tests.log" 2>&1
  grep -E "test result|panicked" "$R/selrows-tests.log" | tail -4
  for rows in 64 128 256; do
    NSA_CUDA_DEFINES=-DSEL_FWD_ROWS=$rows timeout 60 $P/bin/cuda_bench 8192,16384,32768,65536 \
      > "$R/fwd-selrows$rows.log" 2>&1
    echo "== $rows rows"; tail -6 "$R/fwd-selrows$rows.log"
  done
fi
if has overlap; then
  timeout 60 $P/tests/cuda_forward --test-threads=16 --nocapture overlapped_forward \
    > "$R/overlap-test.log" 2>&1
  grep -E "test result|panicked|bitwise" "$R/overlap-test.log" | tail -8
  for chunks in 0 4 8 16; do
    NSA_FWD_OVERLAP=$chunks timeout 40 $P/bin/cuda_bench 8192,65536,131072 > "$R/fwd-ov$chunks.log" 2>&1
    NSA_FWD_OVERLAP=$chunks timeout 40 $P/bin/cuda_bench 65536 --dk192 > "$R/fwd-ov$chunks-192.log" 2>&1
    echo "== $chunks chunks"; grep -E "total|T =|ms" "$R/fwd-ov$chunks.log" "$R/fwd-ov$chunks-192.log" | tail -8
  done
  timeout 120 $P/tests/cuda_backward --test-threads=16 --nocapture bwd_overlapped \
    > "$R/bwd-overlap-test.log" 2>&1
  grep -E "test result|panicked|bitwise" "$R/bwd-overlap-test.log" | tail -8
  for v in 0 1; do
    NSA_BWD_OVERLAP=$v timeout 100 $P/bin/cuda_bench_bwd 65536 --g-list=16,4,1 > "$R/bwd-ov$v.log" 2>&1
    echo "== backward overlap $v"; tail -8 "$R/bwd-ov$v.log"
  done
fi
if has profile; then
  NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
  SECT=(--section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis
    --section Occupancy --section WarpStateStats --section SchedulerStats --section LaunchStats)
  timeout 200 $NCU --clock-control none "${SECT[@]}" -k 'regex:^(cmp_attn|cmp_topn|sel_attn|win_attn)$' \
    -c 4 $P/bin/cuda_bench 65536 > "$R/ncu-fwd.log" 2>&1
  grep -E "^  [a-z_]+|Duration|Throughput|Pipe|Warp Cycles|Achieved Occ|Registers|Shared Memory Config" \
    "$R/ncu-fwd.log" | head -60
  NSA_BWD_OVERLAP=0 timeout 280 $NCU --clock-control none "${SECT[@]}" \
    -k 'regex:^(cmp_bwd_dq_saved|cmp_bwd_dkdv|win_bwd_dq_saved|win_bwd_dkdv|sel_bwd_dkdv_dq|selb_dq_merge)$' \
    -c 6 $P/bin/cuda_bench_bwd 65536 --g-list=16 > "$R/ncu-bwd.log" 2>&1
  grep -E "^  [a-z_]+|Duration|Throughput|Warp Cycles|Achieved Occ|Registers" "$R/ncu-bwd.log" | head -60
fi
if has sanitize; then
  CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  for tool in racecheck memcheck; do
    timeout 200 $CS --tool $tool --kernel-name kns=sel_bwd_dkdv_dq $P/tests/cuda_backward \
      --test-threads=1 bwd_fused_selection_path > "$R/sanitize-$tool.log" 2>&1
    echo "== $tool rc=$?"; tail -5 "$R/sanitize-$tool.log"
  done
fi
# bwd_ab NAME DEFINE: the backward suite, then the 64k backward per kernel (sequential) and
# overlapped (G = 16, 4, 1), by default and with NSA_CUDA_DEFINES=DEFINE, back to back
bwd_ab() {
  timeout 200 $P/tests/cuda_backward --test-threads=16 > "$R/$1-suite.log" 2>&1
  grep -E "test result|panicked|FAILED" "$R/$1-suite.log" | tail -8
  for d in "" "$2"; do
    v=$( [[ -z $d ]] && echo default || echo "${d#-D}" )
    NSA_CUDA_DEFINES=$d NSA_BWD_OVERLAP=0 timeout 60 $P/bin/cuda_bench_bwd 65536 > "$R/$1-$v-seq.log" 2>&1
    NSA_CUDA_DEFINES=$d timeout 80 $P/bin/cuda_bench_bwd 65536 --g-list=16,4,1 > "$R/$1-$v-ov.log" 2>&1
    echo "== $1 $v"; tail -1 "$R/$1-$v-seq.log"; tail -3 "$R/$1-$v-ov.log"
  done
}
if has kw2; then bwd_ab kw2 -DBW_KM_ONE_WG; fi
if has stage; then
  OUT=$R timeout 330 bash $P/run_gpu.sh tests > "$R/gpu-tests.log" 2>&1
  grep -E "test result|FAILED|panicked" "$R/gpu-tests.log" | head -20
  NSA_BWD_OVERLAP=0 timeout 60 $P/bin/cuda_bench_bwd 65536 > "$R/stage-seq.log" 2>&1
  timeout 80 $P/bin/cuda_bench_bwd 65536 --g-list=16,4,1 > "$R/stage-ov.log" 2>&1
  tail -3 "$R/stage-seq.log"; tail -4 "$R/stage-ov.log"
fi
if has meta; then bwd_ab meta -DBW_WG_SYNC_META; fi
tar czf "$OUT/results.tgz" -C "$OUT" results
