"""HTTP apps end to end: a real client -> relay HTTP edge -> tunnel -> connector -> a real web app."""

from __future__ import annotations

import http.client
import json

import pytest

from .harness import wait_until

pytestmark = pytest.mark.e2e

HOST = "app.test"


@pytest.fixture
def web(system, backend):
    """A published HTTP app in front of the aiohttp backend; returns the backend."""
    app = backend("http")
    system.start_connector("one")
    system.publish_http("web", HOST, f"http://127.0.0.1:{app.port}")
    system.wait_http(HOST)
    return app


def _request(system, method, path, body=None, headers=None, host=HOST):
    conn = http.client.HTTPConnection("127.0.0.1", system.http_port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Host": host, **(headers or {})})
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def test_get_and_post_reach_the_app_through_a_connector(system, web):
    response, body = _request(system, "GET", "/hello?x=1")
    assert response.status == 200
    seen = json.loads(body)
    assert seen["method"] == "GET" and seen["path"] == "/hello?x=1"
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers["host"] == f"127.0.0.1:{web.port}"
    assert headers["x-forwarded-host"] == HOST
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-for"] == "127.0.0.1"
    request_id = headers["x-request-id"]
    # The connector's line for the stream (written when it ends) names the same request.
    wait_until(lambda: f'"id":"{request_id}"' in system.connectors["one"].log(), 10, "the connector's stream log line")

    payload = b"some form data " * 1000
    response, body = _request(system, "POST", "/submit", body=payload, headers={"Content-Type": "text/plain"})
    assert response.status == 200
    seen = json.loads(body)
    assert seen["method"] == "POST" and seen["body"].encode("latin-1") == payload
