#!/usr/bin/env bash
# Hardware counters of the kernels whose diagnosis is pending (Nsight Compute), on a lent CUDA machine:
#
#   OUT=... bash scripts/gpu_ncu.sh                          # every case of benchmarks/ncu_cases.py
#   NCU_CASES=pst-4096x11008-cuda,attn-bert-h12-n512-p16-dropout0.1 bash scripts/gpu_ncu.sh
#
# Builds the CUDA extension unless it already loads (a warm machine keeps gpu_check.sh's build), runs
# `python3 -m benchmarks.ncu_cases` under ncu (only its profiled region: one forward + backward per case,
# compiled and autotuned before), then prints `benchmarks.ncu_summary`'s table: per kernel its time,
# occupancy, SM / memory throughput, issue-slot use and top stall reasons. Writes NAME.ncu-rep (open it
# in Nsight Compute for the source view), NAME-raw.csv, NAME-cases.json, NAME-summary.txt and
# NAME-kernels.json to OUT (else benchmarks/results).
#
# ncu runs with --clock-control none (device/METHOD.md: leave the clocks alone). Hardware counters need
# the Firecracker runtime (device/H200.md): on gVisor ncu fails to initialise its profiler, and this
# script says so and exits 2. A few minutes in all (each kernel is replayed once per counter pass).
#
# Environment: OUT, NCU_CASES (comma-separated, default all), NCU (path of ncu), NCU_SECTIONS (default below).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

NCU="${NCU:-$(command -v ncu || ls -1 /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | tail -n 1 || true)}"
if [ -z "$NCU" ] || [ ! -x "$NCU" ]; then
    echo "gpu_ncu: no ncu (Nsight Compute) on this machine; set NCU=/path/to/ncu" >&2
    exit 2
fi
LOGS="${OUT:-benchmarks/results}"
NAME="ncu-$(date -u +%Y%m%d-%H%M%S)"
mkdir -p "$LOGS"
echo "== gpu_ncu ${NAME}: $(hostname), $(date -u); $("$NCU" --version | tail -n 1)"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader || true

if ! python3 -c "import apt_kernels._C" 2>/dev/null; then
    echo "== install (builds apt_kernels._C; log: ${LOGS}/${NAME}-pip.log)"
    source scripts/gpu_install.sh
    install_extension "${LOGS}/${NAME}-pip.log" || echo "   the extension did not build: the CUDA cases are left out"
fi

SECTIONS="${NCU_SECTIONS:-SpeedOfLight LaunchStats Occupancy SchedulerStats WarpStateStats MemoryWorkloadAnalysis InstructionStats}"
section_args=()
for s in $SECTIONS; do section_args+=(--section "$s"); done
case_args=()
if [ -n "${NCU_CASES:-}" ]; then case_args+=(--cases "$NCU_CASES"); fi

echo "== ncu: python3 -m benchmarks.ncu_cases (sections: ${SECTIONS})"
set +e
"$NCU" --clock-control none --profile-from-start off --replay-mode kernel "${section_args[@]}" \
    -f -o "${LOGS}/${NAME}" python3 -m benchmarks.ncu_cases --order "${LOGS}/${NAME}-cases.json" "${case_args[@]}" \
    2>&1 | tee "${LOGS}/${NAME}-ncu.log"
rc=${PIPESTATUS[0]}
set -e
if [ ! -f "${LOGS}/${NAME}.ncu-rep" ]; then
    echo "gpu_ncu: ncu wrote no report (exit status ${rc}); on gVisor it cannot read the counters (device/H200.md)" >&2
    exit 2
fi
"$NCU" --import "${LOGS}/${NAME}.ncu-rep" --csv --page raw > "${LOGS}/${NAME}-raw.csv"
python3 -m benchmarks.ncu_summary "${LOGS}/${NAME}-raw.csv" --cases "${LOGS}/${NAME}-cases.json" \
    --json "${LOGS}/${NAME}-kernels.json" | tee "${LOGS}/${NAME}-summary.txt"
exit "$rc"
