#!/usr/bin/env bash
# setup.sh - install what is missing, build, and run the quickstart or the tests.
#
#   ./setup.sh quickstart   install, build, train the Fashion-MNIST models briefly, print a table
#   ./setup.sh test         install, build, run the whole test suite (what CI runs)
#   ./setup.sh build        install and build only
#
# Dependencies come from Debian's packages; nothing is downloaded from anywhere else.
set -euo pipefail
cd "$(dirname "$0")"

PACKAGES=(build-essential cmake pkg-config libopenblas-dev libopenblas-openmp-dev libyaml-dev libcjson-dev zlib1g-dev
          libhdf5-dev hdf5-filter-plugin libcmocka-dev dataset-fashion-mnist python3-h5py
          gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm clang libclang-rt-dev
          libopenmpi-dev openmpi-bin)
BUILD_DIR=${BUILD_DIR:-build}
JOBS=$(nproc 2>/dev/null || echo 2)

install_deps() {
    local missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "setup: installing ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    if ! $sudo apt-get install -y -q "${missing[@]}" >/tmp/distill-apt.log 2>&1; then
        $sudo apt-get update -q >/tmp/distill-apt.log 2>&1
        $sudo apt-get install -y -q "${missing[@]}" >>/tmp/distill-apt.log 2>&1 || {
            echo "setup: apt-get install failed; see /tmp/distill-apt.log" >&2
            exit 1
        }
    fi
}

build() {
    cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release >/dev/null
    cmake --build "$BUILD_DIR" -j "$JOBS"
}

usage="usage: $0 [build|test|quickstart]"
if [ $# -gt 1 ]; then
    echo "setup: one command at most, got: $*" >&2
    echo "$usage" >&2
    exit 2
fi
cmd=${1:-build}
case "$cmd" in
help | -h | --help)
    echo "$usage"
    sed -n 's/^#   /  /p' "$0"
    ;;
build)
    install_deps
    build
    ;;
test)
    install_deps
    build
    ctest --test-dir "$BUILD_DIR" --output-on-failure -j "$JOBS" ${CTEST_ARGS:-}
    ;;
quickstart)
    install_deps
    build
    exec bash bench/quickstart.sh "$BUILD_DIR/distill"
    ;;
*)
    echo "setup: unknown command '$cmd'" >&2
    echo "$usage" >&2
    exit 2
    ;;
esac
