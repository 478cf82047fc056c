#!/usr/bin/env bash
# test_mcu_qemu.sh - the exported model gives the same bytes on a Cortex-M4 (QEMU mps2-an386,
# firmware A with the DSP kernels) and on a Cortex-M0+ (the ARMv6-M build without DSP kernels,
# on QEMU's Cortex-M0 microbit) as the host runtime wrote into samples.bin.
#
#   test_mcu_qemu.sh KDM_RANDOM_MODEL [EXPORT_DIR...]
# Without EXPORT_DIRs it makes two with kdm_random_model (the tiny student's shapes, INT8 and
# INT4, random weights); given EXPORT_DIRs (`distill export --format c --samples N --out DIR`)
# it checks those. Each goes through bench/mcu/run.sh check: cross-build, run under
# -icount shift=0, the instruction-counter calibration, every output byte against the host's.
# The comparison itself is then shown to catch one changed byte. Exit 0 pass, 1 fail, 77 when
# the cross compiler or QEMU is missing.
set -u
gen=$1
shift
src=${KD_SOURCE_DIR:?set by CTest}
work=${KD_BINARY_DIR:?set by CTest}/mcu_test
for t in arm-none-eabi-gcc qemu-system-arm; do
    command -v "$t" >/dev/null 2>&1 || {
        echo "SKIP: $t not installed"
        exit 77
    }
done

dirs=("$@")
if [ ${#dirs[@]} -eq 0 ]; then
    for q in int8 int4; do
        mkdir -p "$work/export_$q"
        "$gen" export --quant "$q" --samples 10 --seed 7 --out "$work/export_$q" || exit 1
        dirs+=("$work/export_$q")
    done
fi

fail=0
for d in "${dirs[@]}"; do
    for cpu in cortex-m4 cortex-m0plus; do
        b=$work/check_$(basename "$d")
        [ $cpu = cortex-m4 ] || b=${b}_$cpu
        echo "== $d ($cpu)"
        bash "$src/bench/mcu/run.sh" check "$d" "$b" "$cpu"
        rc=$?
        [ $rc -eq 77 ] && exit 77
        [ $rc -eq 0 ] || fail=1
    done
done

# the comparison must see a single flipped bit in the last sample's last output byte
d=${dirs[0]}
b=$work/check_$(basename "$d")
if [ -f "$b/run_samples.log" ]; then
    cp "$d/samples.bin" "$work/flipped.bin"
    size=$(stat -c %s "$work/flipped.bin")
    byte=$(od -An -tu1 -j $((size - 1)) -N1 "$work/flipped.bin" | tr -d ' ')
    printf '%b' "\\x$(printf %02x $((byte ^ 1)))" |
        dd of="$work/flipped.bin" bs=1 seek=$((size - 1)) conv=notrunc status=none
    if bash "$src/bench/mcu/run.sh" compare "$b/run_samples.log" "$work/flipped.bin" >/dev/null; then
        echo "FAIL: the comparison did not notice a changed output byte"
        fail=1
    fi
fi
exit $fail
