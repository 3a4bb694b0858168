#!/usr/bin/env bash
# Builds the CUDA test (and benchmark) executables here and copies them into gpu-pack/, which
# travels to the GPU machine (device tool: carry ["gpu-pack"]); scripts/run_gpu.sh runs them there.
# The GPU machine has no Rust toolchain: everything is built on this side.
set -euo pipefail
cd "$(dirname "$0")/.."
# PACK: output folder (must be git-ignored); ONLY: prefix of the test targets to take (default cuda)
PACK=${PACK:-gpu-pack}
ONLY=${ONLY:-cuda}
rm -rf "$PACK"
mkdir -p "$PACK/tests" "$PACK/bin"

# test executables of the cuda feature (only the CUDA suites: the CPU ones run in CI)
cargo test -p nsa --features cuda --release --no-run --message-format=json 2>/dev/null \
  | ONLY="$ONLY" python3 -c '
import os
import json, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except Exception: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"] and m["target"]["name"].startswith(os.environ["ONLY"]):
        print(m["executable"])
' | while read -r exe; do cp "$exe" "$PACK/tests/$(basename "$exe" | sed 's/-[0-9a-f]*$//')"; done

# standalone CUDA timing programs: every crates/nsa/examples/cuda_*.rs (cuda_bench: forward,
# others: backward, decode)
for f in crates/nsa/examples/cuda_*.rs; do
  [[ -f $f ]] || continue
  ex=$(basename "$f" .rs)
  cargo build -p nsa --features cuda --release --example "$ex"
  cp "target/release/examples/$ex" "$PACK/bin/"
done

# the CLI (benchmarks), when it builds with the cuda feature
if cargo build -p nsa-cli --features cuda --release 2>/dev/null; then
  cp target/release/nsa "$PACK/bin/" 2>/dev/null || true
fi
cp scripts/run_gpu.sh "$PACK/"
# the release profile keeps debug info; the device tool carries at most 64 MiB
strip "$PACK"/tests/* "$PACK"/bin/* 2>/dev/null || true
ls -la "$PACK" "$PACK/tests" "$PACK/bin"
du -sh "$PACK"
