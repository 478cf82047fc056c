#!/usr/bin/env bash
# sweep_openmp.sh - training speed of the tiny student when jobs share the machine (a sweep of
# students run side by side) under three OpenMP wait settings, measured in the same run:
#   spin 1000 (distill's own: `distill` sets GOMP_SPINCOUNT=1000 when the environment sets none),
#   spin 300000 (libgomp's default, what any OpenMP program gets) and OMP_WAIT_POLICY=PASSIVE.
#
#   bash bench/sweep_openmp.sh [DISTILL_BINARY] [JOBS]
#
# For each setting: one job alone, then JOBS jobs at once (default 2), every job with
# run.threads = the number of cores; each reports the samples/s of its first STEPS steps
# (default 200; the progress line the training log prints every 50 steps), and is stopped there.
# Rounds alternate the order of the settings (ROUNDS, default 2); the table gives the median
# over rounds. Run on an otherwise idle machine. Writes bench/results/sweep_openmp.json.
set -euo pipefail
case "${1:-}" in -h | --help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/.."
BIN=${1:-build/distill}
JOBS=${2:-2}
STEPS=${STEPS:-200}
ROUNDS=${ROUNDS:-2}
CORES=$(nproc)
TMP=$(mktemp -d)
trap 'pkill -P $$ 2>/dev/null || true; rm -rf "$TMP"' EXIT

# one job in the background: $1 log, $2 setting; the rest is the environment
start_job() {
    local log=$1 setting=$2
    local envs=()
    case $setting in
    spin1000) envs=(GOMP_SPINCOUNT=1000) ;;
    spin300000) envs=(GOMP_SPINCOUNT=300000) ;;
    passive) envs=(OMP_WAIT_POLICY=PASSIVE) ;;
    esac
    env "${envs[@]}" "$BIN" train configs/fashion-mnist/tiny_scratch.yaml --no-progress \
        --set run.out_dir="$log.run" --set run.threads="$CORES" --set run.log_every=50 \
        >"$log" 2>&1 &
    echo $!
}

# samples/s at step STEPS of a log, once it is there (the job is then stopped)
wait_rate() {
    local log=$1 pid=$2 rate=""
    while [ -z "$rate" ]; do
        rate=$(sed -n "s/^epoch 1\/[0-9]* step $STEPS\/[0-9]* .* \([0-9][0-9]*\) samples\/s .*/\1/p" "$log")
        if [ -z "$rate" ] && ! kill -0 "$pid" 2>/dev/null; then
            echo "sweep_openmp: a job ended before step $STEPS: $(tail -n 3 "$log")" >&2
            exit 1
        fi
        [ -n "$rate" ] || sleep 0.5
    done
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    echo "$rate"
}

measure() { # setting round -> "alone pair_total pair_min"
    local s=$1 r=$2 pids=() rates=()
    local p
    p=$(start_job "$TMP/$s-$r-alone" "$s")
    local alone
    alone=$(wait_rate "$TMP/$s-$r-alone" "$p")
    for j in $(seq 1 "$JOBS"); do
        pids+=("$(start_job "$TMP/$s-$r-$j" "$s")")
    done
    for j in $(seq 1 "$JOBS"); do
        rates+=("$(wait_rate "$TMP/$s-$r-$j" "${pids[$((j - 1))]}")")
    done
    local total=0 min=${rates[0]}
    for x in "${rates[@]}"; do
        total=$((total + x))
        [ "$x" -lt "$min" ] && min=$x
    done
    echo "$alone $total $min"
}

settings="spin1000 spin300000 passive"
declare -A A P M
for r in $(seq 1 "$ROUNDS"); do
    order=$settings
    [ $((r % 2)) -eq 0 ] && order=$(echo "$settings" | tr ' ' '\n' | tac | tr '\n' ' ')
    for s in $order; do
        read -r a p m < <(measure "$s" "$r")
        A[$s]+="$a "
        P[$s]+="$p "
        M[$s]+="$m "
        echo "round $r $s: alone $a samples/s; $JOBS jobs at once: $p in all, slowest $m" >&2
    done
done

median() { tr ' ' '\n' | sed '/^$/d' | sort -n | awk '{v[NR]=$1} END {print (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }

printf '\nTiny student, %d cores, run.threads=%d, samples/s over the first %d steps, median of %d rounds\n' \
    "$CORES" "$CORES" "$STEPS" "$ROUNDS"
printf '%-34s %12s %16s %16s\n' "OpenMP setting" "alone" "$JOBS jobs: total" "per job (min)"
json="{\"benchmark\": \"sweep_openmp\", \"cores\": $CORES, \"jobs\": $JOBS, \"steps\": $STEPS, \"rounds\": $ROUNDS, \"settings\": {"
sep=""
for s in $settings; do
    a=$(echo "${A[$s]}" | median)
    p=$(echo "${P[$s]}" | median)
    m=$(echo "${M[$s]}" | median)
    case $s in
    spin1000) name="GOMP_SPINCOUNT=1000 (distill)" ;;
    spin300000) name="GOMP_SPINCOUNT=300000 (libgomp)" ;;
    passive) name="OMP_WAIT_POLICY=PASSIVE" ;;
    esac
    printf '%-34s %12s %16s %16s\n' "$name" "$a" "$p" "$m"
    json+="$sep\"$s\": {\"alone\": $a, \"jobs_total\": $p, \"per_job_min\": $m}"
    sep=", "
done
json+="}}"
mkdir -p bench/results
echo "$json" >bench/results/sweep_openmp.json
echo "wrote bench/results/sweep_openmp.json"
