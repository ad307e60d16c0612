"""`backhaul demo`: the whole product on loopback, with every part a real process.

It starts a private app (a web page and a UDP echo, on loopback only), initializes a
relay in a work dir and runs it with its HTTP edge, enrolls two connectors into the
`default` group, and publishes the private app three ways: as a TCP app, as an HTTP app
reached by host name through the HTTP edge, and as a UDP app. Then it prints commands
that work as pasted in a new shell (the venv's absolute path to `backhaul`), the admin
page's address and how to kill one connector, and keeps everything running until Ctrl-C
(or --seconds). Every process it started is stopped at the end; the work dir, with the
logs, stays where it said.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import os
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from backhaul.errors import BackhaulError, ConfigError

#: The first bytes of every page the private app serves (the demo's readiness check).
PAGE_MARK = b"<h1>Hello from the private app</h1>"
#: The prefix of every answer of the private app's UDP echo.
UDP_MARK = b"private udp app got: "
#: The HTTP app's external host name (routed by the relay's HTTP edge; --resolve makes curl use it).
HTTP_HOST = "hello.demo.internal"
CONNECTORS = ("demo-a", "demo-b")
#: Seconds one start-up step may take on a loaded machine before the demo gives up.
STEP_TIMEOUT = 60.0
#: Seconds a stopped connector may take to drain (the demo's streams are short).
DRAIN_TIMEOUT = 2.0
#: Seconds a child has to exit after SIGTERM before it is killed.
STOP_GRACE = 15.0


def serve_private_app(http_port: int, udp_port: int) -> None:
    """The private app, run in its own process: one web page (aiohttp) and a UDP echo, on loopback."""
    import asyncio

    from aiohttp import web

    async def page(request: web.Request) -> web.Response:
        # Through the HTTP edge the Host is the internal URL's; the edge says what the user asked for.
        asked = request.headers.get("X-Forwarded-Host", request.host)
        body = PAGE_MARK + f"<p>You reached me through a backhaul tunnel (Host: {html.escape(asked)}).</p>\n".encode()
        return web.Response(body=body, content_type="text/html")

    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr) -> None:
            logging.getLogger("backhaul.demo.app").info("udp %d bytes from %s:%d", len(data), *addr[:2])
            self.transport.sendto(UDP_MARK + data[:1024], addr)

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/", page)
        runner = web.AppRunner(app)  # its access log: one line per request, in logs/app.log
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", http_port).start()
        await asyncio.get_running_loop().create_datagram_endpoint(Echo, local_addr=("127.0.0.1", udp_port))
        logging.getLogger("backhaul.demo.app").info("private app up: http 127.0.0.1:%d, udp 127.0.0.1:%d", http_port, udp_port)
        await asyncio.Event().wait()

    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    asyncio.run(main())


class _Ports:
    """Free loopback ports, never the same one twice (the relay binds with SO_REUSEPORT)."""

    def __init__(self) -> None:
        self._given: set[int] = set()

    def take(self, kind: int = socket.SOCK_STREAM) -> int:
        for _ in range(100):
            with socket.socket(socket.AF_INET, kind) as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            if port not in self._given:
                self._given.add(port)
                return port
        raise BackhaulError("demo: no free loopback port left")


def _backhaul_command() -> str:
    """How a new shell runs this very backhaul: the venv's script by its absolute path (no PATH needed)."""
    script = Path(sys.executable).parent / "backhaul"
    if os.access(script, os.X_OK):
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m backhaul"


def _fetch(port: int, host: str = "demo") -> bytes:
    """One GET / on loopback ``port`` with Host ``host``; the answer's body."""
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).partition(b"\r\n\r\n")[2]


def _udp_echo(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        sock.sendto(b"ready?", ("127.0.0.1", port))
        try:
            return sock.recv(2048) == UDP_MARK + b"ready?"
        except socket.timeout:
            return False


class Demo:
    """The demo's processes, their work dir, and what it tells the user."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.data_dir = workdir / "service"
        ports = _Ports()
        self.listen = ports.take()
        self.http = ports.take()
        self.tcp_app = ports.take()
        self.udp_app = ports.take(socket.SOCK_DGRAM)
        self.app_http = ports.take()
        self.app_udp = ports.take(socket.SOCK_DGRAM)
        self.url = f"https://127.0.0.1:{self.listen}"
        #: name -> process, in start order (stopped in reverse)
        self.procs: dict[str, subprocess.Popen] = {}
        self.ca_sha256 = ""
        self._reported: set[str] = set()

    # -------------------------------------------------------------- talking

    def say(self, text: str = "", end: str = "\n") -> None:
        print(text, end=end, flush=True)

    def step(self, label: str) -> float:
        self.say(f"  {label} ... ", end="")
        return time.monotonic()

    def done(self, started: float, what: str = "up") -> None:
        self.say(f"{what} ({time.monotonic() - started:.1f} s)")

    # -------------------------------------------------------------- processes

    def run(self, *args: str) -> str:
        """A one-shot backhaul command; its stdout, or BackhaulError with its stderr."""
        result = subprocess.run(
            [sys.executable, "-m", "backhaul", *args],
            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=STEP_TIMEOUT,
        )
        if result.returncode != 0:
            raise BackhaulError(f"demo step failed: backhaul {' '.join(args[:2])}: {result.stderr.strip()}")
        return result.stdout

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        """A long-running child with its output in logs/NAME.log. In its own session, so a
        Ctrl-C reaches only the demo, which then stops its children in order."""
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self.procs[name] = proc
        return proc

    def spawn_backhaul(self, name: str, *args: str) -> subprocess.Popen:
        return self.spawn(name, [sys.executable, "-m", "backhaul", *args])

    def check_children(self) -> None:
        """A stopped connector is news (the apps go on through the other); anything else stopping ends the demo."""
        for name, proc in self.procs.items():
            code = proc.poll()
            if code is None or name in self._reported:
                continue
            if name not in CONNECTORS:
                raise BackhaulError(f"demo: the {name} exited (status {code}); see {self.logs / (name + '.log')}")
            self._reported.add(name)
            others = [c for c in CONNECTORS if c in self.procs and self.procs[c].poll() is None]
            going = f"the apps keep answering through {', '.join(others)}" if others else "no connector is left: the apps are down"
            self.say(f"connector {name} (pid {proc.pid}) stopped (status {code}); {going}")

    def wait(self, what: str, check, timeout: float = STEP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_children()
            try:
                if check():
                    return
            except OSError:  # not up yet
                pass
            time.sleep(0.1)
        raise BackhaulError(f"demo: timed out waiting for {what}; see the logs in {self.logs}")

    def stop(self) -> None:
        """SIGTERM the connectors (they drain), then the relay and the app; kill what outlives the grace."""
        running = [c for c in CONNECTORS if c in self.procs], [n for n in self.procs if n not in CONNECTORS]
        for names in running:
            for name in names:
                if self.procs[name].poll() is None:
                    self.procs[name].send_signal(signal.SIGTERM)
            for name in names:
                proc = self.procs[name]
                try:
                    proc.wait(STOP_GRACE)
                except subprocess.TimeoutExpired:
                    self.say(f"  the {name} did not stop within {STOP_GRACE:.0f} s; killing it")
                    proc.kill()
                    proc.wait()

    # -------------------------------------------------------------- the API

    def api(self, path: str):
        ctx = ssl.create_default_context(cafile=str(self.data_dir / "ca.pem"))
        token = (self.data_dir / "admin.token").read_text().strip()
        request = urllib.request.Request(f"{self.url}{path}", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, context=ctx, timeout=5) as response:
            return json.loads(response.read())

    def admin(self, method: str, path: str, body=None):
        from backhaul.admin.client import AdminTarget, call

        token = (self.data_dir / "admin.token").read_text().strip()
        return call(AdminTarget(self.url, token, self.data_dir / "ca.pem"), method, path, body)

    def healthy(self) -> bool:
        return self.api("/v1/health").get("status") == "ok"

    def tunnels_up(self) -> bool:
        tunnels = {c["name"]: c.get("tunnels") for c in self.api("/v1/connectors")}
        return all(tunnels.get(name) == 2 for name in CONNECTORS)

    # -------------------------------------------------------------- the steps

    def start(self) -> None:
        started = self.step("private app: a web page and a UDP echo, on loopback only")
        self.spawn("app", [
            sys.executable, "-c",
            f"from backhaul.demo import serve_private_app; serve_private_app({self.app_http}, {self.app_udp})",
        ])
        self.wait("the private app", lambda: _fetch(self.app_http).startswith(PAGE_MARK) and _udp_echo(self.app_udp))
        self.done(started)

        started = self.step("relay: control API and tunnels, HTTP edge")
        init = json.loads(self.run("service", "init", "--data-dir", str(self.data_dir), "--json"))
        self.ca_sha256 = init["ca_sha256"]
        self.spawn_backhaul(
            "relay", "service", "run", "--data-dir", str(self.data_dir),
            "--listen", f"127.0.0.1:{self.listen}", "--http", f"127.0.0.1:{self.http}", "--workers", "1",
        )
        self.wait("the relay's /v1/health", self.healthy)
        self.done(started, f"up at {self.url}")

        started = self.step(f"connectors {', '.join(CONNECTORS)}: enrolled into group default, dialing OUT")
        token_file = self.workdir / "enroll.token"
        token_file.write_text(self.admin("POST", "/v1/tokens", {"group": "default", "uses": len(CONNECTORS)})["token"])
        token_file.chmod(0o600)
        registering = [
            subprocess.Popen(
                [sys.executable, "-m", "backhaul", "connector", "register", "--service", self.url,
                 "--token-file", str(token_file), "--ca-sha256", self.ca_sha256,
                 "--state-dir", str(self.workdir / name), "--name", name],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
            )
            for name in CONNECTORS
        ]
        for proc in registering:
            _, err = proc.communicate(timeout=STEP_TIMEOUT)
            if proc.returncode != 0:
                raise BackhaulError(f"demo step failed: backhaul connector register: {err.strip()}")
        token_file.unlink()
        for name in CONNECTORS:
            self.spawn_backhaul(
                name, "connector", "run", "--state-dir", str(self.workdir / name), "--workers", "1", "--tunnels", "2",
                "--drain-timeout", str(DRAIN_TIMEOUT), "--log-dir", str(self.logs / name),
            )
        self.wait("both connectors' tunnels", self.tunnels_up)
        self.done(started, "2 tunnels each")

        started = self.step("apps hello-tcp (TCP), hello-web (HTTP by host name), hello-udp (UDP)")
        target = f"127.0.0.1:{self.app_http}"
        self.admin("POST", "/v1/apps", {"name": "hello-tcp", "group": "default", "proto": "tcp", "port": self.tcp_app, "target": target})
        self.admin("POST", "/v1/apps", {
            "name": "hello-web", "group": "default", "proto": "http", "external_host": HTTP_HOST,
            "internal_url": f"http://{target}", "preauth": "passthrough",
        })
        self.admin("POST", "/v1/apps", {
            "name": "hello-udp", "group": "default", "proto": "udp", "port": self.udp_app, "target": f"127.0.0.1:{self.app_udp}",
        })
        self.wait("the TCP app through a tunnel", lambda: _fetch(self.tcp_app).startswith(PAGE_MARK))
        self.wait("the HTTP app through the HTTP edge", lambda: _fetch(self.http, HTTP_HOST).startswith(PAGE_MARK))
        self.wait("the UDP app through a tunnel", lambda: _udp_echo(self.udp_app))
        self.done(started, "answering through the tunnels")

    def admin_line(self, *args: str) -> str:
        """An admin command as pasted: the data dir says where the relay listens once it records
        that (relay.json); until then the line names the relay with --service."""
        service = [] if (self.data_dir / "relay.json").exists() else ["--service", self.url]
        return " ".join([_backhaul_command(), "admin", *service, "--data-dir", shlex.quote(str(self.data_dir)), *args])

    def tell(self) -> None:
        bh = _backhaul_command()
        udp = (
            'python3 -c "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3); '
            f"s.sendto(b'hello', ('127.0.0.1', {self.udp_app})); print(s.recv(2048).decode())\""
        )
        ca = shlex.quote(str(self.data_dir / "ca.pem"))
        self.say()
        self.say("user -> relay (127.0.0.1 ports) -> mTLS tunnel -> connector demo-a or demo-b -> private app")
        self.say(f"  relay       {self.url}   (connectors dial here; the admin API too)")
        self.say(f"  admin page  {self.url}/admin/   (sign in with the token in {self.data_dir / 'admin.token'};")
        self.say(f"              the browser must trust the demo's CA {self.data_dir / 'ca.pem'})")
        self.say(f"  data dir    {self.data_dir}")
        self.say(f"  logs        {self.logs}")
        self.say()
        self.say("Try these; each works as pasted in a new shell:")
        self.say(f"  curl http://127.0.0.1:{self.tcp_app}/    # TCP app hello-tcp")
        self.say(f"  curl --resolve {HTTP_HOST}:{self.http}:127.0.0.1 http://{HTTP_HOST}:{self.http}/    # HTTP app hello-web, by host name")
        self.say(f"  {udp}    # UDP app hello-udp")
        self.say(f"  {self.admin_line('connector', 'list')}")
        self.say(f"  {self.admin_line('app', 'list')}")
        self.say(f"  curl --cacert {ca} {self.url}/admin/    # the admin page")
        self.say(f"  {bh} --version")
        self.say()
        self.say("Kill one connector; the apps keep answering through the other:")
        self.say(f"  kill {self.procs[CONNECTORS[1]].pid}    # connector {CONNECTORS[1]}")
        self.say()
        self.say(f"Running. Ctrl-C stops everything; the logs stay in {self.logs} (rm -rf {shlex.quote(str(self.workdir))} removes it all).")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _workdir(path: str | None) -> Path:
    if path is None:
        return Path(tempfile.mkdtemp(prefix="backhaul-demo-"))
    workdir = Path(path).absolute()
    if workdir.exists() and any(workdir.iterdir()):
        raise ConfigError(f"--dir {workdir} is not empty; name a new or empty directory (a demo's keys and logs go there)")
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o700)
    return workdir


def demo(args: argparse.Namespace) -> int:
    """Run the demo; returns when interrupted (Ctrl-C, SIGTERM) or after --seconds."""
    logging.getLogger().setLevel(logging.WARNING)  # the terminal gets the demo's lines, the log files the rest
    d = Demo(_workdir(args.dir))
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        d.say("backhaul demo: a relay, two connectors and three apps, all on 127.0.0.1")
        d.say(f"work dir {d.workdir}")
        d.start()
        d.tell()
        deadline = None if args.seconds is None else time.monotonic() + args.seconds
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.2)
            d.check_children()
    except KeyboardInterrupt:
        d.say("\nstopping")
    finally:
        # A second Ctrl-C while stopping would leave children behind: stopping finishes first.
        before_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            d.stop()
        finally:
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, before_int)
    d.say(f"demo stopped; its logs are in {d.logs}")
    return 0
