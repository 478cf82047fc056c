#!/usr/bin/env bash
# format_check.sh - every C, CUDA and header file matches .clang-format.
# Exits 77 (skipped) when clang-format is not installed, 1 listing the files that differ.
set -u
cd "${KD_SOURCE_DIR:-$(dirname "$0")/..}"
command -v clang-format >/dev/null || { echo "SKIP: clang-format not installed"; exit 77; }
bad=0
while IFS= read -r f; do
    if ! clang-format --dry-run --Werror "$f" >/dev/null 2>&1; then
        echo "not formatted: $f (run: clang-format -i $f)"
        bad=1
    fi
done < <(git ls-files -co --exclude-standard '*.c' '*.h' '*.cu' 2>/dev/null || find engine data kernels tests bench mcu_runtime exporters -name '*.[ch]' -o -name '*.cu')
[ $bad -eq 0 ] && echo "all sources formatted"
exit $bad
