#!/usr/bin/env bash
# gpu_check.sh - on a machine with an NVIDIA GPU, in one call: build, run every `gpu`-labelled
# test (CUDA operations against the CPU backend), run the GPU benchmarks, and print one table.
#
#   bash bench/gpu_check.sh [BUILD_DIR]
#
# Exits non-zero when a GPU test fails or is skipped (a skip here means no device answered).
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build-gpu}
OUTDIR=${OUT:-bench/results}
mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release >/dev/null || exit 1
cmake --build "$BUILD" -j "$(nproc)" 2>&1 | tail -3 || exit 1

echo "== gpu tests"
ctest --test-dir "$BUILD" -L gpu --output-on-failure 2>&1 | tee "$OUTDIR/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
if grep -q "Skipped\|Not Run" "$OUTDIR/gpu_tests.log"; then
    echo "gpu_check: a gpu test was skipped: no device answered" >&2
    tests_rc=1
fi

echo "== kd loss kernel (device copy bandwidth and PyTorch in the same run)"
"$BUILD/bench_kd_loss" --gpu 2>&1 | tee "$OUTDIR/kd_loss_gpu.log"
bench_rc=${PIPESTATUS[0]}

echo
echo "gpu_check summary"
printf '%-28s %s\n' "gpu tests" "$([ $tests_rc -eq 0 ] && echo passed || echo FAILED)"
printf '%-28s %s\n' "bench_kd_loss --gpu" "$([ $bench_rc -eq 0 ] && echo ran || echo FAILED)"
exit $((tests_rc || bench_rc))
