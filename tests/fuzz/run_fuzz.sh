#!/usr/bin/env bash
# run_fuzz.sh - build the .kdm loader, checkpoint reader, job loader and data set reader fuzz
# targets with clang's libFuzzer and run them briefly.
#
#   KD_SOURCE_DIR=<repo> FUZZ_DIR=<build dir> SEEDGEN=<kdm_fuzz_seeds> bash run_fuzz.sh
#
# Compiles tests/fuzz/fuzz_kdm_load.c with every runtime source (mcu_runtime/src/*.c) twice,
# with -fsanitize=fuzzer,address,undefined: once with the reference kernels, once with
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

flags=(-std=c99 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
    -fno-omit-frame-pointer -I"$src/mcu_runtime/include" -I"$src/mcu_runtime/src")
rm -rf "$out/seeds" && mkdir -p "$out/seeds"
"$seeds" "$out/seeds" || { echo "FAIL: seed generator"; exit 1; }

fail=0
for variant in ref dsp; do
    exe=$out/fuzz_kdm_load_$variant
    def=()
    [ $variant = dsp ] && def=(-DKDM_FORCE_DSP=1)
    if ! "$cc" "${flags[@]}" "${def[@]}" "$src/tests/fuzz/fuzz_kdm_load.c" \
        "$src"/mcu_runtime/src/*.c -o "$exe" >"$out/build_$variant.log" 2>&1; then
        cat "$out/build_$variant.log"
        echo "FAIL: building the $variant fuzz target"
        fail=1
        continue
    fi
    corpus=$out/corpus_$variant
    rm -rf "$corpus" && mkdir -p "$corpus" && cp "$out"/seeds/* "$corpus"/
    (cd "$out" && "$exe" -seed=1 -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 "$corpus" >"$out/run_$variant.log" 2>&1)
    rc=$?
    grep -E "^stat::number_of_executed_units|^stat::new_units_added" "$out/run_$variant.log" |
        sed "s/^/$variant: /"
    if [ $rc -ne 0 ]; then
        tail -40 "$out/run_$variant.log"
        echo "FAIL: the $variant fuzz target found a problem (exit $rc); see $out"
        fail=1
    fi
done
# the checkpoint reader (engine/safetensors.c), from the small checkpoints its seed writer saves
st_src=("$src/engine/safetensors.c" "$src/engine/status.c" "$src/engine/fileio.c"
    "$src/engine/tensor.c")
st_flags=(-std=c11 -D_GNU_SOURCE -I"$src/engine" -isystem /usr/include/cjson)
exe=$out/fuzz_safetensors
corpus=$out/corpus_safetensors
rm -rf "$corpus" && mkdir -p "$corpus"
if ! "$cc" "${st_flags[@]}" -O1 -DFUZZ_SEEDS "$src/tests/fuzz/fuzz_safetensors.c" "${st_src[@]}" \
    -lcjson -o "$out/safetensors_seeds" >"$out/build_safetensors.log" 2>&1 ||
    ! "$cc" "${st_flags[@]}" -g -O1 -fsanitize=fuzzer,address,undefined \
        -fno-sanitize-recover=undefined -fno-omit-frame-pointer \
        "$src/tests/fuzz/fuzz_safetensors.c" "${st_src[@]}" -lcjson -o "$exe" \
        >>"$out/build_safetensors.log" 2>&1; then
    cat "$out/build_safetensors.log"
    echo "FAIL: building the safetensors fuzz target"
    fail=1
elif ! "$out/safetensors_seeds" "$corpus"; then
    echo "FAIL: the safetensors seed writer"
    fail=1
else
    (cd "$out" && "$exe" -seed=1 -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 "$corpus" >"$out/run_safetensors.log" 2>&1)
    rc=$?
    grep -E "^stat::number_of_executed_units|^stat::new_units_added" "$out/run_safetensors.log" |
        sed "s/^/safetensors: /"
    if [ $rc -ne 0 ]; then
        tail -40 "$out/run_safetensors.log"
        echo "FAIL: the safetensors fuzz target found a problem (exit $rc); see $out"
        fail=1
    fi
fi
# the job loader (engine/job.c, engine/config_yaml.c), from the project's configs and one with a
# --set override, run from the repository root so that the model files they name resolve
cfg_src=("$src/engine/job.c" "$src/engine/config_yaml.c" "$src/engine/status.c"
    "$src/engine/optim.c" "$src/engine/rng.c" "$src/data/dataset.c" "$src/data/idx.c")
exe=$out/fuzz_config
corpus=$out/corpus_config
rm -rf "$corpus" && mkdir -p "$corpus" && cp "$src"/configs/fashion-mnist/*.yaml "$corpus"/
{ echo "@optim.lr=0.25"; cat "$src/configs/fashion-mnist/tiny_scratch.yaml"; } >"$corpus/set.yaml"
if ! "$cc" -std=gnu11 -D_GNU_SOURCE -I"$src/engine" -I"$src/data" -I"$src/kernels" -g -O1 \
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer \
    "$src/tests/fuzz/fuzz_config.c" "${cfg_src[@]}" -lyaml -lz -lm -o "$exe" \
    >"$out/build_config.log" 2>&1; then
    cat "$out/build_config.log"
    echo "FAIL: building the config fuzz target"
    fail=1
else
    (cd "$src" && FUZZ_TMP=$out "$exe" -seed=1 -max_total_time="$secs" -timeout=10 \
        -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$out/" "$corpus" \
        >"$out/run_config.log" 2>&1)
    rc=$?
    grep -E "^stat::number_of_executed_units|^stat::new_units_added" "$out/run_config.log" |
        sed "s/^/config: /"
    if [ $rc -ne 0 ]; then
        tail -40 "$out/run_config.log"
        echo "FAIL: the config fuzz target found a problem (exit $rc); see $out"
        fail=1
    fi
fi
# the data set reader (data/idx.c), from the raw and gzip'd IDX files its seed build writes
idx_src=("$src/data/idx.c" "$src/engine/status.c")
idx_flags=(-std=gnu11 -D_GNU_SOURCE -I"$src/engine" -I"$src/data")
exe=$out/fuzz_idx
corpus=$out/corpus_idx
rm -rf "$corpus" && mkdir -p "$corpus"
if ! "$cc" "${idx_flags[@]}" -O1 -DFUZZ_SEEDS "$src/tests/fuzz/fuzz_idx.c" "${idx_src[@]}" -lz \
    -o "$out/idx_seeds" >"$out/build_idx.log" 2>&1 ||
    ! "$cc" "${idx_flags[@]}" -g -O1 -fsanitize=fuzzer,address,undefined \
        -fno-sanitize-recover=undefined -fno-omit-frame-pointer "$src/tests/fuzz/fuzz_idx.c" \
        "${idx_src[@]}" -lz -o "$exe" >>"$out/build_idx.log" 2>&1; then
    cat "$out/build_idx.log"
    echo "FAIL: building the IDX fuzz target"
    fail=1
elif ! "$out/idx_seeds" "$corpus"; then
    echo "FAIL: the IDX seed writer"
    fail=1
else
    (cd "$out" && FUZZ_TMP=$out "$exe" -seed=1 -max_total_time="$secs" -timeout=10 \
        -rss_limit_mb=2048 -print_final_stats=1 "$corpus" >"$out/run_idx.log" 2>&1)
    rc=$?
    grep -E "^stat::number_of_executed_units|^stat::new_units_added" "$out/run_idx.log" |
        sed "s/^/idx: /"
    if [ $rc -ne 0 ]; then
        tail -40 "$out/run_idx.log"
        echo "FAIL: the IDX fuzz target found a problem (exit $rc); see $out"
        fail=1
    fi
fi
[ $fail -eq 0 ] && echo "fuzz: no crash in ${secs}s per target"
exit $fail
