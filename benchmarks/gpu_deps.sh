#!/usr/bin/env bash
# The packages the GPU machine's image lacks (zarr 3 and its codecs: the Zarr shard writer), as wheels for
# its Python 3.12, unpacked into .gpu_deps/ (git-ignored, ~15 MB) so a device run can carry them:
#
#   bash benchmarks/gpu_deps.sh          # here, once (needs PyPI)
#   then on the GPU machine, carrying .gpu_deps:
#   PYTHONPATH=.gpu_deps python3 benchmarks/gpu_suite.py --out "$OUT/gpu_suite.json"
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
rm -rf .gpu_deps
mkdir -p .gpu_deps
python -m pip install --quiet --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --target .gpu_deps zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
du -sh .gpu_deps
