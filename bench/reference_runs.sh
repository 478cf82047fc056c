#!/usr/bin/env bash
# reference_runs.sh - the full Fashion-MNIST runs behind the README's results table.
#
#   bash bench/reference_runs.sh [DISTILL_BINARY] [OUT_ROOT]
#
# Trains the teacher CNN and the MLP, caches the teacher's logits, and trains the tiny student
# from scratch and distilled from the cache with seeds 1, 2 and 3, each with its config in
# configs/fashion-mnist/, and the distilled student trained against its INT4 weights (QAT), then
# the same pair without data augmentation (tiny_scratch_noaug.yaml, tiny_distill_noaug.yaml), then
# 60 epochs of the distilled recipe tiny_distill_long.yaml beside both scratch recipes at 60
# epochs, then prints the table of test accuracies and runs `distill report
# configs/fashion-mnist/report.yaml` (float, INT8 and INT4 side by side, on a Cortex-M4 under
# QEMU). Takes about six hours on 2 cores. Each run logs to OUT_ROOT/<name>/train.log; a finished run is skipped and an
# interrupted one resumes from its last checkpoint.
set -euo pipefail
case "${1:-}" in -h | --help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/.."
BIN=${1:-build/distill}
OUT=${2:-runs}
TEACHER=(--set "teacher.checkpoint=$OUT/fmnist-teacher/last.safetensors"
         --set "teacher.cache=$OUT/fmnist-teacher/logits.h5")
NOAUG=(--set "teacher.checkpoint=$OUT/fmnist-teacher/last.safetensors"
       --set "teacher.cache=$OUT/fmnist-teacher/logits_noaug.h5")

run() { # name config [--set ...]
    local name=$1 cfg=$2
    shift 2
    mkdir -p "$OUT/$name"
    if [ -f "$OUT/$name/result.json" ]; then
        echo "== $name: done already ($OUT/$name/result.json)"
        return
    fi
    echo "== $name: $BIN train $cfg --set run.out_dir=$OUT/$name $* --resume"
    "$BIN" train "$cfg" --set "run.out_dir=$OUT/$name" "$@" --resume --no-progress \
        >>"$OUT/$name/train.log" 2>&1
}

run fmnist-teacher configs/fashion-mnist/teacher.yaml
run fmnist-mlp configs/fashion-mnist/mlp.yaml
echo "== caching the teacher: $BIN cache configs/fashion-mnist/tiny_distill.yaml ${TEACHER[*]}"
"$BIN" cache configs/fashion-mnist/tiny_distill.yaml "${TEACHER[@]}" --no-progress \
    >>"$OUT/fmnist-teacher/cache.log" 2>&1
echo "== caching the teacher without augmentation: $BIN cache configs/fashion-mnist/tiny_distill_noaug.yaml ${NOAUG[*]}"
"$BIN" cache configs/fashion-mnist/tiny_distill_noaug.yaml "${NOAUG[@]}" --no-progress \
    >>"$OUT/fmnist-teacher/cache.log" 2>&1
for seed in 1 2 3; do
    run "fmnist-tiny-scratch-s$seed" configs/fashion-mnist/tiny_scratch.yaml --set "run.seed=$seed"
    run "fmnist-tiny-distill-s$seed" configs/fashion-mnist/tiny_distill.yaml --set "run.seed=$seed" \
        "${TEACHER[@]}"
    run "fmnist-tiny-distill-qat4-s$seed" configs/fashion-mnist/tiny_distill_qat4.yaml \
        --set "run.seed=$seed" "${TEACHER[@]}"
    run "fmnist-tiny-scratch-noaug-s$seed" configs/fashion-mnist/tiny_scratch_noaug.yaml \
        --set "run.seed=$seed"
    run "fmnist-tiny-distill-noaug-s$seed" configs/fashion-mnist/tiny_distill_noaug.yaml \
        --set "run.seed=$seed" "${NOAUG[@]}"
    run "fmnist-tiny-distill-long-s$seed" configs/fashion-mnist/tiny_distill_long.yaml \
        --set "run.seed=$seed" "${NOAUG[@]}"
    run "fmnist-tiny-scratch-60-s$seed" configs/fashion-mnist/tiny_scratch.yaml \
        --set "run.seed=$seed" --set optim.epochs=60
    run "fmnist-tiny-scratch-noaug-60-s$seed" configs/fashion-mnist/tiny_scratch_noaug.yaml \
        --set "run.seed=$seed" --set optim.epochs=60
done

python3 - "$OUT" <<'PY'
import json, os, statistics, sys
out = sys.argv[1]
def res(name):
    with open(os.path.join(out, name, "result.json")) as f:
        return json.load(f)
rows = [("teacher CNN", ["fmnist-teacher"]), ("MLP 784-256-10", ["fmnist-mlp"]),
        ("tiny CNN, from scratch", [f"fmnist-tiny-scratch-s{s}" for s in (1, 2, 3)]),
        ("tiny CNN, distilled", [f"fmnist-tiny-distill-s{s}" for s in (1, 2, 3)]),
        ("distilled, INT4 QAT (fake)", [f"fmnist-tiny-distill-qat4-s{s}" for s in (1, 2, 3)]),
        ("scratch, no augmentation", [f"fmnist-tiny-scratch-noaug-s{s}" for s in (1, 2, 3)]),
        ("distilled, no augmentation", [f"fmnist-tiny-distill-noaug-s{s}" for s in (1, 2, 3)]),
        ("scratch, 60 epochs", [f"fmnist-tiny-scratch-60-s{s}" for s in (1, 2, 3)]),
        ("scratch, no aug., 60 ep.", [f"fmnist-tiny-scratch-noaug-60-s{s}" for s in (1, 2, 3)]),
        ("distilled, no aug., 60 ep.", [f"fmnist-tiny-distill-long-s{s}" for s in (1, 2, 3)])]
print(f"{'model':26} {'params':>8} {'test accuracy':>24}")
for label, names in rows:
    rs = [res(n) for n in names]
    a = [100 * r["test_acc"] for r in rs]
    txt = f"{a[0]:.2f}%" if len(a) == 1 else \
        f"{statistics.mean(a):.2f} ± {statistics.stdev(a):.2f}% (n={len(a)})"
    print(f"{label:26} {rs[0]['params']:>8} {txt:>24}")
PY

if [ "$OUT" = runs ]; then
    echo "== $BIN report configs/fashion-mnist/report.yaml"
    "$BIN" report configs/fashion-mnist/report.yaml --no-progress
else
    echo "(configs/fashion-mnist/report.yaml names checkpoints under runs/; with OUT_ROOT=$OUT run" \
        "it with --set for each row, or copy it)"
fi
