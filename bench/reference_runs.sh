#!/usr/bin/env bash
# reference_runs.sh - the full Fashion-MNIST runs behind the README's results table.
#
#   bash bench/reference_runs.sh [DISTILL_BINARY] [OUT_ROOT]
#
# Trains the teacher CNN, the MLP and the tiny student from scratch (seeds 1, 2, 3), each with
# its config in configs/fashion-mnist/, then prints the table of test accuracies. Takes about
# an hour and a half on 2 cores. Each run logs to OUT_ROOT/<name>/train.log and can be resumed
# with `distill train CONFIG --resume`.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-build/distill}
OUT=${2:-runs}

run() { # name config [--set ...]
    local name=$1 cfg=$2
    shift 2
    mkdir -p "$OUT/$name"
    if [ -f "$OUT/$name/result.json" ]; then
        echo "== $name: done already ($OUT/$name/result.json)"
        return
    fi
    local resume=()
    [ -f "$OUT/$name/last.safetensors" ] && resume=(--resume)
    echo "== $name: $BIN train $cfg --set run.out_dir=$OUT/$name $* ${resume[*]}"
    "$BIN" train "$cfg" --set "run.out_dir=$OUT/$name" "$@" "${resume[@]}" --no-progress \
        >>"$OUT/$name/train.log" 2>&1
}

run fmnist-teacher configs/fashion-mnist/teacher.yaml
run fmnist-mlp configs/fashion-mnist/mlp.yaml
for seed in 1 2 3; do
    run "fmnist-tiny-scratch-s$seed" configs/fashion-mnist/tiny_scratch.yaml --set "run.seed=$seed"
done

python3 - "$OUT" <<'PY'
import json, os, statistics, sys
out = sys.argv[1]
def acc(name):
    with open(os.path.join(out, name, "result.json")) as f:
        return json.load(f)
rows = [("teacher CNN", ["fmnist-teacher"]), ("MLP 784-256-10", ["fmnist-mlp"]),
        ("tiny CNN, from scratch", [f"fmnist-tiny-scratch-s{s}" for s in (1, 2, 3)])]
print(f"{'model':26} {'params':>8} {'test accuracy':>22}")
for label, names in rows:
    rs = [acc(n) for n in names]
    a = [100 * r["test_acc"] for r in rs]
    txt = f"{a[0]:.2f}%" if len(a) == 1 else f"{statistics.mean(a):.2f} ± {statistics.stdev(a):.2f}% (n={len(a)})"
    print(f"{label:26} {rs[0]['params']:>8} {txt:>22}")
PY
