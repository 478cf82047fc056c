#!/usr/bin/env bash
# gpu_check.sh - on a machine with an NVIDIA GPU, in one call: build, run every `gpu`-labelled
# test (CUDA operations against the CPU backend), run the GPU benchmarks, and print one table.
#
#   bash bench/gpu_check.sh [BUILD_DIR]
#
# The benchmarks: bench_kd_loss --gpu, and bench/compare_pytorch.sh (distill against PyTorch
# eager and torch.compile with python3's torch: training the tiny CNN, the MLP and the teacher,
# and the teacher's inference), whose rows join the summary; COMPARE_ARGS adds options to it
# (e.g. COMPARE_ARGS="--rounds 1"). Then the tiny CNN twice more, with and without --no-graph
# (same options otherwise): the summary gives its training samples/s with the step replayed
# from a CUDA graph and without. Results and logs go to $OUT when set, else bench/results.
# Exits 1 at once when nvidia-smi finds no GPU (GPU_CHECK_ANYWAY=1 goes on). Exits non-zero
# when a GPU test fails or is skipped (a skip here means no device answered) or a
# benchmark fails; a comparison that could not be measured (an operation the CUDA backend lacks
# yet, no torch) shows in the summary without failing the check, and neither does a missed target.
set -uo pipefail
case "${1:-}" in -h | --help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/.."
BUILD=${1:-build-gpu}
OUTDIR=${OUT:-bench/results}
mkdir -p "$OUTDIR"
# no device, no point building for minutes first (GPU_CHECK_ANYWAY=1 goes on: a machine whose GPU
# answers CUDA but has no nvidia-smi)
if ! nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; then
    if [ "${GPU_CHECK_ANYWAY:-0}" != 1 ]; then
        echo "gpu_check: nvidia-smi found no NVIDIA GPU: run this on a machine with one" \
            "(GPU_CHECK_ANYWAY=1 builds and runs the checks anyway)" >&2
        exit 1
    fi
fi

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

echo "== distill against PyTorch eager and torch.compile (bench/compare_pytorch.sh)"
compare_rows=$(mktemp)
# shellcheck disable=SC2086 # COMPARE_ARGS is a list of options
bash bench/compare_pytorch.sh --build "$BUILD" --out "$OUTDIR" --summary "$compare_rows" \
    ${COMPARE_ARGS:-}
compare_rc=$?
case $compare_rc in
0) compare_state=ran ;;
2) compare_state="ran in part: some comparisons not measured" ;;
*) compare_state=FAILED ;;
esac

echo "== the tiny CNN's training steps with and without the CUDA graph (run.cuda_graph)"
# two runs that differ only in --no-graph (each also times the PyTorch eager peer in its
# rounds, as compare_pytorch does; without it the bench writes no JSON and the row says so)
graph_row="not measured"
for g in graph nograph; do
    "$BUILD/bench_train_throughput" --device cuda --only tiny_cnn.yaml --rounds 3 --no-compile \
        $([ $g = nograph ] && echo --no-graph) --json "$OUTDIR/train_throughput_cuda_$g.json" \
        >"$OUTDIR/train_throughput_cuda_$g.log" 2>&1
done
if [ -f "$OUTDIR/train_throughput_cuda_graph.json" ] &&
    [ -f "$OUTDIR/train_throughput_cuda_nograph.json" ]; then
    graph_row=$(python3 - "$OUTDIR/train_throughput_cuda_graph.json" \
        "$OUTDIR/train_throughput_cuda_nograph.json" <<'PY'
import json, sys
def tiny(path):
    for m in (json.load(open(path)) or {}).get("models") or []:
        if m.get("model") == "tiny_cnn.yaml" and m.get("distill"):
            return m["distill"]
    return None
graph, eager = tiny(sys.argv[1]), tiny(sys.argv[2])
if not graph or not eager or not graph.get("samples_per_s") or not eager.get("samples_per_s"):
    print("not measured")
else:
    g, e = graph["samples_per_s"], eager["samples_per_s"]
    print("%.0f samples/s (cuda_graph %s) vs %.0f without: %.2fx"
          % (g, graph.get("cuda_graph"), e, g / e))
PY
)
fi
echo "tiny CNN steps: $graph_row"

echo
echo "gpu_check summary"
printf '%-28s %s\n' "gpu tests" "$([ $tests_rc -eq 0 ] && echo passed || echo FAILED)"
printf '%-28s %s\n' "bench_kd_loss --gpu" "$([ $bench_rc -eq 0 ] && echo ran || echo FAILED)"
printf '%-28s %s\n' "compare_pytorch.sh" "$compare_state"
printf '%-28s %s\n' "tiny CNN, CUDA graph" "$graph_row"
sed 's/^/  /' "$compare_rows"
rm -f "$compare_rows"
exit $((tests_rc || bench_rc || (compare_rc != 0 && compare_rc != 2)))
