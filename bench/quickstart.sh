#!/usr/bin/env bash
# quickstart.sh - the pipeline end to end on Fashion-MNIST, shortened to run in a few minutes on
# 2 cores: train the teacher CNN, cache its logits, train the tiny student from scratch and
# distilled from the cache, train the MLP, evaluate the checkpoints, then quantize the distilled
# student to INT8 and INT4, run it with the microcontroller runtime (on the host, and on a
# Cortex-M4 under QEMU when the ARM tools are installed) and print the side-by-side table. The
# full-length runs behind the README's results table are bench/reference_runs.sh.
#
#   bash bench/quickstart.sh [DISTILL_BINARY] [OUT_DIR]
set -euo pipefail
case "${1:-}" in -h | --help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
cd "$(dirname "$0")/.."
BIN=${1:-build/distill}
OUT=${2:-runs/quickstart}
# the quickstart starts over each time: its output directory is its own scratch space
rm -rf "$OUT"
mkdir -p "$OUT"
TEACHER_CKPT=$OUT/teacher/last.safetensors
CACHE=$OUT/teacher/logits.h5

train() { # name config epochs [--set ...]
    local name=$1 cfg=$2 epochs=$3
    shift 3
    echo "== training $name ($epochs epochs): $BIN train $cfg ..."
    "$BIN" train "$cfg" --set "run.out_dir=$OUT/$name" --set "optim.epochs=$epochs" "$@"
}

# The teacher trains for 2 epochs here (about 4 minutes; about 90 % test accuracy), the reference
# run for 20 (94 %). On a fraction of the data it would end weaker than the students' short runs
# (20000 samples: 85 %, below the tiny student from scratch), and a student distilled from it
# then learns less than one trained alone.
train teacher configs/fashion-mnist/teacher.yaml 2 --set optim.schedule.warmup_steps=50
echo "== caching the teacher's logits (2 augmented views per sample)"
"$BIN" cache configs/fashion-mnist/tiny_distill.yaml --set "teacher.checkpoint=$TEACHER_CKPT" \
    --set "teacher.cache=$CACHE" --set teacher.views=2
train tiny-scratch configs/fashion-mnist/tiny_scratch.yaml 4 --set optim.schedule.warmup_steps=50
train tiny-distill configs/fashion-mnist/tiny_distill.yaml 4 --set optim.schedule.warmup_steps=50 \
    --set "teacher.checkpoint=$TEACHER_CKPT" --set "teacher.cache=$CACHE" --set teacher.views=2
train mlp configs/fashion-mnist/mlp.yaml 3

field() { sed -n "s/.*\"$2\": \([^,}]*\).*/\1/p" "$OUT/$1/result.json"; }

echo
echo "== evaluating the checkpoints"
for row in teacher:teacher tiny-scratch:tiny_scratch tiny-distill:tiny_distill mlp:mlp; do
    "$BIN" eval "configs/fashion-mnist/${row#*:}.yaml" --checkpoint "$OUT/${row%%:*}/last.safetensors"
done

echo
echo "quickstart results (Fashion-MNIST test set, 10000 images; short runs, see README for full ones)"
printf '%-30s %10s %8s %14s %10s\n' model params epochs "test accuracy" "time (s)"
for row in "teacher:teacher CNN" "tiny-scratch:tiny student, from scratch" \
    "tiny-distill:tiny student, distilled" "mlp:MLP 784-256-10"; do
    name=${row%%:*}
    label=${row#*:}
    acc=$(field "$name" test_acc)
    printf '%-30s %10s %8s %13.2f%% %10s\n' "$label" "$(field "$name" params)" \
        "$(field "$name" epochs)" "$(awk -v a="$acc" 'BEGIN{print 100*a}')" \
        "$(field "$name" train_seconds)"
done

echo
echo "== export and the microcontroller runtime: $BIN report $OUT/report.yaml"
cat >"$OUT/report.yaml" <<YAML
out_dir: $OUT/report
rows:
  - {label: teacher CNN fp32, config: configs/fashion-mnist/teacher.yaml,
     checkpoint: $OUT/teacher/last.safetensors}
  - {label: student scratch fp32, config: configs/fashion-mnist/tiny_scratch.yaml,
     checkpoint: $OUT/tiny-scratch/last.safetensors}
  - {label: student distilled fp32, config: configs/fashion-mnist/tiny_distill.yaml,
     checkpoint: $OUT/tiny-distill/last.safetensors}
  - {label: distilled INT8, config: configs/fashion-mnist/tiny_distill.yaml,
     checkpoint: $OUT/tiny-distill/last.safetensors, quant: int8}
  - {label: distilled INT4, config: configs/fashion-mnist/tiny_distill.yaml,
     checkpoint: $OUT/tiny-distill/last.safetensors, quant: int4}
YAML
"$BIN" report "$OUT/report.yaml"
