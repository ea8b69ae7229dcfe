#!/usr/bin/env bash
# Create the virtual environment (if missing) and install mukv into it.
#
#   scripts/install.sh [--dev]     installs .[serve], or .[dev,serve] with --dev
#   scripts/install.sh --system-packages   # only the system tools the tests need (see below)
#
# torch first: on a machine without a CUDA GPU, torch==2.13.0 (CPU build) is installed before
# the package, because an unpinned torch would pull a multi-GB CUDA build. With a GPU, or with a
# torch already in the environment, the package's own range is used and the existing torch kept.
set -euo pipefail

VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
CPU_TORCH="${CPU_TORCH:-torch==2.13.0}"
# The server (`mukv serve`) is part of every install; --dev adds the test and lint tools.
extras="[serve]"
dev=""
if [[ "${1:-}" == "--dev" ]]; then
  extras="[dev,serve]"
  dev=1
fi

# System tools the tests need: ffmpeg serves a real live stream on loopback for the live-source
# tests (tests/integration/test_live_source.py). Installed with apt-get when missing (as root, or
# through sudo without a password); where that is impossible it warns and those tests skip.
# MUKV_NO_SYSTEM_PACKAGES=1 leaves the system alone.
install_system_packages() {
  if command -v ffmpeg >/dev/null 2>&1 || [[ "${MUKV_NO_SYSTEM_PACKAGES:-}" == "1" ]]; then
    return 0
  fi
  local apt=()
  if [[ "$(id -u)" == "0" ]]; then
    apt=(env DEBIAN_FRONTEND=noninteractive apt-get)
  elif command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
    apt=(sudo -n env DEBIAN_FRONTEND=noninteractive apt-get)
  fi
  if ! command -v apt-get >/dev/null 2>&1 || [[ ${#apt[@]} -eq 0 ]]; then
    echo "warning: ffmpeg is missing and cannot be installed here (needs apt-get as root or sudo);" \
      "the live-source tests will skip. Install ffmpeg to run them." >&2
    return 0
  fi
  echo "installing ffmpeg (live-source tests)"
  # A fresh image often has no package lists: update once if the first try cannot find the package.
  if ! "${apt[@]}" install -y --no-install-recommends ffmpeg; then
    "${apt[@]}" update && "${apt[@]}" install -y --no-install-recommends ffmpeg \
      || echo "warning: installing ffmpeg failed; the live-source tests will skip" >&2
  fi
}

if [[ "${1:-}" == "--system-packages" ]]; then
  install_system_packages
  exit 0
fi
if [[ -n "$dev" ]]; then
  install_system_packages
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
