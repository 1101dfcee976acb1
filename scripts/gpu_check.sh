#!/usr/bin/env bash
# One prepared command for a GPU machine that has torch + transformers but no network:
#   bash scripts/fetch_wheels.sh          # here, once: wheels into .whl/ (carry .whl to the GPU machine)
#   bash scripts/gpu_check.sh             # there: GPU tests, then the benchmark (JSON into $OUT or ./out)
# On a GPU box set up with `make install`, use `make bench` instead.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
timeout "${GPU_TEST_TIMEOUT:-240}" python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -25
timeout "${BENCH_TIMEOUT:-420}" python3 scripts/bench.py --random-weights --server --out "$OUT/bench.json" \
  ${BENCH_ARGS:-} 2> "$OUT/bench.log"
echo "bench exit $?"; tail -5 "$OUT/bench.log"
