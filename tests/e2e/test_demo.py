"""`backhaul demo` runs the whole system on loopback and cleans up after itself."""

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_demo_serves_the_private_app_through_a_tunnel_and_stops_cleanly():
    result = subprocess.run(
        [sys.executable, "-m", "backhaul", "demo", "--seconds", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    assert "try:  curl http://127.0.0.1:" in result.stdout
    assert re.search(r"demo-connector\s+default\s+active", result.stdout)
    assert result.stdout.rstrip().endswith("demo stopped")
