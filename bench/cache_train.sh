#!/usr/bin/env bash
# cache_train.sh - offline distillation speed with the teacher cache streamed from disk (the
# prefetch thread) against the same cache held in memory, measured in the same run.
#
#   bash bench/cache_train.sh [DISTILL_BINARY] [RUNS_ROOT]
#
# Needs the Fashion-MNIST teacher cache of bench/reference_runs.sh (RUNS_ROOT/fmnist-teacher/
# logits.h5). Trains the tiny student for 2 epochs per measurement, alternating the two modes
# for ROUNDS rounds (default 5; odd rounds run memory first, even rounds streamed first, so a
# drift in the machine's speed falls on both), and compares the median training time per epoch
# (evaluation excluded). Run it on an otherwise idle machine: the figure is a ratio of wall
# times. The OS
# page cache holds the file after the first read, as it would on any machine with the RAM for
# it; what this measures is the reader's own cost (HDF5 chunk reads, float16 decoding, the
# prefetch hand-off) on the training critical path. Writes bench/results/cache_train.json.
set -euo pipefail
case "${1:-}" in -h | --help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/.."
BIN=${1:-build/distill}
RUNS=${2:-runs}
CACHE=$RUNS/fmnist-teacher/logits.h5
CKPT=$RUNS/fmnist-teacher/last.safetensors
[ -f "$CACHE" ] || { echo "cache_train: $CACHE not found (run bench/reference_runs.sh)" >&2; exit 1; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

train_round() { # mode round: a 2-epoch training, its log in $TMP/mode-round.log
    if ! "$BIN" train configs/fashion-mnist/tiny_distill.yaml --no-progress \
        --set run.out_dir="$TMP/$1-$2" --set optim.epochs=2 --set data.val_size=5000 \
        --set teacher.cache="$CACHE" --set teacher.checkpoint="$CKPT" \
        --set teacher.cache_memory="$1" >"$TMP/$1-$2.log" 2>&1; then
        echo "cache_train: the training with teacher.cache_memory=$1 failed:" >&2
        tail -5 "$TMP/$1-$2.log" >&2
        exit 1
    fi
}

declare -A T
for round in $(seq 1 "${ROUNDS:-5}"); do
    modes="auto stream"
    [ $((round % 2)) -eq 0 ] && modes="stream auto"
    for mode in $modes; do
        train_round "$mode" "$round"
        # the per-epoch training seconds of its log
        T[$mode]+="$(sed -n 's/^epoch [0-9]*\/[0-9]*: train .* | \([0-9.]*\)s$/\1/p' \
            "$TMP/$mode-$round.log" | tr '\n' ' ')"
    done
done
python3 - "${T[auto]}" "${T[stream]}" <<'PY'
import json, os, statistics, sys
mem = [float(x) for x in sys.argv[1].split()]
stream = [float(x) for x in sys.argv[2].split()]
m, s = statistics.median(mem), statistics.median(stream)
print(f"{'cache':10} {'epochs':>7} {'median s/epoch':>15} {'min':>7} {'max':>7}")
print(f"{'in memory':10} {len(mem):>7} {m:>15.2f} {min(mem):>7.2f} {max(mem):>7.2f}")
print(f"{'streamed':10} {len(stream):>7} {s:>15.2f} {min(stream):>7.2f} {max(stream):>7.2f}")
print(f"streamed / in memory: {s / m:.3f} (target <= 1.05)")
os.makedirs("bench/results", exist_ok=True)
with open("bench/results/cache_train.json", "w") as f:
    json.dump({"in_memory_s_per_epoch": mem, "streamed_s_per_epoch": stream,
               "ratio_median": s / m}, f, indent=1)
PY
