#!/usr/bin/env bash
# One prepared command for a GPU machine that has torch (+ its Triton) and transformers but no network.
#
#   Here, once:   bash scripts/fetch_wheels.sh      (wheels of scripts/gpu-wheels.txt into .whl/, ~46 MB)
#   There:        bash scripts/gpu_check.sh         (device tool: carry [".whl"]; results land in $OUT)
#   CPU dry run:  bash scripts/gpu_check.sh         (no CUDA: every step runs small, what needs CUDA skips)
#   The plan:     PLAN_ONLY=1 bash scripts/gpu_check.sh
#
# Steps (STEPS picks them, default "imports tests nf4 bench"; "tune" sweeps kernel configs and is not default).
# Each step has a time budget (its *_TIMEOUT); the defaults add up to under 540 s so that one 600-s device
# command runs them all with time left to copy the results. After each step its results JSON is printed, so a
# command stopped at its limit still shows what finished. On a GPU box set up with `make install`, use
# `make bench` and `python scripts/bench_nf4.py` instead.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
STEPS=${STEPS:-imports tests nf4 bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing .whl/*.whl failed"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
PY=${PYTHON:-python3}
if $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  GPU=1
  nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
else
  GPU=0
  export TRITON_INTERPRET=1  # the kernels run in Triton's interpreter; tiny shapes only
  echo "no CUDA GPU: dry run (tiny shapes; GPU-only tests skip)"
fi
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

declare -A BUDGET=([imports]=${IMPORTS_TIMEOUT:-40} [tests]=${GPU_TEST_TIMEOUT:-150} [nf4]=${NF4_TIMEOUT:-120}
                   [bench]=${BENCH_TIMEOUT:-220} [tune]=${TUNE_TIMEOUT:-400})
total=0
for s in $STEPS; do total=$((total + ${BUDGET[$s]:-0})); done
echo "steps: $STEPS; time budget ${total} s in all ($(for s in $STEPS; do printf '%s %ss, ' "$s" "${BUDGET[$s]:-?}"; done))"
[ -n "${PLAN_ONLY:-}" ] && exit 0  # (tests) print the plan and its budget only
step() { case " $STEPS " in *" $1 "*) return 0;; *) return 1;; esac; }
show() { [ -s "$1" ] && $PY -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1])), separators=(',',':'))[:${2:-4000}])" "$1"; }

if step imports; then  # a missing or incompatible carried wheel fails here, in seconds, with its name
  timeout "${BUDGET[imports]}" $PY scripts/check_gpu_imports.py > "$OUT/imports.json" 2> "$OUT/imports.log"
  rc=$?; echo "imports exit $rc"; [ $rc -eq 0 ] && show "$OUT/imports.json" 600 || { tail -5 "$OUT/imports.log"; exit 1; }
fi
if step tests; then
  timeout "${BUDGET[tests]}" $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_nf4.py \
    --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
  echo "tests exit $?"; tail -15 "$OUT/tests.log"
fi
if step nf4; then
  args=${NF4_ARGS:-}; [ $GPU -eq 1 ] || args="--tiny $args"
  timeout "${BUDGET[nf4]}" $PY scripts/bench_nf4.py --out "$OUT/nf4.json" $args > /dev/null 2> "$OUT/nf4.log"
  echo "bench_nf4 exit $?"; show "$OUT/nf4.json"
fi
if step tune; then
  timeout "${BUDGET[tune]}" $PY scripts/bench_nf4.py --tune --m 1 --out "$OUT/tune.json" \
    ${TUNE_ARGS:-} > /dev/null 2> "$OUT/tune.log"
  echo "tune exit $?"; tail -30 "$OUT/tune.log"
fi
if step bench; then
  if [ $GPU -eq 1 ]; then
    args="--streams ${BENCH_STREAMS:-1,32} --baseline-requests 1 --followup-context 2000 ${BENCH_ARGS:-}"
  else
    args="--size tiny --nf4-on-cpu --streams 2 --prompt-len 16 --new-tokens 4 --followup-context 0 \
--baseline-requests 0 --threads 1 ${BENCH_ARGS:-}"
  fi
  timeout "${BUDGET[bench]}" $PY scripts/bench.py --random-weights --out "$OUT/bench.json" $args \
    > /dev/null 2> "$OUT/bench.log"
  echo "bench exit $?"; tail -3 "$OUT/bench.log"
  show "$OUT/bench.json" 6000
fi
