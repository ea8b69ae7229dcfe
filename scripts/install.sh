#!/usr/bin/env bash
# Create the virtual environment (if missing) and install mukv into it.
#
#   scripts/install.sh [--dev]     installs .[serve], or .[dev,serve,ray] with --dev
#   scripts/install.sh --system-packages   # only the system tools the tests need (see below)
#
# torch first: on a machine without a CUDA GPU, torch==2.13.0 (CPU build) is installed before
# the package, because an unpinned torch would pull a multi-GB CUDA build. With a GPU, or with a
# torch already in the environment, the package's own range is used and the existing torch kept.
set -euo pipefail

VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
CPU_TORCH="${CPU_TORCH:-torch==2.13.0}"
# The server (`mukv serve`) is part of every install; --dev adds the test and lint tools and Ray
# (the tests of `mukv eval --workers` run a real local Ray instance).
extras="[serve]"
dev=""
if [[ "${1:-}" == "--dev" ]]; then
  extras="[dev,serve,ray]"
  dev=1
fi

# System tools the tests need, installed with apt-get when missing (as root, or through sudo
# without a password); where that is impossible it warns and the tests that need them skip.
# MUKV_NO_SYSTEM_PACKAGES=1 leaves the system alone.
#   ffmpeg            serves real live streams on loopback (tests/integration/test_live_source.py)
#   rtsp-server-perl  a real RTSP server on loopback that ffmpeg publishes to (the RTSP source test)
#   chromium          the real headless browser that drives the server's web page (Debian's build:
#                     Playwright's own browser downloads are not needed)
SYSTEM_TOOLS=(ffmpeg:ffmpeg rtsp-server-perl:rtsp-server-perl chromium:chromium)

install_system_packages() {
  [[ "${MUKV_NO_SYSTEM_PACKAGES:-}" == "1" ]] && return 0
  local missing=() entry
  for entry in "${SYSTEM_TOOLS[@]}"; do
    command -v "${entry%%:*}" >/dev/null 2>&1 || missing+=("${entry#*:}")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  local apt=()
  if [[ "$(id -u)" == "0" ]]; then
    apt=(env DEBIAN_FRONTEND=noninteractive apt-get)
  elif command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
    apt=(sudo -n env DEBIAN_FRONTEND=noninteractive apt-get)
  fi
  if ! command -v apt-get >/dev/null 2>&1 || [[ ${#apt[@]} -eq 0 ]]; then
    echo "warning: ${missing[*]} missing and cannot be installed here (needs apt-get as root or sudo);" \
      "the tests that need them will skip." >&2
    return 0
  fi
  echo "installing ${missing[*]} (system tools the tests use)"
  # A fresh image often has no package lists: update once if the first try cannot find a package.
  if ! "${apt[@]}" install -y --no-install-recommends "${missing[@]}"; then
    "${apt[@]}" update && "${apt[@]}" install -y --no-install-recommends "${missing[@]}" \
      || echo "warning: installing ${missing[*]} failed; the tests that need them will skip" >&2
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
