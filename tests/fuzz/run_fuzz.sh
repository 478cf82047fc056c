#!/usr/bin/env bash
# run_fuzz.sh - build the .kdm loader, checkpoint reader, job loader and data set reader fuzz
# targets with clang's libFuzzer and run them briefly.
#
#   KD_SOURCE_DIR=<repo> FUZZ_DIR=<build dir> SEEDGEN=<kdm_fuzz_seeds> bash run_fuzz.sh
#
# Compiles tests/fuzz/fuzz_kdm_load.c with every runtime source (mcu_runtime/src/*.c) three
# times, with -fsanitize=fuzzer,address,undefined: with the host's default kernels (the blocked
# kernels for cores without DSP), with -DKDM_FORCE_REF=1 (the reference kernels) and with
# -DKDM_FORCE_DSP=1 (the DSP kernels on their portable emulation). Each runs for
# FUZZ_SECONDS (default 10) seconds with -seed=1 from a fresh copy of the seed corpus that
# kdm_fuzz_seeds writes. Then, as long each: tests/fuzz/fuzz_safetensors.c (engine/safetensors.c,
# the reader of every checkpoint a user names) from the checkpoints its seed build writes;
# tests/fuzz/fuzz_config.c (kd_job_load: a config file and a --set override) from the project's
# configs; tests/fuzz/fuzz_idx.c (kd_idx_load: IDX files, raw or gzip) from its seed build's
# files. Any crash, sanitizer report or leak fails the test; the reproducer is left in FUZZ_DIR
# (crash-*). Exit 0 pass, 1 fail, 77 when clang or its libFuzzer runtime is missing (CTest shows
# the test skipped).
set -u
src=${KD_SOURCE_DIR:?KD_SOURCE_DIR not set}
out=${FUZZ_DIR:?FUZZ_DIR not set}
seeds=${SEEDGEN:?SEEDGEN not set}
secs=${FUZZ_SECONDS:-10}
cc=${FUZZ_CC:-clang}

command -v "$cc" >/dev/null 2>&1 || { echo "SKIP: $cc not found"; exit 77; }
mkdir -p "$out"
probe=$out/probe.c
echo 'int LLVMFuzzerTestOneInput(const unsigned char *d, unsigned long n) { return d && n; }' \
    >"$probe"
if ! "$cc" -fsanitize=fuzzer "$probe" -o "$out/probe" >"$out/probe.log" 2>&1; then
    echo "SKIP: $cc cannot link -fsanitize=fuzzer (libFuzzer runtime missing?)"
    cat "$out/probe.log"
    exit 77
fi

# the sanitized libFuzzer build every target gets
san=(-g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
    -fno-omit-frame-pointer)
fail=0

# build NAME ARGS...: "$cc" ARGS, its output in build_NAME.log; on failure the log, FAIL, 1
build() {
    local name=$1
    shift
    if ! "$cc" "$@" >"$out/build_$name.log" 2>&1; then
        cat "$out/build_$name.log"
        echo "FAIL: building $name"
        fail=1
        return 1
    fi
}

# fuzz NAME EXE CORPUS DIR: EXE for $secs seconds from CORPUS with DIR as working directory
# (inputs' temporary files and any reproducer under $out); its stats, or FAIL and the log's tail
fuzz() {
    local name=$1 exe=$2 corpus=$3 dir=$4 rc
    (cd "$dir" && FUZZ_TMP=$out "$exe" -seed=1 -max_total_time="$secs" -timeout=10 \
        -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$out/" "$corpus" \
        >"$out/run_$name.log" 2>&1)
    rc=$?
    grep -E "^stat::number_of_executed_units|^stat::new_units_added" "$out/run_$name.log" |
        sed "s/^/$name: /"
    if [ $rc -ne 0 ]; then
        tail -40 "$out/run_$name.log"
        echo "FAIL: the $name fuzz target found a problem (exit $rc); see $out"
        fail=1
    fi
}

# a fresh, empty corpus directory for NAME
corpus() {
    rm -rf "$out/corpus_$1" && mkdir -p "$out/corpus_$1" && echo "$out/corpus_$1"
}

# seeded NAME ARGS...: a target whose own source, built with -DFUZZ_SEEDS, writes its seeds
seeded() {
    local name=$1 c
    shift
    build "${name}_seeds" -O1 -DFUZZ_SEEDS "$@" -o "$out/${name}_seeds" &&
        build "$name" "${san[@]}" "$@" -o "$out/fuzz_$name" || return
    c=$(corpus "$name")
    if "$out/${name}_seeds" "$c"; then
        fuzz "$name" "$out/fuzz_$name" "$c" "$out"
    else
        echo "FAIL: the $name seed writer"
        fail=1
    fi
}

# the .kdm loader with each kernel set: the host's default (the blocked kernels of cores without
# DSP for conv, depthwise and fully-connected), the reference kernels, and the DSP kernels'
# portable emulation
rm -rf "$out/seeds" && mkdir -p "$out/seeds"
"$seeds" "$out/seeds" || { echo "FAIL: seed generator"; exit 1; }
for variant in fast ref dsp; do
    def=()
    [ $variant = ref ] && def=(-DKDM_FORCE_REF=1)
    [ $variant = dsp ] && def=(-DKDM_FORCE_DSP=1)
    exe=$out/fuzz_kdm_load_$variant
    build "$variant" -std=c99 "${san[@]}" "${def[@]}" -I"$src/mcu_runtime/include" \
        -I"$src/mcu_runtime/src" "$src/tests/fuzz/fuzz_kdm_load.c" "$src"/mcu_runtime/src/*.c \
        -o "$exe" || continue
    c=$(corpus "$variant") && cp "$out"/seeds/* "$c"/
    fuzz "$variant" "$exe" "$c" "$out"
done

# the checkpoint reader (engine/safetensors.c), from the small checkpoints its seed writer saves
seeded safetensors -std=c11 -D_GNU_SOURCE -I"$src/engine" "$src/tests/fuzz/fuzz_safetensors.c" \
    "$src/engine/safetensors.c" "$src/engine/status.c" "$src/engine/fileio.c" \
    "$src/engine/tensor.c" -lcjson

# the job loader (engine/job.c, engine/config_yaml.c), from the project's configs and one with a
# --set override, run from the repository root so that the model files they name resolve
if build config -std=gnu11 -D_GNU_SOURCE -I"$src/engine" -I"$src/data" -I"$src/kernels" \
    "${san[@]}" "$src/tests/fuzz/fuzz_config.c" "$src/engine/job.c" "$src/engine/config_yaml.c" \
    "$src/data/cache_names.c" \
    "$src/engine/status.c" "$src/engine/optim.c" "$src/engine/rng.c" "$src/data/dataset.c" \
    "$src/data/idx.c" -lyaml -lz -lm -o "$out/fuzz_config"; then
    c=$(corpus config) && cp "$src"/configs/fashion-mnist/*.yaml "$c"/
    { echo "@optim.lr=0.25"; cat "$src/configs/fashion-mnist/tiny_scratch.yaml"; } >"$c/set.yaml"
    fuzz config "$out/fuzz_config" "$c" "$src"
fi

# the data set reader (data/idx.c), from the raw and gzip'd IDX files its seed build writes
seeded idx -std=gnu11 -D_GNU_SOURCE -I"$src/engine" -I"$src/data" "$src/tests/fuzz/fuzz_idx.c" \
    "$src/data/idx.c" "$src/engine/status.c" -lz
[ $fail -eq 0 ] && echo "fuzz: no crash in ${secs}s per target"
exit $fail
