"""`backhaul demo`: the whole system on loopback, with every step a real command.

It starts a small private web app, initializes a relay in a temporary data dir, runs
it, enrolls and runs a connector, publishes the web app as a TCP app, fetches a page
through relay -> mTLS tunnel -> connector -> app, and keeps everything running until
Ctrl-C (or --seconds). Every process is stopped and the directory removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from backhaul.errors import BackhaulError

PAGE = b"<h1>Hello from the private app</h1><p>You reached me through a backhaul tunnel.</p>\n"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Demo:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []
        self.relay_port = _free_port()
        self.url = f"https://127.0.0.1:{self.relay_port}"
        self.data_dir = workdir / "service"
        self.state_dir = workdir / "connector"

    def say(self, text: str) -> None:
        print(text, flush=True)

    def run(self, *args: str) -> str:
        cmd = [sys.executable, "-m", "backhaul", *args]
        self.say("  $ backhaul " + " ".join(a if " " not in a else repr(a) for a in args))
        result = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
        if result.returncode != 0:
            raise BackhaulError(f"demo step failed: backhaul {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def spawn(self, name: str, *args: str) -> subprocess.Popen:
        self.say(f"  $ backhaul {' '.join(args)} &    (log: {self.workdir / (name + '.log')})")
        log = open(self.workdir / f"{name}.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "backhaul", *args], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        self.procs.append(proc)
        return proc

    def wait(self, what: str, check, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise BackhaulError(f"a demo process exited early ({proc.args[3:5]}); see the logs in {self.workdir}")
            try:
                if check():
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise BackhaulError(f"demo: timed out waiting for {what}; see the logs in {self.workdir}")

    def health(self) -> bool:
        import urllib.request

        ctx = ssl.create_default_context(cafile=str(self.data_dir / "ca.pem"))
        with urllib.request.urlopen(f"{self.url}/v1/health", context=ctx, timeout=2) as response:
            return json.loads(response.read()).get("status") == "ok"

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _fetch(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _serve_page(port: int) -> subprocess.Popen:
    """The private app: aiohttp serving one page, in its own process."""
    code = (
        "import sys\nfrom aiohttp import web\n"
        "async def page(request):\n"
        f"    return web.Response(body={PAGE!r}, content_type='text/html')\n"
        "app = web.Application()\napp.router.add_get('/', page)\n"
        f"web.run_app(app, host='127.0.0.1', port={port}, print=None)\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL)


def demo(args: argparse.Namespace) -> int:
    """Run the demo; returns when interrupted or after --seconds."""
    workdir = Path(tempfile.mkdtemp(prefix="backhaul-demo-"))
    d = Demo(workdir)
    app_port, web_port = _free_port(), _free_port()
    try:
        d.say("backhaul demo: relay, connector and a private web app, all on 127.0.0.1\n")
        d.say("1. the private app (it listens on loopback only; nothing inbound is opened for it)")
        d.procs.append(_serve_page(web_port))
        d.wait("the private app", lambda: _fetch(web_port).endswith(PAGE))
        d.say(f"   http://127.0.0.1:{web_port}/ is up\n")

        d.say("2. the relay service")
        init = json.loads(d.run("service", "init", "--data-dir", str(d.data_dir), "--json"))
        d.spawn("relay", "service", "run", "--data-dir", str(d.data_dir), "--listen", f"127.0.0.1:{d.relay_port}", "--workers", "1")
        d.wait("the relay", d.health)
        d.say(f"   relay listening on {d.url} (CA sha256 {init['ca_sha256'][:16]}...)\n")

        d.say("3. a connector: enrolled with a one-time token, it dials OUT to the relay")
        admin = ["admin", "--service", d.url, "--data-dir", str(d.data_dir)]
        token = json.loads(d.run(*admin, "--json", "token", "create"))["token"]
        d.run(
            "connector", "register", "--service", d.url, "--token", token,
            "--ca-sha256", init["ca_sha256"], "--state-dir", str(d.state_dir), "--name", "demo-connector",
        )
        d.spawn("connector", "connector", "run", "--state-dir", str(d.state_dir), "--workers", "1", "--tunnels", "2")
        d.say("")

        d.say("4. publish the private app on the relay")
        d.run(*admin, "app", "publish", "demo-web", "--group", "default", "--tcp", str(app_port), "--target", f"127.0.0.1:{web_port}")
        d.wait("the app to answer through the tunnel", lambda: _fetch(app_port).endswith(PAGE))
        d.say(f"\n   user -> 127.0.0.1:{app_port} (relay) -> mTLS tunnel -> connector -> 127.0.0.1:{web_port} (app)")
        d.say(f"   try:  curl http://127.0.0.1:{app_port}/\n")
        d.say(d.run(*admin, "connector", "list"))
        d.say(f"running; logs in {workdir}. Ctrl-C to stop.")
        deadline = None if args.seconds is None else time.monotonic() + args.seconds
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.5)
            for proc in d.procs:
                if proc.poll() is not None:
                    raise BackhaulError(f"a demo process exited ({proc.args}); see the logs in {workdir}")
    except KeyboardInterrupt:
        d.say("\nstopping")
    finally:
        d.stop()
        if os.environ.get("BACKHAUL_DEMO_KEEP") != "1":
            shutil.rmtree(workdir, ignore_errors=True)
    d.say("demo stopped")
    return 0
