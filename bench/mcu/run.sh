#!/usr/bin/env bash
# run.sh - cross-build the distill runtime's Cortex-M firmware (bench/mcu) and run it in QEMU.
#
#   bench/mcu/run.sh [bench] EXPORT_DIR
#       The Cortex-M benchmark of an export (`distill export --format c --samples N --out DIR`:
#       model.c, model.h, samples.bin). Builds for cortex-m4 with the DSP kernels and with
#       KDM_FORCE_REF=1, for cortex-m7 and for cortex-m0plus; runs firmware A (run_samples: the
#       outputs must equal the host runtime's in samples.bin byte for byte) and firmware B
#       (bench_layers) under -icount shift=0 on mps2-an386 (M4), mps2-an500 (M7) and microbit
#       (the Cortex-M0+ build on QEMU's Cortex-M0: the same ARMv6-M instructions);
#       prints the per-layer table (DSP beside reference), the flash / RAM figures and the
#       targets, and writes bench/results/mcu.json (KDM_MCU_JSON overrides the path).
#   bench/mcu/run.sh check EXPORT_DIR [BUILD_DIR [CPU]]
#       Firmware A in QEMU, for cortex-m4 (DSP kernels; the default) or CPU (cortex-m7 on
#       mps2-an500, cortex-m0plus on microbit): every sample's output bytes must equal
#       samples.bin's host output, and the instruction counter must pass its calibration.
#   bench/mcu/run.sh compare LOG SAMPLES_BIN
#       Only the comparison: a run_samples log against a samples.bin (tests use it to show that
#       a changed byte is caught).
#   bench/mcu/run.sh cmsis EXPORT_DIR CMSIS_NN_DIR
#       Firmware D on the Cortex-M4: every conv / depthwise / fully-connected layer of the export
#       run by the kdm DSP kernels and by Arm's CMSIS-NN (a checkout of
#       github.com/ARM-software/CMSIS-NN, built with CMSIS_NN_OPT, default -O2) on the same
#       input; instructions per MAC side by side, and the outputs must be byte-identical.
#   bench/mcu/run.sh kcheck CASES_C [BUILD_DIR]
#       Firmware C (kernel_check) with the DSP kernels and with KDM_FORCE_REF=1 on the
#       Cortex-M4, and the Cortex-M0+ build (the blocked kernels of matmul_fast.c, the
#       reference kernels otherwise; its ARMv6-M code runs on mps2-an386, as the cases need
#       more RAM than the microbit has): each must reproduce the host outputs and all three
#       print identical lines. The runtime is built with the KDM_ROUNDING_MASK the
#       cases file names (kdm_random_model --rounding).
# Exit status: 0 pass, 1 fail, 3 (bench) when the model does not fit the Cortex-M4 board's
# memory, 77 when arm-none-eabi-gcc, qemu-system-arm or cmake is missing.
#
# Instruction counts: QEMU's -icount shift=0 runs the virtual clock at 1 ns per instruction; the
# MPS2 FPGA counter ticks at 25 MHz on it (1 tick = 40 instructions), the microbit's SysTick at
# 16 MHz (62.5; bench/mcu/fw.h); every firmware first times a loop of 2,000,000 instructions
# and this script checks it.
# Environment: KDM_MCU_BUILD (build root, default build/mcu), KDM_QEMU_TIMEOUT (seconds per
# QEMU run, default 120), KDM_RUNTIME_DIR (runtime sources, default mcu_runtime), JOBS (2).
set -u -o pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
jobs=${JOBS:-2}
qemu_timeout=${KDM_QEMU_TIMEOUT:-120}
calib_expect=2000000
calib_tol=130 # two counter ticks (62.5 instructions on the microbit) and the reads around them

die() {
    echo "run.sh: $*" >&2
    exit 1
}

need_tools() {
    local t
    for t in arm-none-eabi-gcc arm-none-eabi-size qemu-system-arm cmake od; do
        if ! command -v "$t" >/dev/null 2>&1; then
            echo "SKIP: $t not found (Debian: apt-get install gcc-arm-none-eabi" \
                "libnewlib-arm-none-eabi qemu-system-arm cmake)"
            exit 77
        fi
    done
}

# build DIR CPU FORCE_REF TARGETS... -- extra cmake -D arguments come from $cfg_args. With
# fit_or_skip=1 in the environment, a link that overflows the board's memory (a model too large
# for it) returns 1 instead of failing.
build() {
    local dir=$1 cpu=$2 ref=$3
    shift 3
    local rt=() stamp
    [ -n "${KDM_RUNTIME_DIR:-}" ] && rt=("-DKDM_RUNTIME_DIR=$KDM_RUNTIME_DIR")
    mkdir -p "$dir"
    # CMake reads the toolchain's CPU flags only when it first configures a directory: one
    # configured for another CPU or runtime is configured afresh, never reused with its flags
    stamp="cpu=$cpu runtime=${KDM_RUNTIME_DIR:-}"
    if [ -f "$dir/CMakeCache.txt" ] && [ "$(cat "$dir/kdm_build_for" 2>/dev/null)" != "$stamp" ]; then
        rm -rf "$dir/CMakeCache.txt" "$dir/CMakeFiles"
    fi
    printf '%s\n' "$stamp" >"$dir/kdm_build_for"
    if ! cmake -S "$here" -B "$dir" -DCMAKE_TOOLCHAIN_FILE="$root/cmake/arm-none-eabi.cmake" \
        -DKDM_CPU="$cpu" -DKDM_FORCE_REF="$ref" "${rt[@]}" "${cfg_args[@]}" \
        >"$dir/configure.log" 2>&1; then
        cat "$dir/configure.log" >&2
        die "configuring $dir failed"
    fi
    local t targets=()
    for t in "$@"; do targets+=(--target "$t"); done
    if ! cmake --build "$dir" -j "$jobs" "${targets[@]}" >"$dir/build.log" 2>&1; then
        if [ "${fit_or_skip:-0}" = 1 ] && grep -q "region .* overflowed by" "$dir/build.log"; then
            return 1
        fi
        cat "$dir/build.log" >&2
        die "building $dir failed"
    fi
}

# qemu MACHINE ELF LOG [extra qemu args]: run to the firmware's exit; its status is returned.
# QEMU 7.2 writes semihosting output to stderr, so both streams go to LOG.
qemu() {
    local machine=$1 elf=$2 log=$3
    shift 3
    timeout "$qemu_timeout" qemu-system-arm -M "$machine" -nographic \
        -semihosting-config enable=on,target=native "$@" -kernel "$elf" >"$log" 2>&1
}

# field LOG PREFIX KEY: the value of KEY=... on the first line starting with PREFIX
field() {
    awk -v p="$2" -v k="$3" 'index($0, p) == 1 {
        for (i = 1; i <= NF; i++) if (index($i, k "=") == 1) { print substr($i, length(k) + 2); exit }
    }' "$1"
}

# check_calib LOG: the tick -> instruction conversion held for this run
check_calib() {
    local got
    got=$(field "$1" "calib " instr)
    if [ -z "$got" ] || [ $((got > calib_expect ? got - calib_expect : calib_expect - got)) -gt \
        $calib_tol ]; then
        echo "FAIL: calibration loop of $calib_expect instructions measured '${got}'" \
            "(is QEMU run with -icount shift=0?)"
        return 1
    fi
}

# compare_samples LOG SAMPLES_BIN: every "sample i ... out=HEX" line equals record i's host output
compare_samples() {
    local log=$1 bin=$2 n in out rec i off want got bad=0
    read -r n in out < <(od -An -v -tu4 -j4 -N12 "$bin")
    [ "$(head -c4 "$bin")" = KDMS ] || die "$bin: not a samples file"
    rec=$((in + 4 + out))
    for ((i = 0; i < n; i++)); do
        off=$((16 + i * rec + in + 4))
        want=$(od -An -v -tx1 -j "$off" -N "$out" "$bin" | tr -d ' \n')
        got=$(awk -v i="$i" '$1 == "sample" && $2 == i { sub(/.* out=/, ""); print; exit }' "$log")
        if [ "$got" != "$want" ]; then
            [ $bad -lt 5 ] && echo "  sample $i: host $want, QEMU ${got:-<none>}"
            bad=$((bad + 1))
        fi
    done
    echo "host vs QEMU: $((n - bad))/$n samples byte-identical"
    [ $bad -eq 0 ] && [ "$n" -gt 0 ]
}

# run_check MACHINE ELF EXPORT_DIR LOG: firmware A, compared with the host
run_check() {
    local machine=$1 elf=$2 dir=$3 log=$4 rc
    qemu "$machine" "$elf" "$log" -icount shift=0
    rc=$?
    if [ $rc -ne 0 ]; then
        tail -5 "$log"
        echo "FAIL: run_samples on $machine exited with $rc"
        return 1
    fi
    check_calib "$log" || return 1
    compare_samples "$log" "$dir/samples.bin" || return 1
    # no Cortex-M retires more than two MACs per instruction (SMLAD): fewer instructions than
    # MACs / 2 means kernels did not run (ops compiled out of the dispatch, say), and equal
    # outputs on both sides would prove nothing
    local macs instr
    macs=$(field "$log" summary macs)
    instr=$(field "$log" summary instr_min)
    if [ -z "$macs" ] || [ -z "$instr" ] || [ $((instr * 2)) -lt "$macs" ]; then
        echo "FAIL: $instr instructions per inference for $macs MACs: the kernels did not run"
        return 1
    fi
    echo "instructions per inference ($machine): $(field "$log" summary instr_mean)" \
        "(min $(field "$log" summary instr_min), max $(field "$log" summary instr_max))"
}

# machine_of CPU: the QEMU board its firmware is linked for (bench/mcu/CMakeLists.txt)
machine_of() {
    case $1 in
    cortex-m4) echo mps2-an386 ;;
    cortex-m7) echo mps2-an500 ;;
    cortex-m0plus) echo microbit ;;
    *) die "unknown CPU '$1' (cortex-m4, cortex-m7 or cortex-m0plus)" ;;
    esac
}

# variant_machine VARIANT: the board of one of cmd_bench's builds (m4-dsp, m4-ref, m7, m0plus)
variant_machine() {
    case $1 in
    m7) machine_of cortex-m7 ;;
    m0plus) machine_of cortex-m0plus ;;
    *) machine_of cortex-m4 ;;
    esac
}

cmd_check() {
    local dir=$1 bdir=${2:-${KDM_MCU_BUILD:-$root/build/mcu}/check} cpu=${3:-cortex-m4} machine
    [ -f "$dir/samples.bin" ] || die "$dir has no samples.bin"
    machine=$(machine_of "$cpu")
    dir=$(cd "$dir" && pwd -P)
    cfg_args=(-DKDM_EXPORT_DIR="$dir" -DKDM_KCHECK_SOURCE=)
    if ! fit_or_skip=1 build "$bdir" "$cpu" OFF run_samples; then
        local over what
        over=$(grep -m1 -o "region .* overflowed by [0-9]* bytes" "$bdir/build.log")
        case $over in
        *FLASH*) what="flash holds the runtime and the model's blob (model.c)" ;;
        *) what="RAM holds the stack and the model's arena: KDM_MODEL_ARENA_SIZE in $dir/model.h" ;;
        esac
        die "$dir does not fit $machine's memory: $over ($what; full link log: $bdir/build.log)"
    fi
    run_check "$machine" "$bdir/run_samples.elf" "$dir" "$bdir/run_samples.log"
}

cmd_compare() {
    if [ $# -ne 2 ] || [ ! -f "$1" ] || [ ! -f "$2" ]; then
        die "compare needs LOG SAMPLES_BIN"
    fi
    compare_samples "$1" "$2"
}

cmd_kcheck() {
    local src=$1 bdir=${2:-${KDM_MCU_BUILD:-$root/build/mcu}/kcheck} k rc fail=0
    [ -f "$src" ] || die "$src not found"
    src=$(cd "$(dirname "$src")" && pwd)/$(basename "$src")
    cfg_args=(-DKDM_EXPORT_DIR= -DKDM_KCHECK_SOURCE="$src")
    # the runtime built for the cases' rounding (kdm_random_model writes the mask; none: both)
    local rmask
    rmask=$(sed -n 's|^/\* kcheck-rounding-mask \(0x[0-9a-fA-F]*\) \*/$|\1|p' "$src" | head -1)
    cfg_args+=(-DKDM_ROUNDING_MASK="$rmask")
    for k in dsp ref m0; do
        if [ $k = m0 ]; then
            # ARMv6-M code on the M4 board: the cases' arena and outputs pass the microbit's 16 KB
            cfg_args+=(-DKDM_FW_BOARD=mps2_an386)
            build "$bdir/$k" cortex-m0plus OFF kernel_check
            qemu mps2-an386 "$bdir/$k/kernel_check.elf" "$bdir/$k/kernel_check.log"
        else
            build "$bdir/$k" cortex-m4 "$([ $k = ref ] && echo ON || echo OFF)" kernel_check
            qemu mps2-an386 "$bdir/$k/kernel_check.elf" "$bdir/$k/kernel_check.log"
        fi
        rc=$?
        grep -v ' ok ' "$bdir/$k/kernel_check.log" | head -20
        [ $rc -eq 0 ] || { echo "FAIL: kernel_check ($k) exited with $rc"; fail=1; }
    done
    # the runtime must have built different kernels for the two (KDM_FORCE_REF honoured)
    if [ "$(arm-none-eabi-size "$bdir/dsp/kernel_check.elf" | awk 'NR == 2 { print $1 }')" = \
        "$(arm-none-eabi-size "$bdir/ref/kernel_check.elf" | awk 'NR == 2 { print $1 }')" ]; then
        echo "FAIL: the DSP and KDM_FORCE_REF builds have the same code size: is KDM_FORCE_REF" \
            "honoured and are DSP kernels built for cortex-m4?"
        fail=1
    fi
    for k in ref m0; do
        if ! diff <(grep '^case ' "$bdir/dsp/kernel_check.log") \
            <(grep '^case ' "$bdir/$k/kernel_check.log") >/dev/null; then
            echo "FAIL: the M4 DSP kernels and the $k build differ:"
            diff <(grep '^case ' "$bdir/dsp/kernel_check.log") \
                <(grep '^case ' "$bdir/$k/kernel_check.log") | head -20
            fail=1
        fi
    done
    [ $fail -eq 0 ] && echo "kernel check: $(grep -c '^case ' "$bdir/dsp/kernel_check.log")" \
        "cases, DSP = reference on the Cortex-M4 = Cortex-M0+ = host"
    return $fail
}

# map_bytes MAP ARCHIVE[(MEMBER_PREFIX]: bytes of code and constants the link took from ARCHIVE's members
# (those whose name starts with MEMBER_PREFIX when one is given)
# (input sections .text* / .rodata*; a long section name puts address, size and file on the
# next line of the map)
map_bytes() {
    awk -v pat="$2" '
        BEGIN { lib = index(pat, "(") ? pat : pat "(" }
        function hex(s, i, v) {
            s = tolower(s); sub(/^0x/, "", s); v = 0
            for (i = 1; i <= length(s); i++) v = v * 16 + index("0123456789abcdef", substr(s, i, 1)) - 1
            return v
        }
        /^Discarded input sections/ { skip = 1 } /^Linker script and memory map/ { skip = 0 }
        skip { next }
        /^ \.(text|rodata)[^ ]*$/ { pending = 1; next }
        pending && /^ +0x/ { if (index($3, lib)) sum += hex($2); pending = 0; next }
        /^ \.(text|rodata)/ && NF >= 4 && $2 ~ /^0x/ { if (index($4, lib)) sum += hex($3) }
        { pending = 0 }
        END { print sum + 0 }' "$1"
}

cmd_bench() {
    local dir=$1 broot=${KDM_MCU_BUILD:-$root/build/mcu} json=${KDM_MCU_JSON:-$root/bench/results/mcu.json}
    [ -f "$dir/samples.bin" ] || die "$dir has no samples.bin"
    dir=$(cd "$dir" && pwd -P)
    cfg_args=(-DKDM_EXPORT_DIR="$dir" -DKDM_KCHECK_SOURCE=)
    local ok=1 v variants=(m4-dsp m4-ref m7) m0=0
    echo "== building (cortex-m4 dsp / ref, cortex-m7, cortex-m0plus) into $broot"
    if ! fit_or_skip=1 build "$broot/m4-dsp" cortex-m4 OFF; then
        echo "run.sh: $dir does not fit mps2-an386's memory: $(grep -m1 -o \
            "region .* overflowed by [0-9]* bytes" "$broot/m4-dsp/build.log") (full link log:" \
            "$broot/m4-dsp/build.log)" >&2
        exit 3
    fi
    build "$broot/m4-ref" cortex-m4 ON
    build "$broot/m7" cortex-m7 OFF
    # the microbit has 256 KB of flash and 16 KB of RAM: a larger model (the teacher) gets no M0+
    # figures rather than a failed benchmark
    if fit_or_skip=1 build "$broot/m0plus" cortex-m0plus OFF; then
        variants+=(m0plus)
        m0=1
    else
        echo "note: the model does not fit QEMU's microbit (256 KB flash, 16 KB RAM;" \
            "$broot/m0plus/build.log): no Cortex-M0+ figures"
    fi

    echo "== firmware A (run_samples)"
    for v in "${variants[@]}"; do
        run_check "$(variant_machine "$v")" "$broot/$v/run_samples.elf" "$dir" \
            "$broot/$v/run_samples.log" || ok=0
    done

    echo "== firmware B (bench_layers) and footprint"
    local machine
    for v in "${variants[@]}"; do
        machine=$(variant_machine "$v")
        for fw in bench_layers footprint; do
            if ! qemu "$machine" "$broot/$v/$fw.elf" "$broot/$v/$fw.log" -icount shift=0; then
                tail -3 "$broot/$v/$fw.log"
                die "$fw ($v) failed"
            fi
        done
        check_calib "$broot/$v/bench_layers.log" || ok=0
    done

    # sizes: text/data/bss of the footprint firmware, the runtime's share from the link map
    local sizes=() line
    for v in "${variants[@]}"; do
        read -r text data bss _ < <(arm-none-eabi-size "$broot/$v/footprint.elf" | tail -1)
        local rt blob libc
        rt=$(map_bytes "$broot/$v/footprint.map" libkdm.a)
        libc=$(($(map_bytes "$broot/$v/footprint.map" libgcc.a) + $(map_bytes "$broot/$v/footprint.map" libc_nano.a)))
        blob=$(arm-none-eabi-nm -S "$broot/$v/footprint.elf" | awk '$4 == "kdm_model_blob" { print $2 }')
        blob=$((16#${blob:-0}))
        sizes+=("$v $text $data $bss $rt $blob $libc $(field "$broot/$v/footprint.log" footprint stack_size) $(field "$broot/$v/footprint.log" footprint stack_used)")
    done
    local stack_used arena stack_size
    stack_used=$(field "$broot/m4-dsp/footprint.log" footprint stack_used)
    stack_size=$(field "$broot/m4-dsp/footprint.log" footprint stack_size)
    arena=$(field "$broot/m4-dsp/footprint.log" footprint arena)

    local runtime_sha
    runtime_sha=$(cd "${KDM_RUNTIME_DIR:-$root/mcu_runtime}" && find . -name '*.[ch]' -o -name CMakeLists.txt |
        LC_ALL=C sort | xargs cat | sha256sum | cut -c1-16)

    mkdir -p "$(dirname "$json")"
    {
        echo "runtime_sha $runtime_sha"
        echo "export_dir $dir"
        # the export's report names its job and checkpoint; else model.h's first line
        local from=""
        if [ -f "$dir/report.json" ]; then
            from=$(sed -n 's/^[[:space:]]*"\(config\|checkpoint\)":[[:space:]]*"\(.*\)",*$/\1 \2/p' \
                "$dir/report.json" | head -2 | paste -sd ' ' | sed 's/ checkpoint /, checkpoint /')
        fi
        [ -n "$from" ] || from=$(head -1 "$dir/model.h" | sed 's|^/\*||; s|\*/$||')
        echo "model $(printf '%s' "$from" | sed 's/["\\]//g')"
        # the export's own width (an INT4 export keeps some layers at 8 bits with --int8-layers)
        if [ -f "$dir/report.json" ]; then
            echo "weights $(sed -n 's/^[[:space:]]*"weights":[[:space:]]*"\(int[48]\)".*/\1/p' \
                "$dir/report.json" | head -1)"
        fi
        echo "qemu $(qemu-system-arm --version | head -1 | awk '{ print $4 }')"
        echo "gcc $(arm-none-eabi-gcc -dumpversion)"
        echo "calib $(field "$broot/m4-dsp/bench_layers.log" "calib " instr)"
        for v in "${variants[@]}"; do
            echo "invoke $v $(field "$broot/$v/run_samples.log" summary instr_mean)" \
                "$(field "$broot/$v/run_samples.log" summary host_match)" \
                "$(field "$broot/$v/run_samples.log" summary samples)"
        done
        echo "stack $stack_used $stack_size $arena"
        for line in "${sizes[@]}"; do echo "size $line"; done
        grep '^layer ' "$broot/m4-dsp/bench_layers.log" | sed 's/^layer/dsp/'
        grep '^layer ' "$broot/m4-ref/bench_layers.log" | sed 's/^layer/ref/'
        grep '^layer ' "$broot/m7/bench_layers.log" | sed 's/^layer/m7/'
        if [ $m0 -eq 1 ]; then
            grep '^layer ' "$broot/m0plus/bench_layers.log" | sed 's/^layer/m0/'
        fi
    } >"$broot/results.txt"
    echo "== arm-none-eabi-size of the footprint firmware"
    (cd "$broot" && for v in "${variants[@]}"; do echo "$v/footprint.elf"; done |
        xargs arm-none-eabi-size)
    awk -v json="$json" -f "$here/report.awk" "$broot/results.txt" || ok=0
    echo "wrote $json"
    [ $ok -eq 1 ]
}

cmd_cmsis() {
    [ $# -eq 2 ] || die "cmsis needs EXPORT_DIR CMSIS_NN_DIR"
    local dir=$1 cm=$2 bdir=${KDM_MCU_BUILD:-$root/build/mcu}/cmsis rc
    [ -f "$dir/samples.bin" ] || die "$dir has no samples.bin"
    [ -f "$cm/Include/arm_nnfunctions.h" ] ||
        die "$cm is not a CMSIS-NN checkout (no Include/arm_nnfunctions.h;" \
            "git clone https://github.com/ARM-software/CMSIS-NN)"
    dir=$(cd "$dir" && pwd -P)
    cm=$(cd "$cm" && pwd)
    local opt=${CMSIS_NN_OPT:--O2} rounding=${CMSIS_NN_ROUNDING:-double}
    cfg_args=(-DKDM_EXPORT_DIR="$dir" -DKDM_KCHECK_SOURCE= -DCMSIS_NN_DIR="$cm"
        -DCMSIS_NN_OPT="$opt" -DCMSIS_NN_ROUNDING="$rounding")
    build "$bdir" cortex-m4 OFF cmsis_nn_layers
    qemu mps2-an386 "$bdir/cmsis_nn_layers.elf" "$bdir/cmsis_nn_layers.log" -icount shift=0
    rc=$?
    if [ $rc -ne 0 ] && [ $rc -ne 3 ]; then
        tail -5 "$bdir/cmsis_nn_layers.log"
        die "cmsis_nn_layers exited with $rc"
    fi
    check_calib "$bdir/cmsis_nn_layers.log" || return 1
    local kb cb fcb ver commit=""
    kb=$(map_bytes "$bdir/cmsis_nn_layers.map" libkdm.a)
    cb=$(map_bytes "$bdir/cmsis_nn_layers.map" libcmsis_nn.a)
    # CMSIS-NN's fully-connected kernels: linked, run only for a layer with one multiplier
    fcb=$(($(map_bytes "$bdir/cmsis_nn_layers.map" "libcmsis_nn.a(arm_fully_connected") +
        $(map_bytes "$bdir/cmsis_nn_layers.map" "libcmsis_nn.a(arm_nn_vec_mat_mult_t")))
    ver=$(sed -n 's/^ \* \$Revision: *//p' "$cm/Include/arm_nnfunctions.h" | head -1)
    # the commit only when CMSIS_NN_DIR is the top of its own git checkout
    if [ "$(cd "$cm" && git rev-parse --show-toplevel 2>/dev/null)" = "$cm" ]; then
        commit=", commit $(cd "$cm" && git rev-parse --short HEAD)"
    fi
    echo "Cortex-M4 (QEMU mps2-an386, -icount shift=0), the same layer on the same input bytes:" \
        "kdm DSP kernels vs CMSIS-NN (arm_nnfunctions.h ${ver:-?}$commit, $opt, $rounding" \
        "rounding; int8 through the wrappers TFLite Micro calls, int4 through the kernels they" \
        "pick)"
    awk '
        function f(k, i) { for (i = 1; i <= NF; i++) if (index($i, k "=") == 1) return substr($i, length(k) + 2); return "" }
        $1 == "cmsis" {
            m = f("macs"); a = f("kdm_instr"); b = f("cmsis_instr"); mm = f("mismatch"); k = f("k")
            if (k == "0x0") k = "-"
            if (!hdr++) printf "%3s %-9s %2s %-22s %-5s %9s | %9s %6s | %9s %6s | %12s | %s\n", "op", "type", "wb", "in -> out", "k", "MACs", "kdm", "i/MAC", "CMSIS-NN", "i/MAC", "CMSIS-NN/kdm", "outputs"
            if (b == 0) {
                printf "%3s %-9s %2s %-22s %-5s %9d | %9d %6.3f | %9s %6s | %12s | %s\n", f("op"), f("type"), f("wbits"), f("in") "->" f("out"), k, m, a, a / m, "-", "-", "-", "no CMSIS-NN kernel in this harness"
                next
            }
            printf "%3s %-9s %2s %-22s %-5s %9d | %9d %6.3f | %9d %6.3f | %12.3f | %s (%s)\n", f("op"), f("type"), f("wbits"), f("in") "->" f("out"), k, m, a, a / m, b, b / m, b / a, mm == 0 ? "identical" : mm " bytes differ", f("fn")
            sa += a; sb += b; bad += mm; n++
        }
        END {
            if (!n) { print "FAIL: no layer was run by both"; exit 1 }
            printf "    %-50s | %9d        | %9d        | %12.3f |\n", "sum over the layers both ran", sa, sb, sb / sa
            if (bad) { print "FAIL: kdm and CMSIS-NN outputs differ"; exit 1 }
        }' "$bdir/cmsis_nn_layers.log" || return 1
    echo "code linked in this firmware (input sections from its link map): kdm runtime $kb B" \
        "(the whole runtime: loader, dispatch, kdm_invoke_op); CMSIS-NN $cb B, of which $fcb B" \
        "are its fully-connected kernels (run only for a layer with one multiplier per layer)" \
        "and $((cb - fcb)) B the rest; TFLite Micro's interpreter comes on top"
}

mode=bench
case "${1:-}" in
bench | check | compare | kcheck | cmsis) mode=$1 && shift ;;
-h | --help)
    awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"
    exit 0
    ;;
esac
[ $# -ge 1 ] || {
    awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"
    exit 2
}
need_tools
"cmd_$mode" "$@"
