#!/usr/bin/env bash
# Set up everything backhaul needs on a fresh Debian machine with Python 3.11:
# a virtualenv in .venv with backhaul installed in place and its Cython extensions built.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel cython
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/python -c 'import backhaul.protocol.framing as f; print("backhaul ready; frame codec:", f.IMPLEMENTATION)'
