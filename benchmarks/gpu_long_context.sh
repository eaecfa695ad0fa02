#!/usr/bin/env bash
# The long-context rows, a second device call after benchmarks/gpu_session.sh: the largest packed row
# (8k .. 128k tokens) that trains (fwd+bwd+AdamW, gradient checkpointing) with refit_fast vs the Hugging
# Face loss, one 1B-class Llama (V=128256) built once on the GPU for the whole part.
#
#   device run: carry [".whl"] (optional here), timeout_s 540, command "bash benchmarks/gpu_long_context.sh"
#   LONG_T="8192 16384" to choose the row lengths; BUDGET_S (default 525) is the whole script.
#
# Every row is a JSON line in $OUT/results.jsonl as soon as it is measured (a cut run keeps its rows); the
# suite starts no new row after its time limit, and `timeout` ends it for good 15 s later.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/results"
BUDGET_S=${BUDGET_S:-525}
JSONL="$OUT/results.jsonl"
LOG="$OUT/session.log"
LONG_T=${LONG_T:-"8192 16384 32768 65536 131072"}
export REFIT_RESULTS_DIR="$OUT/results" PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
unset TRITON_INTERPRET
jline() { printf '%s\n' "$1" >>"$JSONL"; }
run() {  # NAME LIMIT COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS rc status=ok
  echo "== $name (limit ${limit} s, ${SECONDS} s into the session)" | tee -a "$LOG"
  REFIT_TIME_LIMIT=$((limit > 30 ? limit - 15 : limit)) timeout --signal=TERM --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status=timeout; elif [ "$rc" != 0 ]; then status=failed; fi
  jline "{\"part\":\"session\",\"event\":\"step\",\"step\":\"$name\",\"status\":\"$status\",\"rc\":$rc,\"seconds\":$((SECONDS - t0)),\"timeout_s\":$limit}"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
if compgen -G ".whl/*.whl" >/dev/null; then
  run install 30 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
run build 45 python3 setup.py build_ext --inplace -q
# shellcheck disable=SC2086  # LONG_T is a list of numbers
run long_context $((BUDGET_S - SECONDS - 15)) python3 benchmarks/run_gpu_suite.py --jsonl "$JSONL" --parts long_context --long-t $LONG_T
timeout 15 python3 benchmarks/run_gpu_suite.py --summary "$JSONL" --out "long_context-$(date +%F)" 2>&1 | tee -a "$LOG"
echo "session: ${SECONDS} s of BUDGET_S=${BUDGET_S}; results in $OUT"
