#!/usr/bin/env bash
# Set up, then run the whole system on loopback with its embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/bootstrap.sh
exec .venv/bin/backhaul demo "$@"
