#!/usr/bin/env bash
# Set up everything backhaul needs on a fresh Debian machine with Python 3.11:
# a virtualenv in .venv with backhaul installed in place and its Cython extensions built.
# An argument names the optional dependencies to add (tools/test.sh passes "test").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

# Debian splits venv/ensurepip and the C headers out of python3; the Cython build needs a compiler.
need=()
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
"$PYTHON" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' || need+=(python3-dev)
command -v cc >/dev/null || need+=(gcc)
if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    echo "installing ${need[*]} with apt-get"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel cython
extras=${1:+[$1]}
.venv/bin/python -m pip install -q -e ".$extras"
.venv/bin/python -c 'from backhaul.protocol import framing, mux; from backhaul.transport import tunnel, pipe; from backhaul.relay.http import reader, exchange; print("backhaul ready; compiled twins:", ", ".join(f"{m.__name__.rpartition(chr(46))[2]} {m.IMPLEMENTATION}" for m in (framing, mux, tunnel, pipe, reader, exchange)))'
