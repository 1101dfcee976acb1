#!/usr/bin/env bash
# Download the wheels a GPU machine without network needs (scripts/gpu-wheels.txt: bitsandbytes for NF4 and the
# server's pure-Python stack) for CPython 3.12 on manylinux x86_64, into .whl/. Then, on that machine:
#   bash scripts/gpu_check.sh   (it installs .whl/*.whl into /tmp/site first; see README, "Benchmark")
# PY_VERSION and WHEEL_DIR override the target Python and the folder (tests fetch for the local Python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PY_VERSION=${PY_VERSION:-3.12}
WHEEL_DIR=${WHEEL_DIR:-.whl}
platform=(--platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
mapfile -t wheels < <(grep -v '^\s*#' scripts/gpu-wheels.txt | awk 'NF {print $1}')
$PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    "${platform[@]}" -d "$WHEEL_DIR" "${wheels[@]}"
du -sh "$WHEEL_DIR"
