#!/usr/bin/env bash
# Installs Fashion-MNIST from Debian's `dataset-fashion-mnist` package when it is missing.
# Idempotent. Where apt-get is not available, says how to point distill at the IDX files.
set -euo pipefail
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/train-images-idx3-ubyte.gz" ] || [ -n "${DISTILL_FASHION_MNIST:-}" ]; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
      echo "error: installing Fashion-MNIST needs root: run 'apt-get install dataset-fashion-mnist' as root" >&2
      exit 1
    fi
  fi
  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist, 29.5 MB)"
  $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
    || { $sudo apt-get update -qq >/dev/null 2>&1 && $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null; }
  exit 0
fi
echo "error: apt-get is not available to install Fashion-MNIST. Download the four IDX files" >&2
echo "  (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz," >&2
echo "  t10k-labels-idx1-ubyte.gz) into a directory and set DISTILL_FASHION_MNIST=/that/dir" >&2
echo "  (or data.path in the config)." >&2
exit 1
