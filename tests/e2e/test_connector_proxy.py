"""A connector behind an HTTP CONNECT proxy (tinyproxy, a real one): registration, the
control API and the tunnels all go through it, with mTLS end to end inside CONNECT."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from .harness import BACKHAUL, Proc, System, echoes, free_port, wait_until

pytestmark = pytest.mark.e2e


class Tinyproxy:
    """tinyproxy on 127.0.0.1 with its own config and log; restartable on the same port."""

    def __init__(self, workdir: Path, procs: list, port: int | None = None) -> None:
        self.workdir = workdir
        self.procs = procs
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"tinyproxy-{self.port}.log"
        self.proc: Proc | None = None

    def start(self, connect_ports: list[int] | None = None, auth: tuple[str, str] | None = None) -> "Tinyproxy":
        binary = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
        if not Path(binary).exists():
            pytest.fail("tinyproxy is not installed; run tools/bootstrap.sh")
        lines = [
            f"Port {self.port}", "Listen 127.0.0.1", "Timeout 600", f'LogFile "{self.log_path}"',
            "LogLevel Connect", "MaxClients 100", "Allow 127.0.0.1",
        ]
        lines += [f"ConnectPort {port}" for port in connect_ports or []]
        if auth:
            lines.append(f"BasicAuth {auth[0]} {auth[1]}")
        conf = self.workdir / f"tinyproxy-{self.port}-{len(self.procs)}.conf"
        conf.write_text("\n".join(lines) + "\n")
        self.proc = Proc(f"tinyproxy-{len(self.procs)}", [binary, "-d", "-c", str(conf)], self.workdir)
        self.procs.append(self.proc)
        wait_until(self._listening, 10, "tinyproxy to listen")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def connects_to(self, port: int) -> int:
        """How many CONNECTs to 127.0.0.1:port the proxy's own log shows."""
        if not self.log_path.exists():
            return 0
        return self.log_path.read_text(errors="replace").count(f"CONNECT 127.0.0.1:{port} ")

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False


@pytest.fixture
def proxies(tmp_path):
    """make(port=None) -> Tinyproxy (not started); every proxy is stopped at the end."""
    procs: list[Proc] = []

    def make(port: int | None = None) -> Tinyproxy:
        return Tinyproxy(tmp_path, procs, port)

    try:
        yield make
    finally:
        for proc in procs:
            proc.stop()


def register(system: System, name: str, proxy_url: str, check: bool = True, token: str | None = None):
    state = system.workdir / f"conn-{name}"
    result = system.cli(
        "connector", "register", "--service", system.url, "--token", token or system.token(),
        "--ca-sha256", system.ca_sha256, "--state-dir", str(state), "--name", name, "--proxy", proxy_url,
        check=check,
    )
    return state, result


def run_connector(system: System, name: str, state: Path, *args: str, env: dict | None = None) -> Proc:
    proc = Proc(
        f"connector-{name}-{len(system.procs)}",
        BACKHAUL + ["connector", "run", "--state-dir", str(state), "--workers", "1", "--tunnels", "2", *args],
        system.workdir,
        {**system.env, **(env or {})},
    )
    system.procs.append(proc)
    system.connectors[name] = proc
    return proc


def test_connector_registers_and_serves_a_tcp_app_through_a_proxy_with_credentials(system, backend, proxies):
    proxy = proxies().start(connect_ports=[system.port], auth=("conn", "s3cret"))
    authed = f"http://conn:s3cret@127.0.0.1:{proxy.port}"
    state, _ = register(system, "behind", authed)
    registered = proxy.connects_to(system.port)
    assert registered >= 1, "registration did not go through the proxy"
    echo = backend("echo")
    run_connector(system, "behind", state, "--proxy", authed)
    port = system.publish_tcp("echo", echo.target)
    system.wait_app(port)
    # The two tunnels and the config pull came through the proxy too.
    assert proxy.connects_to(system.port) >= registered + 3
    # Without the proxy the tunnels are gone: proof that they rode it.
    proxy.stop()
    wait_until(lambda: not echoes(port), 20, "the app to stop answering once the proxy is gone", interval=0.2)
    connector = system.connectors["behind"]
    wait_until(lambda: "cannot reach the proxy" in connector.log(), 30, "a failed redial while the proxy is down")
    # The connector keeps retrying with backoff and comes back once the proxy is up again.
    proxy.start(connect_ports=[system.port], auth=("conn", "s3cret"))
    system.wait_app(port, timeout=60)


def test_https_proxy_from_the_environment_is_used_unless_no_proxy_names_the_relay(system, backend, proxies):
    proxy = proxies().start(connect_ports=[system.port])
    state, _ = register(system, "env", proxy.url)
    before = proxy.connects_to(system.port)
    echo = backend("echo")
    run_connector(system, "env", state, env={"HTTPS_PROXY": proxy.url, "NO_PROXY": "example.invalid"})
    port = system.publish_tcp("echo", echo.target)
    system.wait_app(port)
    assert proxy.connects_to(system.port) >= before + 3
    system.connectors["env"].stop()
    # NO_PROXY naming the relay's host: straight to the relay even with the proxy stopped.
    proxy.stop()
    run_connector(system, "env", state, env={"https_proxy": proxy.url, "no_proxy": "127.0.0.1"})
    system.wait_app(port)


@pytest.mark.codec_independent  # registration only: no tunnel is ever opened
def test_refusing_or_missing_proxies_get_a_clear_error(system, proxies):
    token = system.token(uses=10)  # a refused registration never reaches the relay, so never uses it
    closed_port = free_port()
    _, result = register(system, "nothing", f"http://127.0.0.1:{closed_port}", check=False, token=token)
    assert result.returncode != 0
    assert f"cannot reach the proxy at http://127.0.0.1:{closed_port}" in result.stderr

    strict = proxies().start(connect_ports=[443])
    _, result = register(system, "strict", strict.url, check=False, token=token)
    assert result.returncode != 0
    assert "refuses CONNECT" in result.stderr and "403" in result.stderr, result.stderr

    guarded = proxies().start(connect_ports=[system.port], auth=("conn", "s3cret"))
    _, result = register(system, "guarded", guarded.url, check=False, token=token)
    assert result.returncode != 0
    assert "wants authentication" in result.stderr and "407" in result.stderr, result.stderr
    _, result = register(system, "guarded2", f"http://conn:wrong@127.0.0.1:{guarded.port}", check=False, token=token)
    assert result.returncode != 0 and "check the user and password" in result.stderr, result.stderr

    _, result = register(system, "bad", "socks5://127.0.0.1:1080", check=False, token=token)
    assert result.returncode == 2 and "http:// proxy URL" in result.stderr


def tunnel_refusals(proc: Proc) -> int:
    return sum("tunnel connect failed" in line and "refuses CONNECT" in line for line in proc.log().splitlines())


def test_running_connector_retries_a_refusing_proxy_with_backoff_until_it_lets_it_through(system, backend, proxies):
    state = system.register("later")  # registered directly; it runs behind the proxy
    proxy = proxies().start(connect_ports=[443])
    echo = backend("echo")
    port = system.publish_tcp("echo", echo.target)
    proc = run_connector(system, "later", state, "--proxy", proxy.url)
    # The first call is the config pull (aiohttp through the proxy): refused, retried.
    wait_until(lambda: proc.log().count("refuses CONNECT") >= 2, 30, "two refused config pulls in the connector's log")
    assert proc.alive() and not echoes(port)
    # The proxy's admin allows the relay's port: the connector gets through on its next attempt.
    proxy.stop()
    proxy.start(connect_ports=[system.port])
    system.wait_app(port, timeout=60)
    # Refused again: now the tunnels' own CONNECT handshake is refused, and retried with backoff.
    proxy.stop()
    proxy.start(connect_ports=[443])
    wait_until(lambda: tunnel_refusals(proc) >= 2, 30, "two refused tunnel dials in the connector's log")
    assert not echoes(port)
    proxy.stop()
    proxy.start(connect_ports=[system.port])
    system.wait_app(port, timeout=60)
