"""The HTTP edge with origin health and relay metrics, end to end.

One relay (metrics on) and one connector checking its origins every 0.2 s; real aiohttp
backends on 127.0.0.1. An http app whose backend is down is answered by the edge with
502 saying no connector can reach it (its connector reported so), and with the app's
answer once the backend is back. Requests through an http app move that app's stream
and byte counters, read with prometheus_client's own parser.
"""

from __future__ import annotations

import http.client
import json

import pytest

from .harness import System, free_port, wait_until
from .test_observe import _scrape

pytestmark = pytest.mark.e2e

P = "backhaul_relay_"
BODY = 10_000


def _get(port: int, host: str, path: str = "/") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _exchanges(port: int, host: str, connections: int) -> None:
    """On each of ``connections`` kept-alive connections: upload BODY bytes, then download BODY bytes."""
    for _ in range(connections):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("POST", "/upload", body=b"u" * BODY, headers={"Host": host})
            response = conn.getresponse()
            assert response.status == 200 and json.loads(response.read())["size"] == BODY
            conn.request("GET", f"/download?size={BODY}", headers={"Host": host})
            response = conn.getresponse()
            assert response.status == 200 and len(response.read()) == BODY
        finally:
            conn.close()


def _series(app: str) -> dict:
    a = (("app", app),)
    return {
        "opened": (P + "streams_opened_total", a),
        "active": (P + "streams_active", a),
        "latency": (P + "stream_open_seconds_count", a),
        "up": (P + "stream_bytes_total", a + (("direction", "client_to_app"),)),
        "down": (P + "stream_bytes_total", a + (("direction", "app_to_client"),)),
        "refused": (P + "streams_failed_total", a + (("reason", "REFUSED_STREAM"),)),
    }


def test_http_edge_routes_by_origin_health_and_counts_its_streams(tmp_path, backend):
    metrics = free_port()
    system = System(tmp_path)
    try:
        system.init()
        system.start_relay(extra=("--metrics", f"127.0.0.1:{metrics}"))
        web = backend("http")
        gone_port = free_port()
        system.start_connector("one", extra=("--health-interval", "0.2"))
        system.publish_http("web", "web.test", f"http://127.0.0.1:{web.port}")
        system.publish_http("gone", "gone.test", f"http://127.0.0.1:{gone_port}")
        system.wait_http("web.test")

        # -- metrics: 3 connections of 2 requests each are 3 streams of app "web"
        web_s = _series("web")
        before = _scrape(metrics)
        _exchanges(system.http_port, "web.test", connections=3)

        def counted():
            now = _scrape(metrics)
            moved = {k: now.get(key, 0) - before.get(key, 0) for k, key in web_s.items()}
            done = moved["opened"] == 3 and now.get(web_s["active"]) == 0
            return (now, moved) if done else None

        now, moved = wait_until(counted, 15, "the relay to count the 3 streams of app web")
        assert moved["latency"] == 3, moved
        # request and response heads come on top of the bodies
        assert 3 * BODY < moved["up"] < 3 * BODY + 6 * 2048, moved
        assert 3 * BODY < moved["down"] < 3 * BODY + 6 * 2048, moved
        assert moved["refused"] == 0, moved

        # -- origin health: the connector reports gone's origin down; the edge says so
        reason = "no connector in group 'default' can reach app 'gone'"

        def refused_by_health():
            status, body = _get(system.http_port, "gone.test")
            return status == 502 and reason in body.decode()

        wait_until(refused_by_health, 15, "the edge to refuse gone.test for want of a connector reaching it", interval=0.2)
        gone_s = _series("gone")
        before = _scrape(metrics)
        for _ in range(2):
            status, body = _get(system.http_port, "gone.test")
            assert status == 502 and reason in body.decode(), (status, body)
        wait_until(
            lambda: _scrape(metrics).get(gone_s["refused"], 0) - before.get(gone_s["refused"], 0) == 2,
            15, "the refused streams of app gone to be counted",
        )
        lines = [json.loads(line) for line in system.relay.log().splitlines() if line.startswith("{")]
        assert any(
            line.get("msg") == "http request answered by the edge" and line.get("status") == 502
            and reason in line.get("reason", "") and line.get("app") == "gone"
            for line in lines
        ), "the relay's log line names the reason"

        # -- the backend comes back: the next check reports it up and the app answers
        backend("http", "--port", str(gone_port))
        system.wait_http("gone.test", timeout=15)
        status, body = _get(system.http_port, "gone.test", "/upload")
        assert status == 200 and json.loads(body)["path"] == "/upload"
    finally:
        system.stop()
