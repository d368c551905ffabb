#!/usr/bin/env bash
# Install Fashion-MNIST for condense, offline-first (idempotent).
#   1. already at /usr/share/datasets/fashion-mnist  -> nothing to do
#   2. running as root with apt-get                 -> apt-get install dataset-fashion-mnist
#   3. otherwise                                    -> explain the alternatives
set -euo pipefail

DIR="${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
FILES=(train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte)

have_all() {
    local f
    for f in "${FILES[@]}"; do
        [[ -f "$DIR/$f.gz" || -f "$DIR/$f" ]] || return 1
    done
}

if have_all; then
    echo "Fashion-MNIST is already installed in $DIR"
    exit 0
fi

if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing the Debian package dataset-fashion-mnist ..."
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y dataset-fashion-mnist; then
        echo "apt-get install failed; refreshing the package lists and retrying ..."
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y dataset-fashion-mnist
    fi
    if have_all; then
        echo "Fashion-MNIST installed in $DIR"
        exit 0
    fi
    echo "dataset-fashion-mnist is installed but $DIR lacks the 4 IDX files" >&2
    exit 1
fi

cat <<MSG
Fashion-MNIST is not in $DIR and this script cannot install it (needs root and apt-get).
Ways to get it:
  - as root on Debian/Ubuntu:  apt-get install dataset-fashion-mnist
  - online: nothing to do; condense downloads it with torchvision on first use
    (into ~/.cache/condense/data, or into dataset.root=PATH when given)
  - manually: put the 4 files ${FILES[*]} (.gz or not)
    in a folder and pass dataset.root=PATH (or set CONDENSE_DATA_ROOT=PATH)
MSG
