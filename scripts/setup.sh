#!/usr/bin/env bash
# Set up a fresh Debian machine: Fashion-MNIST from the Debian package (if missing) and the Python requirements.
# Idempotent and quiet; safe to run before every command.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing the Debian package dataset-fashion-mnist" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
python -m pip install -q --disable-pip-version-check -r requirements.txt 2>&1 | grep -vE "is ignored: it is neither|Running pip as the 'root' user" >&2 || true
python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | grep -vE "Running pip as the 'root' user" >&2 || true
# found, not imported: importing torchvision alone takes seconds
python -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ('torch', 'torchvision', 'hydra', 'wandb', 'timm')))" \
  || { echo "setup: Python requirements failed to install" >&2; exit 1; }
