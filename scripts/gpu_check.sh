#!/usr/bin/env bash
# GPU check for a lent CUDA machine (no network): build the CUDA extension, report the backends, run
# the GPU test lanes, run the benchmarks, and print the benchmark summary table last.
#
#   bash scripts/gpu_check.sh                 # full benchmark shapes
#   BENCH_QUICK=1 bash scripts/gpu_check.sh   # fewer shapes
#
# Environment:
#   OUT            if set, results and logs are copied there (default: they stay in benchmarks/results)
#   BENCH_QUICK=1  benchmark the representative shapes only
#   CHECK_LIMIT_S  wall-clock budget of the whole script (default 570 s, under a 10-minute limit);
#                  the benchmark gets what the build and the tests leave, and skips (and records)
#                  the contenders it has no time left for
#   TEST_LIMIT_S   cap on the test run (default 270 s; interrupted tests still print their summary)
#   BENCH_REP_MS   do_bench repetition time per contender (default 100 ms)
# Exit status: the first failure among install, tests and benchmark (the benchmark still runs after
# failing tests).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # compiled Triton on the GPU
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"  # parallel nvcc jobs for the extension build

LIMIT="${CHECK_LIMIT_S:-570}"
STAMP="$(date -u +%Y%m%d-%H%M%S)"
NAME="gpu-${STAMP}"
RESULTS="benchmarks/results"
LOGS="${OUT:-$RESULTS}"
mkdir -p "$RESULTS" "$LOGS"
status=0

echo "== gpu_check ${NAME}: $(hostname), $(date -u)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c 'import torch; assert torch.cuda.is_available(), "torch sees no CUDA device"; print("torch", torch.__version__, "CUDA", torch.version.cuda)'

echo "== install (builds apt_kernels._C from csrc/; log: ${RESULTS}/${NAME}-pip.log)"
if ! python3 -m pip install --no-build-isolation --no-deps -e . >"${RESULTS}/${NAME}-pip.log" 2>&1; then
    tail -n 60 "${RESULTS}/${NAME}-pip.log"
    echo "gpu_check: pip install failed" >&2
    exit 1
fi
grep -E "apt-kernels setup:|Successfully" "${RESULTS}/${NAME}-pip.log" || tail -n 5 "${RESULTS}/${NAME}-pip.log"
echo "   install took ${SECONDS} s"

echo "== python3 -m apt_kernels"
python3 -m apt_kernels

# The nvcc lane is left out: the extension build above compiles the same sources for real. Tests run
# in parallel when pytest-xdist is there (it is on the H200 image); kernels are not autotuned in tests
# (tests/conftest.py), except in the one test that checks the autotuned path.
LANES="(gpu or triton) and not nvcc"
XDIST=()
if python3 -c "import xdist" 2>/dev/null; then XDIST=(-n "${TEST_WORKERS:-8}"); fi
echo "== GPU tests: pytest -m '${LANES}' ${XDIST[*]} (log: ${LOGS}/${NAME}-pytest.log)"
t_tests=$SECONDS
set +e
timeout -s INT -k 20 "${TEST_LIMIT_S:-270}" \
    python3 -m pytest -q -m "$LANES" "${XDIST[@]}" tests 2>&1 | tee "${LOGS}/${NAME}-pytest.log"
test_rc=${PIPESTATUS[0]}
set -e
echo "   tests took $((SECONDS - t_tests)) s, exit status ${test_rc}"
if [ "$test_rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$test_rc; fi

echo "== benchmarks: python3 -m benchmarks.run --out ${NAME}"
budget=$((LIMIT - SECONDS - 45))
if [ "$budget" -lt 60 ]; then budget=60; fi
bench_args=(--device cuda --out "$NAME" --budget-s "$budget" --rep-ms "${BENCH_REP_MS:-100}")
if [ "${BENCH_QUICK:-0}" != "0" ]; then bench_args+=(--quick); fi
set +e
timeout -s INT -k 15 "$((budget + 35))" python3 -m benchmarks.run "${bench_args[@]}" 2>&1 | tee "${LOGS}/${NAME}-bench.log"
bench_rc=${PIPESTATUS[0]}
set -e
if [ "$bench_rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$bench_rc; fi

if [ -n "${OUT:-}" ]; then
    cp -f "${RESULTS}/${NAME}".* "${RESULTS}/${NAME}"-*.png "${RESULTS}/${NAME}-summary.txt" "$OUT"/ 2>/dev/null || true
    echo "== results copied to ${OUT}: $(cd "$OUT" && ls -1 "${NAME}"* | tr '\n' ' ')"
fi

echo
echo "== done in ${SECONDS} s (tests: exit ${test_rc}, benchmark: exit ${bench_rc})"
echo "== summary (${NAME})"
if [ -f "${RESULTS}/${NAME}.json" ]; then
    python3 -m benchmarks.run --table "${RESULTS}/${NAME}.json"
else
    echo "no benchmark results were written"
fi
exit "$status"
