#!/usr/bin/env bash
# Download the pure-Python wheels that bench/peers.py needs on the GPU machine into ./.whl
# (git-ignored through .git/info/exclude). The GPU machine cannot reach any registry, so the
# wheels travel with the `run` call (carry [".whl"]) and are installed there with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#
# Requirements of the two wheels (Requires-Dist, extras skipped): einops, torch>=2.7, triton>=3.3,
# transformers>=5.6.2,<6. The GPU image already has einops, torch 2.11, triton 3.6 and
# transformers 5.17 (KINDS.md, "Python packages already there"), so nothing else is fetched.
# Keep exactly one version of each wheel in .whl: two versions stop the whole install.
set -euo pipefail

cd "$(git rev-parse --show-toplevel)"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
# Triton's on-disk cache (compiled kernels + fla's autotune results), brought back from the GPU
# machine and carried to skip fla's autotuning on the next call (bench/README.md).
grep -qx '/.triton-cache/' .git/info/exclude 2>/dev/null || echo '/.triton-cache/' >> .git/info/exclude

FLA_VERSION=0.6.0
WHEELS=("flash-linear-attention==${FLA_VERSION}" "fla-core==${FLA_VERSION}")

mkdir -p .whl
# Drop other versions of the same packages so only one of each travels.
find .whl -maxdepth 1 -name 'flash_linear_attention-*.whl' ! -name "flash_linear_attention-${FLA_VERSION}-*" -delete
find .whl -maxdepth 1 -name 'fla_core-*.whl' ! -name "fla_core-${FLA_VERSION}-*" -delete

python3 -m pip download --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "${WHEELS[@]}"

echo "wheels in .whl:"
ls -l .whl/*.whl
echo "their requirements (extras aside):"
for f in .whl/*.whl; do
    unzip -p "$f" '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed "s|^|  $(basename "$f"): |"
done
