#!/usr/bin/env bash
# Create the virtual environment (if missing) and install mukv into it.
#
#   scripts/install.sh [--dev]
#
# torch first: on a machine without a CUDA GPU, torch==2.13.0 (CPU build) is installed before
# the package, because an unpinned torch would pull a multi-GB CUDA build. With a GPU, or with a
# torch already in the environment, the package's own range is used and the existing torch kept.
set -euo pipefail

VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
CPU_TORCH="${CPU_TORCH:-torch==2.13.0}"
extras=""
if [[ "${1:-}" == "--dev" ]]; then
  extras="[dev]"
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "creating virtual environment in $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "CUDA GPU found: installing torch from the package's range"
    "$PY" -m pip install "torch>=2.4,<3"
  else
    echo "no CUDA GPU: installing $CPU_TORCH (CPU build)"
    "$PY" -m pip install "$CPU_TORCH"
  fi
fi

"$PY" -m pip install -e ".${extras}"
