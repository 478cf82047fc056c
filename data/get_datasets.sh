#!/usr/bin/env bash
# get_datasets.sh - make Fashion-MNIST available to distill.
#
# Installs Debian's dataset-fashion-mnist package when
# /usr/share/datasets/fashion-mnist is missing, then says where the data is.
# Safe to run repeatedly: an existing install is left alone. Nothing is
# downloaded from anywhere but the system's own apt sources. MNIST has no
# Debian package; put its IDX files under $DISTILL_DATA/mnist by hand.
set -euo pipefail

DIR=/usr/share/datasets/fashion-mnist
PKG=dataset-fashion-mnist

have_data() {
    [ -d "$DIR" ] && ls "$DIR"/t10k-images-idx3-ubyte* >/dev/null 2>&1
}

if ! have_data; then
    SUDO=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            SUDO=(sudo)
        else
            echo "get_datasets.sh: need root to install $PKG (no sudo found)" >&2
            exit 1
        fi
    fi
    echo "installing $PKG with apt-get ..."
    # Refresh the package lists only if they turn out to be stale.
    if ! "${SUDO[@]}" apt-get install -y "$PKG"; then
        "${SUDO[@]}" apt-get update
        "${SUDO[@]}" apt-get install -y "$PKG"
    fi
fi

if ! have_data; then
    echo "get_datasets.sh: $PKG is installed but $DIR holds no data files" >&2
    exit 1
fi

echo "fashion-mnist: $DIR"
ls -l "$DIR"
if [ -n "${DISTILL_DATA:-}" ]; then
    echo "note: DISTILL_DATA=$DISTILL_DATA is searched first ($DISTILL_DATA/fashion-mnist)"
fi
