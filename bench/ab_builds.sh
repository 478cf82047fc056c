#!/usr/bin/env bash
# ab_builds.sh - the tiny CNN's CPU training speed of two builds of distill, side by side.
#
#   bash bench/ab_builds.sh BUILD_A BUILD_B [RUNS] [THREADS] [STEPS]
#
# BUILD_A and BUILD_B are build directories holding bench_train_throughput (say one from a git
# worktree of an older commit: `git worktree add /tmp/old REV && cmake -S /tmp/old -B
# /tmp/old/build -DCMAKE_BUILD_TYPE=Release && cmake --build /tmp/old/build --target
# bench_train_throughput`; a tree older than 449fee1 needs this tree's bench/train_throughput.c
# copied in first, as its program prints nothing without the peer). The two run alternately
# RUNS times (default 5), each timing STEPS (default 300) training steps of the tiny CNN on
# THREADS threads (default 2) without the PyTorch peer; the medians and B / A are printed.
# Alternating matters on a shared machine, whose speed drifts by tens of percent within
# minutes.
set -eu
case "${1:-}" in -h | --help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
a=${1:?usage: ab_builds.sh BUILD_A BUILD_B [RUNS] [THREADS] [STEPS]}
b=${2:?usage: ab_builds.sh BUILD_A BUILD_B [RUNS] [THREADS] [STEPS]}
runs=${3:-5}
threads=${4:-2}
steps=${5:-300}
root=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

one() { # build dir -> samples/s of one run
    # the peer is left out (/bin/true gives no JSON), so the program exits 2 after printing
    # distill's own figure for the round
    "$1/bench_train_throughput" --only tiny_cnn.yaml --rounds 1 --steps "$steps" \
        --threads "$threads" --root "$root" --python /bin/true --json "$tmp/unused.json" 2>&1 |
        sed -n 's/.*round 1: distill \([0-9]*\) samples\/s.*/\1/p'
}

for build in "$a" "$b"; do
    [ -x "$build/bench_train_throughput" ] || { echo "no $build/bench_train_throughput" >&2; exit 1; }
done
: >"$tmp/a"
: >"$tmp/b"
for i in $(seq "$runs"); do
    va=$(one "$a")
    vb=$(one "$b")
    [ -n "$va" ] && [ -n "$vb" ] || { echo "run $i: no figure from a build" >&2; exit 1; }
    echo "run $i: A $va, B $vb samples/s"
    echo "$va" >>"$tmp/a"
    echo "$vb" >>"$tmp/b"
done
median() { sort -n "$1" | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
ma=$(median "$tmp/a")
mb=$(median "$tmp/b")
awk -v a="$ma" -v b="$mb" -v t="$threads" -v r="$runs" -v s="$steps" 'BEGIN {
    printf "tiny CNN, %d threads, %d steps, median of %d alternating runs: A %.0f, B %.0f samples/s, B / A %.2f\n",
        t, s, r, a, b, b / a }'
