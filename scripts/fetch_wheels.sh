#!/usr/bin/env bash
# Download the wheels a GPU machine without network needs (Python 3.12, manylinux x86_64) into .whl/:
# bitsandbytes for NF4, and the server's pure-Python stack for `scripts/bench.py --server`.
# Then, on that machine:  bash scripts/gpu_check.sh   (see README, "Benchmark")
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
platform=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64)
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platform[@]}" \
    -d .whl bitsandbytes==0.50.2 pydantic-core==2.50.5 rpds-py==0.30.0 websockets==17.4
$PY -m pip download -q --no-deps -d .whl starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.4 \
    annotated-types==0.7.0 typing-inspection==0.4.2 python-dotenv==1.2.4 jsonschema==4.26.0 \
    jsonschema-specifications==2025.9.1 referencing==0.37.0 attrs==25.4.0 h11==0.16.0 \
    click==8.3.1 anyio==4.16.0 idna==3.11
du -sh .whl
