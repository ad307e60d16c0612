#!/usr/bin/env bash
# Set up everything backhaul needs on a fresh Debian machine with Python 3.11:
# a virtualenv in .venv with backhaul installed in place and its Cython extensions built.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

# Debian splits venv/ensurepip and the C headers out of python3; the Cython build needs a compiler.
need=()
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
"$PYTHON" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' || need+=(python3-dev)
command -v cc >/dev/null || need+=(gcc)
# Real peers of the end-to-end tests: a DNS server and client (UDP apps), an HTTP CONNECT proxy.
command -v dnsmasq >/dev/null || [ -x /usr/sbin/dnsmasq ] || need+=(dnsmasq-base)
command -v dig >/dev/null || need+=(bind9-dnsutils)
command -v tinyproxy >/dev/null || [ -x /usr/bin/tinyproxy ] || need+=(tinyproxy)
# The load balancer in front of several relay nodes (tests/e2e/cluster.py).
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
# PostgreSQL, the store of several relay nodes: the tests start a throwaway server (tests/postgres.py).
command -v initdb >/dev/null || compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need+=(postgresql)
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
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/python -c 'from backhaul.protocol import framing, mux; from backhaul.transport import tunnel, pipe; from backhaul.relay.http import reader, exchange; print("backhaul ready; compiled twins:", ", ".join(f"{m.__name__.rpartition(chr(46))[2]} {m.IMPLEMENTATION}" for m in (framing, mux, tunnel, pipe, reader, exchange)))'
