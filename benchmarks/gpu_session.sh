#!/usr/bin/env bash
# One GPU session in ONE device call of at most 9 minutes on a bare H200 (see the device tool's README):
# install the carried wheels, build the C++ packer, `pytest -m gpu` (Triton kernels compiled for real), the
# loss suite at N=8192 and N=32768 (Llama-3 head D=4096 V=128256, bf16), then the trainer part. Long-context
# rows are a second call: benchmarks/gpu_long_context.sh.
#
#   1. here, once (wheels for what the image lacks; pure Python, ~1.3 MB):
#        echo /.whl/ >> .git/info/exclude
#        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#          --platform any -d .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1 pybind11==3.1.0
#      (quack-kernels is not carried: its nvidia-cutlass-dsl-libs-cu13 wheel alone is 92 MB, over the 64 MiB a
#       call carries; the suite then records QuACK as skipped, "quack is not installed")
#   2. device run: carry [".whl"], timeout_s 540, command "bash benchmarks/gpu_session.sh"
#      (BUDGET_S, default 525, is the whole script; SESSION_CAPS="name:s ..." overrides the step caps)
#
# Every result is a JSON line in $OUT/results.jsonl, written (flushed) as it is measured, so a run that is
# cut short keeps what it measured; each step has its own time limit, so a slow step cannot eat the budget
# of the steps after it. The end: $OUT/results/<device>-<date>.{json,md,png} and a summary table.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/results"
BUDGET_S=${BUDGET_S:-525}   # the whole script, summary included; the device call gets timeout_s 540
JSONL="$OUT/results.jsonl"
LOG="$OUT/session.log"
export REFIT_RESULTS_DIR="$OUT/results" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
SUITE="python3 benchmarks/run_gpu_suite.py --jsonl $JSONL"

# step NAME 'COMMAND': runs COMMAND (bash -c) under its own time limit: what is left of BUDGET_S minus the
#   caps of the steps after it. So every step gets at least its cap, and time a step leaves unused goes to
#   the next. The caps add up to BUDGET_S less ~5 s for the header (nvidia-smi, versions). The suite stops starting new work REFIT_TIME_LIMIT seconds in
#   (15 s before the hard limit), so a step usually ends with clean lines rather than a kill.
#   Expected on an H200 (bare machine): install ~10 s, build ~15 s, tests ~90 s (Triton compiles), loss
#   ~40 s at N=8192 and ~70 s at 32768 (torch.compile last: the first to be cut), trainer ~60 s.
read -ra CAPS <<<"${SESSION_CAPS:-install:25 build:40 tests:140 loss_8192:90 loss_32768:110 trainer:105 summary:10}"
cap_of() { local kv; for kv in "${CAPS[@]}"; do [ "${kv%%:*}" = "$1" ] && echo "${kv#*:}" && return; done; echo 0; }
caps_after() {
  local seen=0 sum=0 kv
  for kv in "${CAPS[@]}"; do
    if [ "$seen" = 1 ]; then sum=$((sum + ${kv#*:})); fi
    [ "${kv%%:*}" = "$1" ] && seen=1
  done
  echo "$sum"
}
jline() { printf '%s\n' "$1" >>"$JSONL"; }
step() {
  local name=$1 cmd=$2
  local limit=$((BUDGET_S - SECONDS - $(caps_after "$name")))
  local cap; cap=$(cap_of "$name")
  if [ "$limit" -lt 5 ]; then
    jline "{\"part\":\"session\",\"event\":\"step\",\"step\":\"$name\",\"status\":\"skipped\",\"seconds\":0,\"timeout_s\":$limit,\"cap_s\":$cap}"
    echo "== $name: skipped (only ${limit} s left)" | tee -a "$LOG"
    return 0
  fi
  echo "== $name (limit ${limit} s, cap ${cap} s, ${SECONDS} s into the session): $cmd" | tee -a "$LOG"
  local t0=$SECONDS rc status=ok
  REFIT_TIME_LIMIT=$((limit > 30 ? limit - 15 : limit)) timeout --signal=TERM --kill-after=5 "$limit" \
    bash -c "$cmd" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status=timeout; elif [ "$rc" != 0 ]; then status=failed; fi
  jline "{\"part\":\"session\",\"event\":\"step\",\"step\":\"$name\",\"status\":\"$status\",\"rc\":$rc,\"seconds\":$((SECONDS - t0)),\"timeout_s\":$limit,\"cap_s\":$cap}"
  return 0
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee -a "$LOG"

# the wheels go to /tmp/site; every later step sees them (and the repository) on PYTHONPATH
export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
step install 'if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  else echo "no .whl/ carried: Liger and CCE will be skipped lines"; fi
  python3 -c "import importlib.util as u; print({m: bool(u.find_spec(m)) for m in (\"liger_kernel\", \"cut_cross_entropy\", \"quack\", \"pybind11\")})"'
step build 'python3 setup.py build_ext --inplace -q && python3 -c "import refit_fast._packing as p; print(\"C++ packer:\", p.__file__)"'
# pytest -m gpu: the kernels compiled for real; the memory-bound test first (run_gpu_suite.RUN_FIRST)
step tests "$SUITE --parts tests --pytest-args -m gpu tests"
# the loss suite, one process per N: a CUDA context broken at one N cannot take the other with it
step loss_8192 "$SUITE --parts loss --loss-n 8192"
step loss_32768 "$SUITE --parts loss --loss-n 32768"
step trainer "$SUITE --parts trainer --warmup 2 --iters 6 --row-tokens 16384"

echo "== summary (${SECONDS} s into the session)" | tee -a "$LOG"
left=$((BUDGET_S - SECONDS)); [ "$left" -lt 10 ] && left=10
timeout "$left" python3 benchmarks/run_gpu_suite.py --summary "$JSONL" 2>&1 | tee -a "$LOG"
echo "session: ${SECONDS} s of BUDGET_S=${BUDGET_S}; results in $OUT (results.jsonl, session.log, results/)"
