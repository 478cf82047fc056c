#!/usr/bin/env bash
# test_mcu_student.sh - the real tiny student, exported and run on a Cortex-M4.
#
#   test_mcu_student.sh DISTILL TEST_MCU_QEMU_SH KDM_RANDOM_MODEL
# Exports the distilled tiny student (tests/data/tiny_distill_s1.safetensors, trained by
# bench/reference_runs.sh, optimizer state removed) at INT8 and INT4 after training, and the
# QAT-trained one (tests/data/tiny_distill_qat4_s1.safetensors) at INT4, each with 16 test samples
# and the test-set accuracies, then
#  - checks the accuracy targets on the 10000 Fashion-MNIST test images: INT8 within 0.5 pp of
#    the float model, INT4 with QAT within 1.5 pp of the distilled float student;
#  - checks the footprint does not grow past what the export measured when this test was
#    written (blob and arena bytes), so a regression in the exporter or runtime fails here;
#  - runs all three on QEMU's Cortex-M4 and Cortex-M0 (test_mcu_qemu.sh: the DSP build and the
#    ARMv6-M build): every output byte equal to the host's.
# Exit 77 when Fashion-MNIST or the Cortex-M tools are missing.
set -u
distill=$1
qemu_test=$2
gen=$3
src=${KD_SOURCE_DIR:?set by CTest}
work=${KD_BINARY_DIR:?set by CTest}/mcu_student
[ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] ||
    [ -n "${DISTILL_DATA:-}" ] || { echo "SKIP: Fashion-MNIST not installed"; exit 77; }
mkdir -p "$work"
cd "$src" || exit 1

export_one() { # name config checkpoint quant
    "$distill" export "$2" --checkpoint "$3" --quant "$4" --format c --samples 16 --calib 500 \
        --out "$work/$1" --no-progress >"$work/$1.log" 2>&1 || {
        echo "FAIL: export $1"
        cat "$work/$1.log"
        exit 1
    }
}
export_one int8 configs/fashion-mnist/tiny_distill.yaml tests/data/tiny_distill_s1.safetensors int8
export_one int4 configs/fashion-mnist/tiny_distill.yaml tests/data/tiny_distill_s1.safetensors int4
export_one qat4 configs/fashion-mnist/tiny_distill_qat4.yaml \
    tests/data/tiny_distill_qat4_s1.safetensors int4

# accuracy and footprint, from each report.json
python3 - "$work" <<'PY' || exit 1
import json, sys
w = sys.argv[1]
r = {k: json.load(open(f"{w}/{k}/report.json")) for k in ("int8", "int4", "qat4")}
fail = 0
def check(ok, what):
    global fail
    print(("ok   " if ok else "FAIL ") + what)
    fail |= not ok
f8, i8 = r["int8"]["accuracy"]["float"], r["int8"]["accuracy"]["int"]
check(f8 - i8 <= 0.005, f"INT8 {100*i8:.2f}% within 0.5 pp of float {100*f8:.2f}%")
q4 = r["qat4"]["accuracy"]["int"]
check(f8 - q4 <= 0.015, f"INT4 QAT {100*q4:.2f}% within 1.5 pp of distilled float {100*f8:.2f}%")
# footprint as measured when written (INT8 blob 18036 B with its conv rows padded to 8 bytes and
# int8 shifts, INT4 11160 B, arena 11568 B with the depthwise kernel's row buffers)
for k, blob in (("int8", 18036), ("int4", 11160), ("qat4", 11160)):
    t = r[k]["totals"]
    check(t["blob_bytes"] <= blob, f"{k} blob {t['blob_bytes']} B <= {blob} B")
    check(t["arena_bytes"] <= 11568, f"{k} arena {t['arena_bytes']} B <= 11568 B")
sys.exit(fail)
PY
bash "$qemu_test" "$gen" "$work/int8" "$work/int4" "$work/qat4"
