"""Origin health end to end: an app whose origin is down on one connector's machine is
routed only through the connector that can reach it, and `admin app list` says which.

Two connectors of one group run on two "machines" (network namespaces, see netns.py),
each with its own 127.0.0.1 and its own greeting backend at the same 127.0.0.1:PORT,
the app's one target. Stopping a machine's backend takes the origin down for that
connector only: its TCP connects are refused, for real, while the other connector
still reaches its own. Each backend greets with its machine's name, so every user
connection shows which connector carried it. Two namespaces are the faithful single-host
stand-in for two hosts; without them the test is skipped, saying why.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from . import netns
from .harness import BACKHAUL, free_port, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: Connections held open at once: least-loaded routing spreads them over every tunnel.
HELD = 8


@pytest.fixture
def sockdir():
    """A short directory for unix sockets (their paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="bh-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _served(port: int, count: int = HELD) -> Counter:
    """Open ``count`` connections to the app one after the other, holding them all, and
    count the greetings: which machine's backend each reached ("closed": refused)."""
    seen: Counter = Counter()
    held = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            held.append(sock)
            line = b""
            while not line.endswith(b"\n"):
                chunk = sock.recv(100)
                if not chunk:
                    break
                line += chunk
            seen[line.decode().strip() or "closed"] += 1
    finally:
        for sock in held:
            sock.close()
    return seen


def _api(system, method: str, path: str, body=None):
    """An admin API call in-process (polling through the CLI would cost a second per look)."""
    from backhaul.admin.client import call, resolve_target

    target = resolve_target(service=system.url, token_file=None, data_dir=str(system.data_dir), environ={})
    return call(target, method, path, body)


def _reachability(system, app: str) -> dict:
    return {a["name"]: a for a in _api(system, "GET", "/v1/apps")}[app]["reachability"]


def _publish_and_register(system, app: str, target: str, names: list[str]) -> tuple[int, dict]:
    """`admin app publish` and one `connector register` per name, run side by side (each CLI
    run costs a second or more on a busy machine); returns the app's port and the state dirs."""
    token = _api(system, "POST", "/v1/tokens", {"uses": len(names)})["token"]
    port = free_port()
    states = {name: system.workdir / f"conn-{name}" for name in names}
    admin = ["admin", "--service", system.url, "--data-dir", str(system.data_dir)]
    commands = [admin + ["app", "publish", app, "--tcp", str(port), "--target", target]] + [
        ["connector", "register", "--service", system.url, "--token", token, "--ca-sha256", system.ca_sha256,
         "--state-dir", str(state), "--name", name]
        for name, state in states.items()
    ]
    runs = [
        subprocess.Popen(BACKHAUL + argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        for argv in commands
    ]
    for run in runs:
        _, err = run.communicate(timeout=60)
        assert run.returncode == 0, err
    return port, states


def _by_name(reach: dict) -> dict[str, bool | None]:
    return {c["name"]: c["reachable"] for c in reach["connectors"]}


def test_origin_down_on_one_connector_sends_traffic_only_through_the_other(system, sockdir):
    reason = netns.unavailable()
    if reason:
        pytest.skip(f"needs network namespaces: {reason}")
    bridge = netns.HostBridge("relay", system.port, sockdir, system.workdir, system.procs)
    origin_port = free_port()
    port, states = _publish_and_register(system, "origin", f"127.0.0.1:{origin_port}", ["east", "west"])
    machines, backends = {}, {}
    for name, state in states.items():
        machine = machines[name] = netns.Machine(name, bridge, system.port, system.workdir, system.procs)
        backends[name] = machine.backend("greet", origin_port, name)
        machine.run(
            "connector",
            BACKHAUL + ["connector", "run", "--state-dir", str(state), "--workers", "1", "--tunnels", "2",
                        "--heartbeat", "1", "--health-interval", "0.3"],
            system.env,
        )

    # -- both reach it: the admin sees 2/2 and held connections spread over both
    wait_until(
        lambda: _by_name(_reachability(system, "origin")) == {"east": True, "west": True},
        30, "both connectors to report the origin reachable", interval=0.3,
    )
    assert _served(port).keys() == {"east", "west"}

    # -- the origin goes down on west's machine only
    backends["west"].stop()
    wait_until(
        lambda: _by_name(_reachability(system, "origin")) == {"east": True, "west": False},
        30, "west to report the origin unreachable", interval=0.3,
    )
    # west sent its report over its tunnels before the heartbeat the admin view came from
    assert _served(port, 2 * HELD) == Counter({"east": 2 * HELD})
    listed = {a["name"]: a for a in system.admin_json("app", "list")}
    reach = listed["origin"]["reachability"]
    assert (reach["active"], reach["reachable"], reach["unreachable"]) == (2, 1, 1)
    assert _by_name(reach) == {"east": True, "west": False}
    human = system.admin("app", "list").stdout
    assert "REACHABLE" in human.splitlines()[0] and "1/2 (down: west)" in human
    assert "origin unreachable" in _connector_log(system, "west")

    # -- healed: west's origin is back, traffic spreads again
    backends["west"] = machines["west"].backend("greet", origin_port, "west")
    wait_until(
        lambda: _by_name(_reachability(system, "origin")) == {"east": True, "west": True},
        30, "west to report the origin reachable again", interval=0.3,
    )
    assert _served(port).keys() == {"east", "west"}

    # -- down everywhere: the relay refuses at once and says why
    backends["east"].stop()
    backends["west"].stop()
    wait_until(
        lambda: _reachability(system, "origin")["unreachable"] == 2,
        30, "both connectors to report the origin unreachable", interval=0.3,
    )
    assert _served(port, 3) == Counter({"closed": 3})
    wait_until(
        lambda: "no connector in group 'default' can reach app 'origin'" in system.relay.log(),
        10, "the relay to log why it refused",
    )
    assert "0/2 (down: east, west)" in system.admin("app", "list").stdout


    # -- an http app's check can be an HTTP GET of a health path; a tcp app's cannot
    published = system.admin_json(
        "app", "publish", "portal", "--http", "portal.example.com", "--internal-url", "https://intranet.example:8443/",
        "--health-path", "/healthz",
    )
    assert published["health_path"] == "/healthz"
    refused = system.admin("app", "publish", "db", "--tcp", str(free_port()), "--target", "127.0.0.1:5432", "--health-path", "/x", check=False)
    assert refused.returncode != 0 and "--health-path is for --http apps" in refused.stderr


def _connector_log(system, machine: str) -> str:
    return "\n".join(p.log() for p in system.procs if p.name.startswith(f"{machine}-connector"))
