#!/usr/bin/env bash
# One prepared command for a GPU machine that has torch (+ its Triton) and transformers but no network.
#
#   Here, once:   bash scripts/fetch_wheels.sh      (wheels of scripts/gpu-wheels.txt into .whl/, ~46 MB)
#   There:        bash scripts/gpu_check.sh         (device tool: carry [".whl"]; results land in $OUT)
#   CPU dry run:  bash scripts/gpu_check.sh         (no CUDA: every step runs small, what needs CUDA skips)
#   The plan:     PLAN_ONLY=1 bash scripts/gpu_check.sh
#
# Steps (STEPS picks them, default "imports tests nf4 bench"; "tune" sweeps kernel configs and is not default, nor
# "structured": the grammar masks' cost per decode step, after "bench" to compare with its decode step).
# Engine II (paged attention, mixed steps) in one more command:  STEPS="imports attention sweep" (under 540 s):
# "attention" runs the attention kernels' tests compiled (bf16 too) and the graph/paged-vs-reference GPU tests;
# "sweep" runs `bench.py --context-sweep` on the 14B shape: decode over batch {1,8,32} x context {1K,8K,32K} for
# paged and reference attention, and inter-token latency while 8K-token prompts arrive, mixed vs alternating.
# The token path (issue 14) in one more command:  STEPS="imports server" (under 540 s): `bench.py --server-only` on the
# 14B shape: the engine in its own process (model built there), 1/8/32/64 streams over WebSockets from a client
# process: event-loop CPU per token, engine host time per step direct vs while streaming (ratio), inter-token latency
# end to end vs the engine's own.
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
                   [bench]=${BENCH_TIMEOUT:-220} [tune]=${TUNE_TIMEOUT:-400} [attention]=${ATTENTION_TIMEOUT:-120}
                   [sweep]=${SWEEP_TIMEOUT:-330} [structured]=${STRUCTURED_TIMEOUT:-200} [server]=${SERVER_TIMEOUT:-420})
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
if step attention; then
  if [ $GPU -eq 1 ]; then
    sel=(tests/test_attention.py tests/test_gpu.py -k "attention or graph or paged")
  else  # interpreted: the sm_90 compile and one case of each kernel
    sel=(tests/test_attention.py -k "compile or (1x3000 and gqa5 and splits16)")
  fi
  timeout "${BUDGET[attention]}" $PY -m pytest -q -p no:cacheprovider -rA "${sel[@]}" \
    --junitxml="$OUT/attention.xml" > "$OUT/attention.log" 2>&1
  echo "attention tests exit $?"; grep -E "passed|failed|error|REG" "$OUT/attention.log" | tail -8
fi
if step server; then
  if [ $GPU -eq 1 ]; then
    args="--size 14b --server-streams ${SERVER_STREAMS:-1,8,32,64} --prompt-len 64 --new-tokens 192 ${SERVER_ARGS:-}"
  else
    args="--size tiny --threads 1 --server-streams 1,4 --prompt-len 16 --new-tokens 24 ${SERVER_ARGS:-}"
  fi
  timeout "${BUDGET[server]}" $PY scripts/bench.py --random-weights --server --server-only --engine-process on \
    --out "$OUT/server.json" $args > /dev/null 2> "$OUT/server.log"
  echo "server exit $?"; tail -3 "$OUT/server.log"
  $PY - "$OUT/server.json" <<'PY' || show "$OUT/server.json" 6000
import json, sys
d = json.load(open(sys.argv[1])); s = d.get("server") or {}
print(json.dumps({"errors": d.get("errors"), "summary": s.get("summary")}))
for n, p in (s.get("engine_process_on") or {}).get("points", {}).items():
    print(n, json.dumps({k: p.get(k) for k in ("event_loop_us_per_token", "engine_host_ms_per_step", "host_ratio",
                                              "itl_ms", "e2e_vs_engine_itl")}, separators=(",", ":")))
PY
fi
if step sweep; then
  if [ $GPU -eq 1 ]; then
    args="--size 14b ${SWEEP_ARGS:-}"
  else
    args="--size tiny --threads 1 --attention-modes paged,reference --sweep-batches 1,2 --sweep-contexts 100,300 \
--sweep-steps 2 --itl-streams 2 --itl-prompts 1 --itl-prompt-len 120 --itl-context 50 --max-step-tokens 64 \
--itl-step-tokens 16,64 ${SWEEP_ARGS:-}"
  fi
  timeout "${BUDGET[sweep]}" $PY scripts/bench.py --random-weights --context-sweep --out "$OUT/sweep.json" $args \
    > /dev/null 2> "$OUT/sweep.log"
  echo "sweep exit $?"; tail -3 "$OUT/sweep.log"
  $PY - "$OUT/sweep.json" <<'PY' || show "$OUT/sweep.json" 6000
import json, sys
d = json.load(open(sys.argv[1])); c = d.get("context_sweep", {})
print(json.dumps({"errors": d.get("errors"), "targets": c.get("targets"), "paged_vs_reference": c.get("paged_vs_reference")}))
for mode, r in c.get("decode", {}).items():
    print(mode, "startup_s", r.get("startup_s"), "graphs", r.get("graphs"))
    for p in r.get("points", []):
        print(" ", json.dumps(p, separators=(",", ":")))
for mode, r in c.get("itl", {}).items():
    print("itl", mode, json.dumps({k: r.get(k) for k in ("itl_p50_ms", "itl_p99_ms", "p99_over_p50", "ttft_ms", "steps_by_kind")}))
PY
fi
if step structured; then  # not a default step (those fill the 540 s): STEPS="imports bench structured"
  # The masks' cost per decode step at 1/8/32 constrained rows on a 151,665-token vocabulary (trained on the CPU
  # unless .bench-tokenizer/ was carried: python scripts/bench_structured.py --cache .bench-tokenizer builds it
  # here), as a share of the bench step's 32-stream decode step when bench.json has one.
  decode=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['engine']['32']['tpot_p50_ms'])" \
           "$OUT/bench.json" 2>/dev/null || echo 0)
  args="--vocab 2000 --steps 6"; [ $GPU -eq 1 ] && args="--steps 40"
  args="$args ${STRUCTURED_ARGS:-}"
  timeout "${BUDGET[structured]}" $PY scripts/bench_structured.py --cache .bench-tokenizer --decode-step-ms "$decode" \
    --out "$OUT/structured.json" $args > /dev/null 2> "$OUT/structured.log"
  echo "structured exit $?"; tail -3 "$OUT/structured.log"
  show "$OUT/structured.json" 4000
fi
