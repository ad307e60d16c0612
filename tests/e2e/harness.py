"""End-to-end harness: real processes on 127.0.0.1, readiness through endpoints, cleanup always.

In the manner of frp's e2e framework: a port allocator, processes in their own process
groups (stopped by the test that started them, even when it fails), readiness checked
through the relay's health endpoint and through a real request, never by sleeping.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).parent
BACKHAUL = [sys.executable, "-m", "backhaul"]


def free_port() -> int:
    """A port nobody listens on right now (bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except Exception as exc:  # the thing is not up yet; say what it was at the end
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last_error!r})")


def echoes(port: int, probe: bytes = b"ping") -> bool:
    """True when a new connection to 127.0.0.1:port sends ``probe`` back; False if it cannot."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(probe)
            got = b""
            while len(got) < len(probe):
                chunk = sock.recv(1024)
                if not chunk:
                    return False
                got += chunk
            return got == probe
    except OSError:
        return False


@contextlib.contextmanager
def running_relay(workdir: Path, workers: int = 1, extra: tuple[str, ...] = ()):
    """An initialized relay, running; it and everything started through it stop on exit."""
    system = System(workdir)
    try:
        system.init()
        system.start_relay(workers=workers, extra=extra)
        yield system
    finally:
        system.stop()


class Proc:
    """A child process in its own process group with its output in a log file."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM the group, then SIGKILL what is left after ``timeout``."""
        if self.alive():
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
            except ProcessLookupError:
                pass
        self._kill_group()
        self._log.close()
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL the whole group at once, as a crash would."""
        self._kill_group()
        self.popen.wait(5)

    def _kill_group(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def rss_kib(self) -> int:
        """Resident memory of the process and its children, KiB."""
        total = 0
        pids = [self.popen.pid] + _children(self.popen.pid)
        for pid in pids:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except FileNotFoundError:
                pass
        return total


def _children(pid: int) -> list[int]:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return []
    out = [int(k) for k in kids]
    for kid in list(out):
        out.extend(_children(kid))
    return out


class Backend:
    """A private app stand-in (tests/e2e/backend.py) in its own process."""

    def __init__(self, mode: str, workdir: Path, procs: list, args: tuple[str, ...] = ()) -> None:
        portfile = workdir / f"backend-{mode}-{len(procs)}.port"
        argv = [sys.executable, str(HERE / "backend.py"), mode, str(portfile), *args]
        self.proc = Proc(f"backend-{mode}-{len(procs)}", argv, workdir)
        procs.append(self.proc)
        self.port = int(wait_until(lambda: portfile.exists() and portfile.read_text(), 15, f"{mode} backend to listen"))
        self.target = f"127.0.0.1:{self.port}"


class System:
    """A relay and its connectors, driven through the CLI as a user would."""

    def __init__(self, workdir: Path, env: dict | None = None) -> None:
        self.workdir = workdir
        self.env = env or {}
        self.procs: list[Proc] = []
        self.data_dir = workdir / "service"
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.relay: Proc | None = None
        self.connectors: dict[str, Proc] = {}
        self.ca_sha256 = ""
        #: where users reach HTTP apps (the relay's --http)
        self.http_port = free_port()

    # -------------------------------------------------------------- CLI

    def cli(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        result = subprocess.run(
            BACKHAUL + list(args),
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **self.env},
            stdin=subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"backhaul {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def admin(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.cli("admin", "--service", self.url, "--data-dir", str(self.data_dir), *args, check=check)

    def admin_json(self, *args: str):
        return json.loads(self.admin("--json", *args).stdout)

    # -------------------------------------------------------------- relay

    def init(self) -> None:
        out = json.loads(self.cli("service", "init", "--data-dir", str(self.data_dir), "--json").stdout)
        self.ca_sha256 = out["ca_sha256"]

    def start_relay(self, workers: int = 1, extra: tuple[str, ...] = ()) -> Proc:
        self.relay = Proc(
            f"relay-{len(self.procs)}",
            BACKHAUL
            + ["service", "run", "--data-dir", str(self.data_dir), "--listen", f"127.0.0.1:{self.port}", "--workers", str(workers)]
            + ["--http", f"127.0.0.1:{self.http_port}", *extra],
            self.workdir,
            self.env,
        )
        self.procs.append(self.relay)
        self.wait_healthy()
        return self.relay

    def health(self) -> dict:
        ctx = ssl.create_default_context(cafile=str(self.data_dir / "ca.pem"))
        with urllib.request.urlopen(f"{self.url}/v1/health", context=ctx, timeout=2) as response:
            return json.loads(response.read())

    def wait_healthy(self, timeout: float = 20) -> None:
        def ok():
            if self.relay is not None and not self.relay.alive():
                raise AssertionError(f"relay exited:\n{self.relay.log()[-3000:]}")
            return self.health().get("status") == "ok"

        wait_until(ok, timeout, "the relay's /v1/health")

    # -------------------------------------------------------------- connectors

    def token(self, uses: int = 1, group: str = "default") -> str:
        return self.admin_json("token", "create", "--group", group, "--uses", str(uses))["token"]

    def register(self, name: str, group: str = "default") -> Path:
        state = self.workdir / f"conn-{name}"
        self.cli(
            "connector", "register", "--service", self.url, "--token", self.token(group=group),
            "--ca-sha256", self.ca_sha256, "--state-dir", str(state), "--name", name,
        )
        return state

    def start_connector(self, name: str, workers: int = 1, tunnels: int = 2) -> Proc:
        state = self.workdir / f"conn-{name}"
        if not state.exists():
            self.register(name)
        proc = Proc(
            f"connector-{name}-{len(self.procs)}",
            BACKHAUL + ["connector", "run", "--state-dir", str(state), "--workers", str(workers), "--tunnels", str(tunnels)],
            self.workdir,
            self.env,
        )
        self.procs.append(proc)
        self.connectors[name] = proc
        return proc

    # -------------------------------------------------------------- apps

    def publish_tcp(self, name: str, target: str, group: str = "default") -> int:
        port = free_port()
        self.admin("app", "publish", name, "--group", group, "--tcp", str(port), "--target", target)
        return port

    def publish_http(self, name: str, host: str, internal_url: str, *flags: str, group: str = "default") -> None:
        self.admin("app", "publish", name, "--group", group, "--http", host, "--internal-url", internal_url, *flags)

    def wait_http(self, host: str, path: str = "/", timeout: float = 30) -> None:
        """Ready when a request for ``host`` through the HTTP edge gets the app's answer (not the edge's)."""

        def answered() -> bool:
            conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=5)
            try:
                conn.request("GET", path, headers={"Host": host})
                response = conn.getresponse()
                response.read()
                return response.status < 500 and response.status != 404
            finally:
                conn.close()

        wait_until(answered, timeout, f"{host} to answer through the HTTP edge", interval=0.2)

    def wait_app(self, port: int, probe: bytes = b"ping", timeout: float = 30) -> None:
        """Ready when a real connection through the app echoes ``probe``."""
        wait_until(lambda: echoes(port, probe), timeout, f"the app on port {port} to echo through a connector", interval=0.2)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
