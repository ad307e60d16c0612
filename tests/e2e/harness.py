"""End-to-end harness: real processes on 127.0.0.1, readiness through endpoints, cleanup always.

In the manner of frp's e2e framework: a port allocator, processes in their own process
groups (stopped by the test that started them, even when it fails), readiness checked
through the relay's health endpoint and through a real request, never by sleeping.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).parent
BACKHAUL = [sys.executable, "-m", "backhaul"]


class PortAllocator:
    """Ports nobody listens on right now, never the same one twice in a test run.

    The kernel may hand a just-released port out again at once, and the relay binds its
    ports with SO_REUSEPORT, so two "free" ports that turn out equal (say --listen and
    --http) would both bind and split connections between TLS and plain HTTP.
    """

    def __init__(self) -> None:
        self._given: set[int] = set()

    def __call__(self) -> int:
        for _ in range(1000):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            if port not in self._given:
                self._given.add(port)
                return port
        raise AssertionError("no free port left that this test run has not handed out already")


free_port = PortAllocator()


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


def echo_digests(sock: socket.socket, total: int, rng, chunk: int = 1 << 20, timeout: float = 120) -> tuple[str, str, int]:
    """Send ``total`` bytes from ``rng`` on an open echo connection while a thread reads them
    back: (sha256 sent, sha256 received, bytes received)."""
    import hashlib

    sent, received = hashlib.sha256(), hashlib.sha256()
    got = 0

    def reader():
        nonlocal got
        while got < total:
            data = sock.recv(min(4 << 20, total - got))
            if not data:
                break
            received.update(data)
            got += len(data)

    thread = threading.Thread(target=reader)
    thread.start()
    left = total
    while left:
        block = rng.randbytes(min(chunk, left))
        sent.update(block)
        sock.sendall(block)
        left -= len(block)
    thread.join(timeout)
    assert not thread.is_alive(), "the echo did not come back"
    return sent.hexdigest(), received.hexdigest(), got


def echoes(port: int, probe: bytes = b"ping", host: str = "127.0.0.1") -> bool:
    """True when a new connection to host:port sends ``probe`` back; False if it cannot."""
    try:
        with socket.create_connection((host, port), timeout=2) as sock:
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


def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True when the far end closes ``sock`` (EOF or reset) within ``timeout`` seconds (over
    TLS 1.3, a refused client certificate or a close after the handshake shows on the first read)."""
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(4096):
                return True
    except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
        return True
    except (TimeoutError, socket.timeout):
        return False


@contextlib.contextmanager
def running_relay(workdir: Path, workers: int = 1, relay_args: tuple[str, ...] = ()):
    """An initialized relay, running; it and everything started through it stop on exit."""
    system = System(workdir)
    try:
        system.init()
        system.start_relay(workers=workers, extra=relay_args)
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

    def log_entries(self, message: str) -> list[dict]:
        """The JSON log lines this process wrote with ``msg`` equal to ``message``."""
        entries = []
        for line in self.log().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("msg") == message:
                entries.append(entry)
        return entries

    def pids(self) -> list[int]:
        """This process and all its descendants (a supervisor and its workers)."""
        return [self.popen.pid] + _children(self.popen.pid)

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


def connections_to(pids: list[int], port: int) -> int:
    """Established TCP connections from any of ``pids`` to 127.0.0.1:``port``, read from /proc.

    Tells which connector process carries a stream: its socket to the private app."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except FileNotFoundError:
            continue
    count = 0
    want = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[2] == want and fields[3] == "01" and fields[9] in inodes:  # 01: ESTABLISHED
            count += 1
    return count


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
        # No status grace unless a test asks for one: a stopped connector is listed inactive
        # as soon as the relay saw its tunnels go (test_inactive_connectors tests the grace).
        grace = [] if "--inactive-grace" in extra else ["--inactive-grace", "0"]
        self.relay = Proc(
            f"relay-{len(self.procs)}",
            BACKHAUL
            + ["service", "run", "--data-dir", str(self.data_dir), "--listen", f"127.0.0.1:{self.port}", "--workers", str(workers)]
            + ["--http", f"127.0.0.1:{self.http_port}", *grace, *extra],
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

    def register(self, name: str, group: str = "default", service: str | None = None) -> Path:
        """Register connector ``name``; ``service`` is the URL it reaches the relay at (default: directly)."""
        state = self.workdir / f"conn-{name}"
        self.cli(
            "connector", "register", "--service", service or self.url, "--token", self.token(group=group),
            "--ca-sha256", self.ca_sha256, "--state-dir", str(state), "--name", name,
        )
        return state

    def start_connector(self, name: str, workers: int = 1, tunnels: int | None = 2, extra: tuple[str, ...] = ()) -> Proc:
        state = self.workdir / f"conn-{name}"
        if not state.exists():
            self.register(name)
        argv = ["connector", "run", "--state-dir", str(state), "--workers", str(workers)]
        if tunnels is not None:
            argv += ["--tunnels", str(tunnels)]
        proc = Proc(
            f"connector-{name}-{len(self.procs)}",
            BACKHAUL + argv + list(extra),
            self.workdir,
            self.env,
        )
        self.procs.append(proc)
        self.connectors[name] = proc
        return proc

    def api(self, path: str):
        """GET an admin endpoint of the control API, as `backhaul admin` does but without a process per call."""
        ctx = ssl.create_default_context(cafile=str(self.data_dir / "ca.pem"))
        token = (self.data_dir / "admin.token").read_text().strip()
        request = urllib.request.Request(f"{self.url}{path}", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, context=ctx, timeout=5) as response:
            return json.loads(response.read())

    def connector_info(self, name: str) -> dict:
        """This connector's entry in the connector list ({} if not listed)."""
        return {c["name"]: c for c in self.api("/v1/connectors")}.get(name, {})

    def wait_tunnels(self, name: str, count: int, timeout: float = 30) -> None:
        """Ready when the relay holds exactly ``count`` tunnels of connector ``name``."""
        wait_until(
            lambda: self.connector_info(name).get("tunnels") == count,
            timeout, f"the relay to hold {count} tunnels of connector {name}", interval=0.2,
        )

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


class FaultProxy:
    """A TCP forwarder between a connector and the relay that can fail the way networks do.

    In the manner of frp's e2e fault injection: ``blackhole()`` keeps every connection
    open but drops all bytes both ways and holds new connections without dialing on (a
    dead route, a stateful firewall dropping state); ``half_open()`` closes the relay's
    side of every connection while the connector's side stays open and silent (a NAT that
    forgot the flow); ``heal()`` forwards new connections again and drops the stranded
    ones. It runs its own event loop in a thread of the test process; ``close()`` stops it.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.mode = "pass"
        self.pairs: set[_ProxySide] = set()
        #: connections accepted so far (a connector redialing shows up here)
        self.accepted = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        self._server = self._call(self._start())
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"

    def _call(self, coro, timeout: float = 10):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self):
        return await self._loop.create_server(lambda: _ProxySide(self, None), "127.0.0.1", 0)

    async def _set(self, mode: str) -> None:
        self.mode = mode
        for side in list(self.pairs):
            if mode == "blackhole":
                side.stranded = True
            elif mode == "half_open":
                side.stranded = True
                if side.peer is not None and side.peer.transport is not None:
                    side.peer.transport.close()
            elif mode == "pass" and side.stranded:
                side.transport.abort()

    def blackhole(self) -> None:
        self._call(self._set("blackhole"))

    def half_open(self) -> None:
        self._call(self._set("half_open"))

    def heal(self) -> None:
        self._call(self._set("pass"))

    def close(self) -> None:
        async def stop():
            self._server.close()
            for side in list(self.pairs):
                side.transport.abort()
                if side.peer is not None and side.peer.transport is not None:
                    side.peer.transport.abort()

        try:
            self._call(stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)


class _ProxySide(asyncio.Protocol):
    """One end of a forwarded connection; ``peer`` is the other end (None on a held connection)."""

    def __init__(self, proxy: FaultProxy, peer: "_ProxySide | None") -> None:
        self.proxy = proxy
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.stranded = False  # set on the client side: drop what arrives, forward nothing

    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.peer is not None:  # the upstream side of a pair
            return
        self.proxy.pairs.add(self)
        self.proxy.accepted += 1
        if self.proxy.mode != "pass":
            self.stranded = True
            return
        transport.pause_reading()
        asyncio.get_running_loop().create_task(self._dial())

    async def _dial(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(lambda: _ProxySide(self.proxy, self), "127.0.0.1", self.proxy.upstream_port)
        except OSError:
            self.transport.close()
            return
        self.peer = upstream
        if self.stranded:
            upstream.transport.close()
        else:
            self.transport.resume_reading()

    def _forwarding(self) -> bool:
        client = self if self in self.proxy.pairs else self.peer
        return client is not None and not client.stranded

    def data_received(self, data: bytes) -> None:
        if self._forwarding() and self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)

    def eof_received(self):
        if self._forwarding() and self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write_eof()
        return True

    def connection_lost(self, exc) -> None:
        self.proxy.pairs.discard(self)
        if self._forwarding() and self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


@dataclasses.dataclass
class Attempt:
    """One short echo connection of a load run."""

    started: float
    ended: float = 0.0
    ok: bool = False
    error: str = ""


class EchoLoad:
    """``clients`` threads, each making short echo connections to a port in a loop.

    Bounded: each thread stops after ``seconds`` or ``max_each`` connections. Every
    connection sends ``size`` random bytes and counts as ok only when all of them came back.
    """

    def __init__(
        self, port: int, clients: int = 16, seconds: float = 4.0, size: int = 1024, max_each: int = 2000, host: str = "127.0.0.1"
    ) -> None:
        self.port = port
        self.host = host
        self.clients = clients
        self.seconds = seconds
        self.size = size
        self.max_each = max_each
        self.attempts: list[Attempt] = []
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(clients, thread_name_prefix="echo-load")
        self._futures: list[concurrent.futures.Future] = []

    def start(self) -> "EchoLoad":
        end = time.monotonic() + self.seconds
        self._futures = [self._pool.submit(self._client, end) for _ in range(self.clients)]
        return self

    def join(self, timeout: float = 60) -> list[Attempt]:
        try:
            for future in concurrent.futures.as_completed(self._futures, timeout):
                future.result()
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
        return self.attempts

    def _client(self, end: float) -> None:
        for _ in range(self.max_each):
            if time.monotonic() >= end:
                return
            attempt = Attempt(started=time.monotonic())
            payload = os.urandom(self.size)
            try:
                with socket.create_connection((self.host, self.port), timeout=15) as sock:
                    sock.sendall(payload)
                    got = bytearray()
                    while len(got) < len(payload):
                        chunk = sock.recv(65536)
                        if not chunk:
                            break
                        got += chunk
                attempt.ok = bytes(got) == payload
                if not attempt.ok:
                    attempt.error = f"echoed {len(got)} of {len(payload)} bytes"
            except OSError as exc:
                attempt.error = f"{type(exc).__name__}: {exc}"
            attempt.ended = time.monotonic()
            with self._lock:
                self.attempts.append(attempt)
