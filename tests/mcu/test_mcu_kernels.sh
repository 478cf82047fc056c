#!/usr/bin/env bash
# test_mcu_kernels.sh - the runtime's DSP and reference kernels agree bit for bit on a
# Cortex-M4 (QEMU mps2-an386), on randomized shapes: 64 small models from kdm_random_model
# (conv / depthwise / fully-connected at 8 and 4 bits with odd channel counts, kernel sizes,
# strides and padding; pools, add, softmax, short chains; both requantization roundings), run by
# firmware C built once with the DSP kernels and once with KDM_FORCE_REF=1. Each build must
# reproduce the host runtime's bytes and the two builds must print identical lines
# (bench/mcu/run.sh kcheck). Then 32 more in single rounding, with the runtime built for single
# rounding only (KDM_ROUNDING_MASK), whose convolution jobs requantize differently.
# Exit 0 pass, 1 fail, 77 when the cross compiler or QEMU is missing.
#
#   test_mcu_kernels.sh KDM_RANDOM_MODEL
set -u
gen=$1
src=${KD_SOURCE_DIR:?set by CTest}
work=${KD_BINARY_DIR:?set by CTest}/mcu_test/kcheck
for t in arm-none-eabi-gcc qemu-system-arm; do
    command -v "$t" >/dev/null 2>&1 || {
        echo "SKIP: $t not installed"
        exit 77
    }
done
mkdir -p "$work"
"$gen" kcheck --cases 64 --seed 11 --out "$work/kcheck_cases.c" || exit 1
bash "$src/bench/mcu/run.sh" kcheck "$work/kcheck_cases.c" "$work" || exit 1
mkdir -p "$work/single"
"$gen" kcheck --cases 32 --seed 12 --rounding single --out "$work/single/kcheck_cases.c" || exit 1
bash "$src/bench/mcu/run.sh" kcheck "$work/single/kcheck_cases.c" "$work/single"
