"""Hostile clients and operator mistakes against the HTTP edge, on real processes on 127.0.0.1.

One relay (`service run --http-limit` with short body limits) and one connector serve the
module, with an aiohttp backend (tests/e2e/backend.py: it echoes what it got) and a
backend written by hand here (:class:`RawBackend`), whose connections the test accepts
itself, so it sees when the connector's connection to it ends:

- a body that stalls gets 408 within ``body_timeout``, and the stream to the connector is
  reset: the backend's connection ends;
- a body trickling below ``body_min_rate`` gets 408 too; a 2 MB upload passes, and so
  does one the edge itself stopped reading for longer than ``body_timeout`` because the
  backend did not read (backpressure is not the client's fault);
- headers forged with "_" (``X_Backhaul_User``, read as X-Backhaul-User by CGI and WSGI
  servers) never reach the backend, while a gate's identity header does;
- an absolute-form request to a ``--keep-host`` app gives the backend the URI's authority
  as Host, not the client's unrelated Host header;
- a health path naming another host (``//127.0.0.1:PORT/x``) is refused by the CLI, and a
  connector given one anyway (a store written before the check) never dials that port.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import http.client
import json
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest

from backhaul.config import HttpLimits
from backhaul.relay.worker import RelaySettings
from backhaul.store import open_store

from tests.e2e.backend import pattern
from tests.e2e.harness import Backend, System, running_relay, wait_until
from tests.e2e.test_http_preauth import InProcessRelay, RuleGate

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
#: Short limits so that each case takes about a second (defaults: 30 s, 500 B/s after 20 s).
BODY_TIMEOUT = 1.0
RATE_GRACE = 1.0
MIN_RATE = 2000
RESPONSE_TIMEOUT = 2.5


class RawBackend:
    """A listening socket in this process: the test accepts each connection and plays the app."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def accept_request(self, timeout: float = 10.0, want: int = 0) -> tuple[socket.socket, bytes]:
        """The next connection that sends a request head (and ``want`` bytes after it), and what it sent.

        Connections that close without a byte are the connector's TCP health checks: skipped."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.server.settimeout(max(0.05, deadline - time.monotonic()))
            conn, _ = self.server.accept()
            conn.settimeout(max(0.05, deadline - time.monotonic()))
            data = b""
            try:
                while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < want:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except (socket.timeout, ConnectionError):
                pass
            if b"\r\n\r\n" in data:
                return conn, data
            conn.close()
        raise AssertionError("no request reached the raw backend")

    def close(self) -> None:
        self.server.close()


def _ended(conn: socket.socket, timeout: float) -> bool:
    """True when the peer closes or resets ``conn`` within ``timeout`` (whatever it still sends)."""
    conn.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not conn.recv(65536):
                return True
    except ConnectionError:
        return True
    except socket.timeout:
        return False
    return False


def _read_answer(sock: socket.socket, timeout: float) -> bytes:
    """Everything the edge sends until it closes the connection."""
    sock.settimeout(timeout)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                return out
            out += chunk
    except ConnectionResetError:
        return out
    raise AssertionError(f"the edge did not close the connection; got {out[:300]!r}")


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    work = tmp_path_factory.mktemp("http-edge-hostile")
    extra = (
        "--http-limit", f"body_timeout={BODY_TIMEOUT}",
        "--http-limit", f"body_rate_grace={RATE_GRACE}",
        "--http-limit", f"body_min_rate={MIN_RATE}",
        "--http-limit", f"response_timeout={RESPONSE_TIMEOUT}",
    )
    procs: list = []
    raw = RawBackend()
    try:
        with running_relay(work, relay_args=extra) as system:
            web = Backend("http", work, procs)
            plain = f"http://127.0.0.1:{web.port}"
            apps = [
                ("web", "web.test", plain),
                ("kept", "kept.test", plain, "--keep-host"),
                ("raw", "raw.test", raw.url),
            ]
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                list(pool.map(lambda a: system.admin("app", "publish", a[0], "--http", a[1], "--internal-url", *a[2:]), apps))
            system.start_connector("one")
            system.wait_http("web.test")
            yield SimpleNamespace(system=system, web=web, raw=raw, port=system.http_port, work=work)
    finally:
        for proc in procs:
            proc.stop()
        raw.close()


def _body_timeouts(edge, rule: str) -> list[dict]:
    return [e for e in edge.system.relay.log_entries("request body timed out") if e.get("rule") == rule]


def test_a_stalled_body_gets_408_and_releases_the_backend_connection(edge):
    before = len(_body_timeouts(edge, "body_timeout"))
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as sock:
        sock.sendall(b"POST /stall HTTP/1.1\r\nHost: raw.test\r\nContent-Length: 100\r\n\r\n0123456789")
        backend_conn, got = edge.raw.accept_request(want=10)
        with backend_conn:
            assert got.startswith(b"POST /stall HTTP/1.1\r\n") and got.endswith(b"0123456789")
            stalled = time.monotonic()
            answer = _read_answer(sock, BODY_TIMEOUT + 5)
            waited = time.monotonic() - stalled
            assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
            assert b"no byte of the request body came for 1 s" in answer and b"Connection: close" in answer
            # 1 s of silence, seen within a quarter of it, plus scheduling slack.
            assert BODY_TIMEOUT * 0.9 <= waited < BODY_TIMEOUT * 1.25 + 1.0, waited
            # The stream was reset: the connector closed its connection to the app.
            assert _ended(backend_conn, 5), "the backend connection outlived the 408"
    entries = wait_until(lambda: _body_timeouts(edge, "body_timeout")[before:], 5, "the relay's log line")
    assert entries[0]["app"] == "raw" and entries[0]["bytes"] == 10 and entries[0]["client"].startswith("127.0.0.1:")
    assert entries[0]["id"] in answer.decode()


def test_a_client_waiting_for_100_continue_is_not_timed_until_it_gets_it(edge):
    head = b"PUT /wait HTTP/1.1\r\nHost: raw.test\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
    # The backend never says 100: the client rightly waits, so no 408; the backend's
    # silence is bounded by response_timeout instead.
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as sock:
        sock.sendall(head)
        backend_conn, _ = edge.raw.accept_request()
        with backend_conn:
            started = time.monotonic()
            answer = _read_answer(sock, RESPONSE_TIMEOUT + 5)
            waited = time.monotonic() - started
            assert answer.startswith(b"HTTP/1.1 504 "), answer[:200]
            assert RESPONSE_TIMEOUT * 0.9 <= waited < RESPONSE_TIMEOUT + 1.0, waited
            assert _ended(backend_conn, 5)
    # The backend says 100: from then on the body is the client's to send.
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as sock:
        sock.sendall(head)
        backend_conn, _ = edge.raw.accept_request()
        with backend_conn:
            backend_conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            started = time.monotonic()
            answer = _read_answer(sock, BODY_TIMEOUT + 5)
            waited = time.monotonic() - started
            assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 408 "), answer[:200]
            assert waited < BODY_TIMEOUT * 1.25 + 1.0, waited
            assert _ended(backend_conn, 5)


def test_a_body_trickling_below_the_minimum_rate_gets_408(edge):
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: web.test\r\nContent-Length: 100000\r\n\r\n")
        started = time.monotonic()
        answer = b""
        # 20 bytes every 0.1 s: never silent for body_timeout, but 200 B/s against 2000 B/s.
        for _ in range(100):
            try:
                sock.sendall(b"x" * 20)
            except (BrokenPipeError, ConnectionResetError):
                break
            sock.settimeout(0.1)
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
        else:
            raise AssertionError("the trickling body was read for 10 s")
        answer += _read_answer(sock, 5) if not answer.endswith(b"\n") else b""
    elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"slower than 2000 bytes/s" in answer
    # grace + bytes / rate: cut soon after the grace period, before the body timeout rule could.
    assert RATE_GRACE <= elapsed < RATE_GRACE + 1.5, elapsed
    assert wait_until(lambda: _body_timeouts(edge, "body_min_rate"), 5, "the relay's log line")[-1]["app"] == "web"


def test_a_2_mb_upload_passes(edge):
    size = 2 * MiB
    digest = hashlib.sha256()
    for block in pattern(size):
        digest.update(block)
    conn = http.client.HTTPConnection("127.0.0.1", edge.port, timeout=30)
    try:
        conn.request("POST", "/upload", body=b"".join(pattern(size)), headers={"Host": "web.test"})
        response = conn.getresponse()
        body = json.loads(response.read())
    finally:
        conn.close()
    assert response.status == 200 and body["size"] == size and body["sha256"] == digest.hexdigest()


def test_an_upload_held_back_by_a_backend_that_does_not_read_is_not_cut(edge):
    """The edge stops reading the user while the tunnel pushes back: that time is not the client's."""
    size = 64 * MiB
    stall = 3 * BODY_TIMEOUT
    sent = threading.Event()
    failure: list = []

    def upload(sock: socket.socket) -> None:
        try:
            sock.sendall(b"PUT /big HTTP/1.1\r\nHost: raw.test\r\nContent-Length: %d\r\n\r\n" % size)
            for block in pattern(size):
                sock.sendall(block)
            sent.set()
        except OSError as exc:
            failure.append(exc)

    with socket.create_connection(("127.0.0.1", edge.port), timeout=30) as sock:
        client = threading.Thread(target=upload, args=(sock,), daemon=True)
        client.start()
        backend_conn, got = edge.raw.accept_request()
        with backend_conn:
            head, rest = got.split(b"\r\n\r\n", 1)
            assert head.startswith(b"PUT /big HTTP/1.1")
            time.sleep(stall)  # the app does not read: every buffer and the stream's window fill up
            assert not failure, f"the upload was cut while the edge held it back: {failure}"
            assert not sent.is_set(), "the body was never held back; the test proves nothing"
            received = len(rest)
            backend_conn.settimeout(30)
            while received < size:
                chunk = backend_conn.recv(MiB)
                assert chunk, f"the backend connection ended after {received} of {size} bytes"
                received += len(chunk)
            backend_conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            sock.settimeout(30)
            answer = sock.recv(4096)
        client.join(30)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"ok"), answer[:200]
    assert sent.is_set() and not failure


def _seen_headers(body: bytes) -> list[tuple[str, str]]:
    return [(k, v) for k, v in json.loads(body)["headers"]]


def _get(port: int, host: str, path: str, headers: list[tuple[str, str]]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_host=True)
        conn.putheader("Host", host)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


FORGED = [("X_Backhaul_User", "mallory"), ("X-Backhaul_User", "eve"), ("X_Forwarded_For", "10.6.6.6"), ("X_Request_Id", "forged")]


def test_identity_headers_forged_with_underscores_never_reach_the_backend(edge):
    status, body = _get(edge.port, "web.test", "/whoami", [*FORGED, ("X_Custom", "1"), ("Accept", "*/*")])
    assert status == 200
    seen = _seen_headers(body)
    folded = [name.lower().replace("_", "-") for name, _ in seen]
    assert "x-backhaul-user" not in folded and [n for n, _ in seen if "_" in n] == []
    values = " ".join(v for _, v in seen)
    assert "mallory" not in values and "eve" not in values and "10.6.6.6" not in values and "forged" not in values
    assert ("Accept", "*/*") in seen
    entry = wait_until(lambda: edge.system.relay.log_entries("request headers with '_' in their name dropped"), 5, "the log line")[-1]
    assert entry["app"] == "web" and "X_Backhaul_User" in entry["headers"]


def test_absolute_form_on_a_keep_host_app_sends_the_uris_authority_as_host(edge):
    def ask(target: bytes) -> dict:
        with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as sock:
            sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: unrelated.example\r\nConnection: close\r\n\r\n")
            answer = _read_answer(sock, 10)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        return {k.lower(): v for k, v in _seen_headers(answer.split(b"\r\n\r\n", 1)[1])}

    seen = ask(b"http://kept.test:8080/abs?x=1")
    assert seen["host"] == "kept.test:8080" and seen["x-forwarded-host"] == "kept.test:8080"
    # Not keeping the host: the internal URL's, as for every request.
    assert ask(b"http://web.test/abs")["host"] == f"127.0.0.1:{edge.web.port}"


def test_a_gates_identity_header_reaches_the_backend_and_forgeries_do_not(tmp_path, backend):
    """A gated app (the in-process relay of test_http_preauth with its rule gate)."""
    system = System(tmp_path)
    gate = RuleGate()
    relay = None
    try:
        system.init()
        settings = RelaySettings(
            data_dir=system.data_dir, listen=f"127.0.0.1:{system.port}", http=f"127.0.0.1:{system.http_port}",
            http_limits=HttpLimits(underscore_headers=1),  # even kept, the reserved spellings go
        )
        relay = InProcessRelay(settings, gate)
        relay.start()
        system.wait_healthy()
        web = backend("http")
        system.publish_http("intranet", "sso.test", f"http://127.0.0.1:{web.port}", "--preauth", "oidc")
        system.start_connector("one")
        signed_in = [("Authorization", "Bearer letmein"), *FORGED, ("X_Custom", "kept")]
        status, body = wait_until(
            lambda: (lambda r: r if r[0] == 200 else None)(_get(system.http_port, "sso.test", "/whoami", signed_in)),
            30, "a signed-in request to reach the app", interval=0.2,
        )
        seen = _seen_headers(body)
        identity = [v for n, v in seen if n.lower().replace("_", "-") == "x-backhaul-user"]
        assert identity == ["alice@corp"]
        assert ("X_Custom", "kept") in seen  # the switch keeps names that read as nothing reserved
        values = " ".join(v for _, v in seen)
        assert "mallory" not in values and "eve" not in values and "10.6.6.6" not in values
        # The gate saw what the backend sees: no forged spelling either.
        assert all(gate_name.replace("_", "-") != "x-backhaul-user" for gate_name, _ in gate.seen[-1].headers)
    finally:
        system.stop()
        if relay is not None:
            relay.stop()


def _patch(system, path: str, body: dict) -> tuple[int, dict]:
    ctx = ssl.create_default_context(cafile=str(system.data_dir / "ca.pem"))
    token = (system.data_dir / "admin.token").read_text().strip()
    request = urllib.request.Request(
        f"{system.url}{path}", data=json.dumps(body).encode(), method="PATCH",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, context=ctx, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_health_path_naming_another_host_is_refused_and_never_dialed(system, backend):
    trap = socket.create_server(("127.0.0.1", 0))
    trap.setblocking(False)
    trap_port = trap.getsockname()[1]
    try:
        web = backend("http")
        url = f"http://127.0.0.1:{web.port}"
        bad = f"//127.0.0.1:{trap_port}/x"
        result = system.admin("app", "publish", "hp", "--http", "hp.test", "--internal-url", url, "--health-path", bad, check=False)
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "two slashes" in lines[0] and bad in lines[0], result.stderr
        system.admin("app", "publish", "hp", "--http", "hp.test", "--internal-url", url, "--health-path", "/ok")
        # A change through the API is held to the same rule: 400 with the reason.
        status, answer = _patch(system, "/v1/apps/hp", {"health_path": f"/\\127.0.0.1:{trap_port}/x"})
        assert status == 400 and "two slashes" in json.dumps(answer), answer

        # A store written before the check holds such a path: the connector must refuse it again.
        store = open_store(system.data_dir)
        try:
            app = store.get_app("hp")
            store.update_app("hp", dataclasses.replace(app, health_path=bad))
        finally:
            store.close()
        system.admin("app", "publish", "probe", "--http", "probe.test", "--internal-url", url, "--health-path", "/probe")
        system.start_connector("one", extra=("--health-interval", "0.2", "--heartbeat", "1"))

        def reach(name: str) -> list:
            apps = {a["name"]: a for a in system.api("/v1/apps")}
            return [c["reachable"] for c in apps[name]["reachability"]["connectors"]]

        # "probe" came in the same configuration as the bad path, and its check ran (the admin
        # view comes from heartbeats).
        wait_until(lambda: reach("probe") == [True], 30, "the connector to check the probe app", interval=0.2)
        checked = time.monotonic()
        while time.monotonic() - checked < 1.0:  # five more rounds of checks
            try:
                conn, peer = trap.accept()
            except BlockingIOError:
                time.sleep(0.05)
                continue
            conn.close()
            raise AssertionError(f"the connector dialed the health path's host: {peer}")
        assert reach("hp") == [None]  # unchecked: routed as before, not reported down
        refused = system.connectors["one"].log_entries("health path refused: the app is not checked")
        assert refused and refused[0]["app"] == "hp"
    finally:
        trap.close()
