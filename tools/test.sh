#!/usr/bin/env bash
# Set up, then run the test suite twice: with the Cython extension (which must be there;
# the codec benchmarks run once each as a smoke) and with the pure-Python twin. Tests
# that never touch the codec (marked codec_independent: the control plane) would run
# identically twice, so the second pass leaves them out.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/bootstrap.sh test
tools/test-deps.sh
echo "== test suite, Cython codec"
BACKHAUL_REQUIRE_EXT=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests bench/test_bench_codec.py --benchmark-disable --durations=15 "$@"
echo "== test suite, pure-Python codec"
BACKHAUL_PURE=1 .venv/bin/python -m pytest -q -p no:cacheprovider -m "not codec_independent" tests --durations=15 "$@"
