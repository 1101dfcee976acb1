#!/usr/bin/env bash
# One prepared command for a GPU machine that has torch (+ its Triton) and transformers but no network:
#   bash scripts/fetch_wheels.sh          # here, once: wheels into .whl/ (carry .whl to the GPU machine)
#   bash scripts/gpu_check.sh             # there: GPU tests, NF4 kernel microbenchmark, engine benchmark
# Everything lands in $OUT (or ./out) as JSON and logs. On a GPU box set up with `make install`, use
# `make bench` and `python scripts/bench_nf4.py` instead.
# STEPS (default "tests nf4 bench") picks steps; add "tune" to sweep kernel configs (minutes).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
STEPS=${STEPS:-tests nf4 bench}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
step() { case " $STEPS " in *" $1 "*) return 0;; *) return 1;; esac; }
if step tests; then
  timeout "${GPU_TEST_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_nf4.py \
    > "$OUT/tests.log" 2>&1
  echo "tests exit $?"; tail -15 "$OUT/tests.log"
fi
if step nf4; then
  timeout "${NF4_TIMEOUT:-180}" python3 scripts/bench_nf4.py --out "$OUT/nf4.json" ${NF4_ARGS:-} \
    > /dev/null 2> "$OUT/nf4.log"
  echo "bench_nf4 exit $?"; grep -A40 '"table"' "$OUT/nf4.json" | head -45
fi
if step tune; then
  timeout "${TUNE_TIMEOUT:-400}" python3 scripts/bench_nf4.py --tune --m 1 --out "$OUT/tune.json" \
    ${TUNE_ARGS:-} > /dev/null 2> "$OUT/tune.log"
  echo "tune exit $?"; tail -30 "$OUT/tune.log"
fi
if step bench; then
  timeout "${BENCH_TIMEOUT:-360}" python3 scripts/bench.py --random-weights --streams "${BENCH_STREAMS:-1,32}" \
    --baseline-requests 1 --out "$OUT/bench.json" ${BENCH_ARGS:-} > /dev/null 2> "$OUT/bench.log"
  echo "bench exit $?"; tail -5 "$OUT/bench.log"
  python3 -c "import json; d=json.load(open('$OUT/bench.json')); print(json.dumps({k: d.get(k) for k in \
('errors', 'triton_vs_bnb', 'nf4_kernels')})); [print(k, n, r.get('aggregate_tok_s'), r.get('ttft_p50_ms')) \
for k, v in d.get('by_nf4_kernel', {}).items() for n, r in v.get('engine', {}).items()]" 2>&1
fi
