"""HTTP apps end to end: real clients -> relay HTTP(S) edge -> tunnel -> connector -> real web apps.

One relay, one connector and two aiohttp backends (plain and TLS) serve the whole module:
starting them costs seconds, and every test below publishes nothing new.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import http.client
import json
import socket
import ssl
import threading
import time
from types import SimpleNamespace

import pytest

from backhaul import pki

from .backend import pattern
from .harness import Backend, free_port, running_relay, wait_until

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
HOST = "app.test"
#: Limits made small so the tests of them are quick (see HttpLimits).
HEADER_TIMEOUT = 1.0
RESPONSE_TIMEOUT = 3.0
PER_CLIENT = 16


def _write_cert(ca, names: list[str], directory, stem: str) -> tuple[str, str]:
    key, cert = pki.make_service_cert(ca, names)
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(pki.cert_to_pem(cert))
    key_path.write_bytes(pki.key_to_pem(key))
    return str(cert_path), str(key_path)


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    work = tmp_path_factory.mktemp("http-edge")
    ca, other_ca = pki.make_ca("test backends CA"), pki.make_ca("some other CA")
    (work / "ca.pem").write_bytes(ca.cert_pem)
    (work / "other-ca.pem").write_bytes(other_ca.cert_pem)
    backend_cert = _write_cert(ca, ["127.0.0.1"], work, "backend")
    edge_cert = _write_cert(ca, [HOST, "secure.test"], work, "edge")
    https_port = free_port()
    extra = (
        "--https", f"127.0.0.1:{https_port}", "--https-cert", edge_cert[0], "--https-key", edge_cert[1],
        "--http-limit", f"header_timeout={HEADER_TIMEOUT}",
        "--http-limit", f"response_timeout={RESPONSE_TIMEOUT}",
        "--http-limit", f"max_connections_per_client={PER_CLIENT}",
    )
    procs: list = []
    try:
        with running_relay(work, relay_args=extra) as system:
            web = Backend("http", work, procs)
            tls = Backend("http", work, procs, backend_cert)
            plain, secure = f"http://127.0.0.1:{web.port}", f"https://127.0.0.1:{tls.port}"
            system.admin("group", "create", "empty")
            apps = [
                ("web", HOST, plain),
                ("prefixed", "prefixed.test", plain + "/base/"),
                ("kept", "kept.test", plain, "--keep-host"),
                ("secure", "secure.test", secure, "--backend-ca", str(work / "ca.pem")),
                ("wrongca", "wrongca.test", secure, "--backend-ca", str(work / "other-ca.pem")),
                ("sysca", "sysca.test", secure),
                ("insecure", "insecure.test", secure, "--backend-insecure"),
                ("down", "down.test", f"http://127.0.0.1:{free_port()}"),
                ("oidc", "oidc.test", plain, "--preauth", "oidc"),
                ("orphan", "orphan.test", plain, "--group", "empty"),
                ("ephemeral", "ephemeral.test", plain),
            ]
            # Through the CLI, as an admin would; side by side, since each call starts a process.
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda a: system.admin("app", "publish", a[0], "--http", a[1], "--internal-url", *a[2:]), apps))
            system.start_connector("one")
            system.wait_http(HOST)
            yield SimpleNamespace(system=system, web=web, tls=tls, work=work, https_port=https_port, port=system.http_port)
    finally:
        for proc in procs:
            proc.stop()


def request(edge, method, path, body=None, headers=None, host=HOST, conn=None):
    """One request; returns (response, body). ``conn`` reuses a connection (kept open)."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", edge.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Host": host, **(headers or {})})
        response = conn.getresponse()
        return response, response.read()
    finally:
        if own:
            conn.close()


def seen_headers(body: bytes) -> dict:
    return {k.lower(): v for k, v in json.loads(body)["headers"]}


def raw(edge, data: bytes, timeout: float = 10.0, wait_close: bool = True) -> bytes:
    """Send ``data`` on a new connection; everything the edge sends until it closes."""
    with socket.create_connection(("127.0.0.1", edge.port), timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                return out
            out += chunk
            if not wait_close and b"\r\n\r\n" in out:
                return out
        raise AssertionError(f"the edge did not close the connection; got {out[:300]!r}")


class _File:
    """Lets several http.client responses be read in turn from one socket (which they may not close)."""

    def __init__(self, sock: socket.socket) -> None:
        self.file = sock.makefile("rb")

    def makefile(self, *args, **kwargs):
        return self

    def close(self) -> None:
        pass

    def __getattr__(self, name):
        return getattr(self.file, name)


def read_responses(sock: socket.socket, count: int, methods=()) -> list[tuple[int, bytes, http.client.HTTPResponse]]:
    source = _File(sock)
    out = []
    for i in range(count):
        response = http.client.HTTPResponse(source, method=methods[i] if i < len(methods) else None)
        response.begin()
        out.append((response.status, response.read(), response))
    return out


def pattern_digest(size: int) -> str:
    digest = hashlib.sha256()
    for block in pattern(size):
        digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------- the happy paths


def test_get_and_post_reach_the_app_through_a_connector(edge):
    response, body = request(edge, "GET", "/hello?x=1", headers={"X-Backhaul-User": "forged", "X-Forwarded-For": "203.0.113.9"})
    assert response.status == 200
    seen = json.loads(body)
    assert seen["method"] == "GET" and seen["path"] == "/hello?x=1"
    headers = seen_headers(body)
    assert headers["host"] == f"127.0.0.1:{edge.web.port}"
    assert headers["x-forwarded-host"] == HOST
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert "x-backhaul-user" not in headers
    request_id = headers["x-request-id"]
    # The connector's line for the stream (written when it ends) names the same request.
    wait_until(lambda: f'"id":"{request_id}"' in edge.system.connectors["one"].log(), 10, "the connector's stream log line")

    payload = b"some form data " * 1000
    response, body = request(edge, "POST", "/submit", body=payload, headers={"Content-Type": "text/plain"})
    assert response.status == 200
    seen = json.loads(body)
    assert seen["method"] == "POST" and seen["body"].encode("latin-1") == payload


def test_path_under_the_internal_url_and_keep_host(edge):
    response, body = request(edge, "GET", "/page?q=1", host="prefixed.test")
    assert response.status == 200 and json.loads(body)["path"] == "/base/page?q=1"
    response, body = request(edge, "GET", "/", host="kept.test:8080")
    assert seen_headers(body)["host"] == "kept.test:8080"


def test_chunked_bodies_both_ways(edge):
    blocks = [b"a" * 1000, b"b" * 70_000, b"c"]
    conn = http.client.HTTPConnection("127.0.0.1", edge.port, timeout=30)
    try:
        conn.request("POST", "/upload", body=iter(blocks), headers={"Host": HOST}, encode_chunked=True)
        response = conn.getresponse()
        result = json.loads(response.read())
        assert result["size"] == 71_001
        assert result["sha256"] == hashlib.sha256(b"".join(blocks)).hexdigest()
        assert "chunked" in seen_headers(json.dumps(result).encode())["transfer-encoding"]
        response, body = request(edge, "GET", "/download?size=300000&chunked=1", conn=conn)
        assert response.getheader("Transfer-Encoding") == "chunked"
        assert hashlib.sha256(body).hexdigest() == pattern_digest(300_000)
    finally:
        conn.close()


def _rss(edge) -> int:
    return edge.system.relay.rss_kib() + edge.system.connectors["one"].rss_kib()


def test_200_mb_each_way_streams_in_bounded_memory(edge):
    size = 200 * MiB
    before = _rss(edge)
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.wait(0.1):
            peak[0] = max(peak[0], _rss(edge))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", edge.port, timeout=120)
        conn.request("PUT", "/upload", body=pattern(size), headers={"Host": HOST, "Content-Length": str(size)})
        result = json.loads(conn.getresponse().read())
        assert result["size"] == size and result["sha256"] == pattern_digest(size)
        conn.request("GET", f"/download?size={size}", headers={"Host": HOST})
        response = conn.getresponse()
        assert int(response.getheader("Content-Length")) == size
        digest, got = hashlib.sha256(), 0
        while chunk := response.read(4 * MiB):
            digest.update(chunk)
            got += len(chunk)
        conn.close()
        assert got == size and digest.hexdigest() == pattern_digest(size)
    finally:
        done.set()
        sampler.join()
    growth = (peak[0] - before) * 1024
    print(f"relay + connector RSS: {before} KiB before, {peak[0]} KiB at the peak of 2 x 200 MB")
    assert growth < 48 * MiB, f"RSS grew by {growth / MiB:.0f} MiB while streaming"


def test_keep_alive_reuses_the_backend_connection(edge):
    conn = http.client.HTTPConnection("127.0.0.1", edge.port, timeout=30)
    try:
        ports = {json.loads(request(edge, "GET", f"/k{i}", conn=conn)[1])["peer_port"] for i in range(3)}
    finally:
        conn.close()
    assert len(ports) == 1
    other = json.loads(request(edge, "GET", "/k")[1])["peer_port"]
    assert other not in ports


def test_pipelined_requests_are_answered_in_order(edge):
    head = f"Host: {HOST}\r\n".encode()
    data = (
        b"GET /p1 HTTP/1.1\r\n" + head + b"\r\n"
        + b"POST /p2 HTTP/1.1\r\n" + head + b"Content-Length: 5\r\n\r\nhello"
        + b"HEAD /download?size=10 HTTP/1.1\r\n" + head + b"\r\n"
        + b"GET /p4 HTTP/1.1\r\n" + head + b"Connection: close\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as sock:
        sock.sendall(data)
        first, second, third, fourth = read_responses(sock, 4, methods=("GET", "POST", "HEAD", "GET"))
    assert json.loads(first[1])["path"] == "/p1"
    assert json.loads(second[1])["path"] == "/p2" and json.loads(second[1])["body"] == "hello"
    assert third[0] == 200 and third[1] == b"" and third[2].getheader("Content-Length") == "10"
    assert json.loads(fourth[1])["path"] == "/p4" and fourth[2].getheader("Connection") == "close"


def test_head_request_and_http10_client(edge):
    conn = http.client.HTTPConnection("127.0.0.1", edge.port, timeout=30)
    try:
        conn.request("HEAD", "/download?size=12345", headers={"Host": HOST})
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("Content-Length") == "12345" and response.read() == b""
        response, body = request(edge, "GET", "/after-head", conn=conn)
        assert json.loads(body)["path"] == "/after-head"
    finally:
        conn.close()
    answer = raw(edge, b"GET /old HTTP/1.0\r\nHost: app.test\r\n\r\n")
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" in head
    assert json.loads(body)["path"] == "/old"


def test_expect_100_continue(edge):
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as sock:
        sock.sendall(b"PUT /upload HTTP/1.1\r\nHost: app.test\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
        interim = b""
        while b"\r\n\r\n" not in interim:
            interim += sock.recv(1024)
        assert interim.startswith(b"HTTP/1.1 100")
        sock.sendall(b"body")
        (status, body, _), = read_responses(sock, 1)
    assert status == 200 and json.loads(body)["size"] == 4


def test_early_answer_closes_the_connection(edge):
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as sock:
        sock.sendall(b"POST /early HTTP/1.1\r\nHost: app.test\r\nContent-Length: 100000000\r\n\r\n" + b"x" * 65536)
        (status, body, response), = read_responses(sock, 1)
        assert status == 413 and response.getheader("Connection") == "close"
        sock.settimeout(10)
        try:
            while sock.recv(65536):
                pass
        except ConnectionResetError:
            pass


# ---------------------------------------------------------------------------- translation


def test_redirects_point_at_the_external_url(edge):
    response, _ = request(edge, "GET", "/redirect")
    assert response.status == 302
    assert response.getheader("Location") == f"http://{HOST}/landed?x=1"
    assert response.getheader("Content-Location") == f"http://{HOST}/here"
    response, _ = request(edge, "GET", "/redirect", host="prefixed.test:8080")
    assert response.getheader("Location") == "http://prefixed.test:8080/landed?x=1"


def test_cookie_domains_are_translated(edge):
    response, _ = request(edge, "GET", "/cookie")
    cookies = response.headers.get_all("Set-Cookie")
    assert f"sid=abc; Domain={HOST}; HttpOnly; Path=/" in cookies or any(
        "Domain=app.test" in c and c.startswith("sid=abc") for c in cookies
    )
    assert not any("127.0.0.1" in c for c in cookies)
    assert any(c.startswith("plain=1") for c in cookies)


def test_websocket_echo(edge):
    import aiohttp

    async def main():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"http://127.0.0.1:{edge.port}/ws", headers={"Host": HOST}) as ws:
                await ws.send_str("hello")
                assert (await ws.receive(timeout=10)).data == "echo: hello"
                blob = bytes(range(256)) * 4096
                await ws.send_bytes(blob)
                assert (await ws.receive(timeout=10)).data == blob
                await ws.close()

    asyncio.run(main())


# ---------------------------------------------------------------------------- the edge's own answers


def test_unknown_host_is_404_with_a_request_id(edge):
    response, body = request(edge, "GET", "/", host="nobody.test")
    assert response.status == 404
    request_id = response.getheader("X-Request-Id")
    assert request_id and request_id.encode() in body and b"nobody.test" in body


def test_no_active_connector_is_502_and_logged(edge):
    response, body = request(edge, "GET", "/", host="orphan.test")
    assert response.status == 502 and b"no connector" in body
    request_id = response.getheader("X-Request-Id")
    wait_until(lambda: request_id in edge.system.relay.log(), 10, "the relay's log line for the 502")


def test_unreachable_backend_is_502(edge):
    response, body = request(edge, "GET", "/", host="down.test")
    # the connect is refused, or (once its checks failed twice) the connector reported the origin down
    assert response.status == 502 and (b"refused" in body or b"can reach app 'down'" in body), body


def test_slow_backend_is_504(edge):
    started = time.monotonic()
    response, body = request(edge, "GET", f"/slow?seconds={RESPONSE_TIMEOUT * 3}")
    assert response.status == 504
    assert time.monotonic() - started < RESPONSE_TIMEOUT * 3
    assert response.getheader("X-Request-Id").encode() in body


def test_oidc_app_without_a_gate_fails_closed(edge):
    response, body = request(edge, "GET", "/", host="oidc.test")
    assert response.status == 503 and b"pre-authentication is not configured" in body


# ---------------------------------------------------------------------------- TLS


def test_https_backend_is_verified(edge):
    response, body = request(edge, "GET", "/tls", host="secure.test")
    assert response.status == 200 and json.loads(body)["path"] == "/tls"
    for host in ("wrongca.test", "sysca.test"):
        response, body = request(edge, "GET", "/", host=host)
        assert response.status == 502 and b"certificate" in body, body
    assert "certificate was not accepted" in edge.system.connectors["one"].log()
    response, body = request(edge, "GET", "/anyway", host="insecure.test")
    assert response.status == 200 and json.loads(body)["path"] == "/anyway"


def test_https_edge_with_the_operators_certificate(edge):
    ctx = ssl.create_default_context(cafile=str(edge.work / "ca.pem"))
    conn = http.client.HTTPSConnection("127.0.0.1", edge.https_port, timeout=30, context=ctx)
    # Verify the certificate for the name the user asked for, as a browser would.
    conn.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", edge.https_port), timeout=30), server_hostname=HOST)
    try:
        conn.request("GET", "/secure-edge", headers={"Host": HOST})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    assert response.status == 200
    assert seen_headers(body)["x-forwarded-proto"] == "https"


# ---------------------------------------------------------------------------- hostile input


HOSTILE = {
    "smuggling: content-length and transfer-encoding": (
        b"POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: app.test\r\n\r\n",
        400,
    ),
    "smuggling: duplicate content-length": (
        b"POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 0\r\nContent-Length: 44\r\n\r\n"
        b"GET /smuggled HTTP/1.1\r\nHost: app.test\r\n\r\n",
        400,
    ),
    "obs-fold": (b"GET / HTTP/1.1\r\nHost: app.test\r\nX-A: b\r\n c\r\n\r\n", 400),
    "bare LF": (b"GET / HTTP/1.1\nHost: app.test\n\n", 400),
    "CR injected in a header": (b"GET / HTTP/1.1\r\nHost: app.test\r\nX-A: a\rX-Injected: 1\r\n\r\n", 400),
    "header section too large": (b"GET / HTTP/1.1\r\nHost: app.test\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n", 431),
    "target too long": (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: app.test\r\n\r\n", 414),
    "two hosts": (b"GET / HTTP/1.1\r\nHost: app.test\r\nHost: kept.test\r\n\r\n", 400),
    "malformed host": (b"GET / HTTP/1.1\r\nHost: app.test:x\r\n\r\n", 400),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_requests_get_a_clear_refusal_and_reach_nobody(edge, case):
    data, status = HOSTILE[case]
    answer = raw(edge, data)
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    assert b"Connection: close" in answer.split(b"\r\n\r\n")[0]
    assert answer.count(b"HTTP/1.1 ") == 1  # nothing smuggled got an answer of its own
    assert "/smuggled" not in edge.web.proc.log()


def test_slowloris_is_cut_off_after_the_header_timeout(edge):
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: app.test\r\n")
        answer = b""
        for i in range(100):
            try:
                sock.sendall(b"X-%d: 1\r\n" % i)
                chunk = sock.recv(4096) if _readable(sock, 0.2) else b"-"
            except (BrokenPipeError, ConnectionResetError):
                break
            if not chunk:
                break
            if chunk != b"-":
                answer += chunk
    elapsed = time.monotonic() - started
    assert elapsed < HEADER_TIMEOUT + 3, f"the trickling client was served for {elapsed:.1f} s"
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408")


def _readable(sock: socket.socket, seconds: float) -> bool:
    import select

    return bool(select.select([sock], [], [], seconds)[0])


def test_connections_per_client_are_limited(edge):
    conns = []
    refused = None
    try:
        for _ in range(PER_CLIENT + 4):
            sock = socket.create_connection(("127.0.0.1", edge.port), timeout=10)
            conns.append(sock)
            sock.sendall(b"GET /limit HTTP/1.1\r\nHost: app.test\r\n\r\n")
            first = sock.recv(16)
            if not first.startswith(b"HTTP/1.1 200"):
                refused = first + sock.recv(4096)
                break
            _drain_response(sock, first)
        assert refused is not None and refused.startswith(b"HTTP/1.1 429"), refused
        assert len(conns) <= PER_CLIENT + 1
    finally:
        for sock in conns:
            sock.close()
    # Closed connections are counted out again.
    wait_until(lambda: request(edge, "GET", "/after")[0].status == 200, 10, "a new connection to be served")


def _drain_response(sock: socket.socket, start: bytes) -> None:
    data = start
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, body = data.split(b"\r\n\r\n", 1)
    length = int([line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")][0])
    while len(body) < length:
        body += sock.recv(4096)


def _push_until_blocked(port: int, data: bytes, seconds: float) -> tuple[int, socket.socket]:
    """Send ``data`` over and over for ``seconds`` without reading; how much the edge took."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setblocking(False)
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            sent += sock.send(data)
        except BlockingIOError:
            time.sleep(0.01)
    return sent, sock


def test_pipelining_client_that_never_reads_is_held_in_bounded_memory(edge):
    requests = b"GET /download?size=65536 HTTP/1.1\r\nHost: app.test\r\n\r\n" * 1000
    before = _rss(edge)
    sent, sock = _push_until_blocked(edge.port, requests, 2.0)
    try:
        mid = _rss(edge)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                sent += sock.send(requests)
            except BlockingIOError:
                time.sleep(0.01)
        after = _rss(edge)
    finally:
        sock.close()
    # The edge stops reading once answers back up: the kernel's buffers, not gigabytes.
    assert sent < 64 * MiB, f"the edge took {sent / MiB:.0f} MiB of pipelined requests"
    assert (after - before) * 1024 < 48 * MiB and (after - mid) * 1024 < 16 * MiB, (before, mid, after)


def test_user_that_never_reads_holds_the_download_at_the_window(edge):
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as sock:
        sock.sendall(b"GET /download?size=%d HTTP/1.1\r\nHost: app.test\r\n\r\n" % (4096 * MiB))
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        time.sleep(1.0)
        mid = _rss(edge)
        time.sleep(2.0)
        after = _rss(edge)
        assert abs(after - mid) * 1024 < 16 * MiB, f"RSS moved {after - mid} KiB while nobody read"
        got = 0
        while got < 16 * MiB:
            got += len(sock.recv(MiB))


def test_bad_service_options_are_refused_with_one_line(edge, tmp_path):
    data_dir = str(edge.system.data_dir)
    cases = [
        (("--https", "127.0.0.1:2"), "--https-cert"),
        (("--https-cert", "x.pem"), "--https HOST:PORT"),
        (("--https", "127.0.0.1:2", "--https-cert", str(tmp_path / "no.pem"), "--https-key", str(tmp_path / "no.key")), "missing"),
        (("--http-limit", "bogus=1"), "header_timeout"),
        (("--http-limit", "header_timeout=soon"), "not a number"),
        (("--http-limit", "max_headers=0"), "positive"),
    ]
    for args, words in cases:
        result = edge.system.cli("service", "run", "--data-dir", data_dir, "--listen", "127.0.0.1:1", *args, check=False)
        assert result.returncode == 2 and words in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------- administration


def test_publish_options_through_the_cli(edge):
    system = edge.system
    apps = {app["name"]: app for app in system.admin_json("app", "list")}
    assert apps["kept"]["keep_host"] is True
    assert apps["insecure"]["backend_insecure"] is True
    assert apps["secure"]["backend_ca"] == (edge.work / "ca.pem").read_text().strip() + "\n"
    refusals = [
        (("app", "publish", "x", "--tcp", str(free_port()), "--target", "h:1", "--keep-host"), "for --http apps"),
        (("app", "publish", "x", "--http", "x.test", "--internal-url", "https://h/", "--backend-ca", "/nonexistent.pem"), "cannot read"),
        (("app", "publish", "x", "--http", "x.test", "--internal-url", "http://h/", "--backend-insecure"), "https://"),
        (("app", "publish", "x", "--http", "x.test", "--internal-url", "https://h/", "--backend-ca", str(edge.work / "backend.key")), "PEM"),
    ]
    for args, words in refusals:
        result = system.admin(*args, check=False)
        assert result.returncode != 0 and words in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert "x" not in {app["name"] for app in system.admin_json("app", "list")}


def test_deleting_an_app_closes_its_open_connections(edge):
    import aiohttp

    async def main():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"http://127.0.0.1:{edge.port}/ws", headers={"Host": "ephemeral.test"}) as ws:
                await ws.send_str("still here?")
                assert (await ws.receive(timeout=10)).data == "echo: still here?"
                await asyncio.to_thread(edge.system.admin, "app", "delete", "ephemeral")
                message = await ws.receive(timeout=15)
                assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)

    asyncio.run(main())
    assert request(edge, "GET", "/", host="ephemeral.test")[0].status == 404


def test_half_closed_client_still_gets_its_answers(edge):
    head = b"Host: app.test\r\n"
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as sock:
        sock.sendall(b"GET /h1 HTTP/1.1\r\n" + head + b"\r\nGET /h2 HTTP/1.1\r\n" + head + b"\r\n")
        sock.shutdown(socket.SHUT_WR)
        answers = read_responses(sock, 2)
        assert sock.recv(1) == b""  # then the edge closes
    assert [json.loads(body)["path"] for _, body, _ in answers] == ["/h1", "/h2"]
