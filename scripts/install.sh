#!/usr/bin/env bash
# One-step set-up: Debian's Fashion-MNIST (the offline demo data), the Python packages, DeepSpeed.
# Safe to re-run: each step is skipped when already satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."

FMNIST_DIR=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ] && command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "[install] Debian package dataset-fashion-mnist"
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

PY=${PYTHON:-python3}
echo "[install] Python packages (requirements.txt)"
$PY -m pip install -q --disable-pip-version-check -r requirements.txt

# DeepSpeed's setup.py imports torch, so it must build against the torch installed above.
if ! $PY -c "import deepspeed" >/dev/null 2>&1; then
    echo "[install] deepspeed (source build, about a minute)"
    DS_BUILD_OPS=0 $PY -m pip install -q --disable-pip-version-check --no-build-isolation "deepspeed==0.19.8"
fi
echo "[install] done"
