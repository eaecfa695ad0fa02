#!/usr/bin/env bash
# Everything a GPU session runs, in one device call (see the device tool's README):
#   1. here, once:   echo /.whl/ >> .git/info/exclude
#                    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#                      --platform manylinux2014_x86_64 -d .whl liger-kernel cut-cross-entropy pybind11
#                    (pure-Python wheels: add --platform any if pip asks)
#   2. device run:   carry [".whl"], command "bash benchmarks/gpu_session.sh", timeout_s ~540
# Results land in $OUT (logs; results/ holds the suite's json, md and png): commit them under
# benchmarks/results/.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/results"
# Finish inside the device call's 600 s limit, and write results into $OUT as each part ends, so a
# run that is cut short still returns its logs and the parts it finished.
BUDGET_S=${BUDGET_S:-560}
export REFIT_RESULTS_DIR="$OUT/results"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
python3 setup.py build_ext --inplace -q 2>&1 | tail -2
# 1. correctness of the compiled kernels first (no number is kept before this passes)
timeout 240 python3 -m pytest -q -x tests/test_weighted_ce_gpu.py tests/test_model.py "tests/test_reward_stats.py::test_group_on_cuda_matches_reference" -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
if [ "$tests_rc" != 0 ]; then echo "GPU tests failed ($tests_rc): no benchmark run"; exit "$tests_rc"; fi
# 2. the suite (parts can be chosen with SUITE_ARGS, e.g. "--parts loss")
left=$((BUDGET_S - SECONDS))
if [ "$left" -lt 60 ]; then echo "only ${left} s left of BUDGET_S=${BUDGET_S}: suite not started"; exit 3; fi
echo "suite gets ${left} s"
timeout "$left" python3 benchmarks/run_gpu_suite.py ${SUITE_ARGS:-} 2>&1 | tee "$OUT/suite.log"
