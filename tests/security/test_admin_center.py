"""The admin center as an attacker meets it, against a real relay process: without a session
only the sign-in page is served; a cross-site, token-less, forged, expired or signed-out
request changes nothing; the admin token never shows in a URL or a page; hostile names are
escaped; failed sign-ins are braked; the signed-out list stays bounded."""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.parse

import pytest

from backhaul.center import sessions
from backhaul.center.routes import CSP
from backhaul.config import AdminCenterSettings
from backhaul.store import open_store

from tests.e2e.harness import running_relay

pytestmark = [pytest.mark.e2e, pytest.mark.codec_independent]

PAGES = ["/admin/", "/admin/connectors", "/admin/apps", "/admin/groups", "/admin/tokens", "/admin/releases", "/admin/log"]
HOSTILE = '<script>alert("x")</script>&"\'<img src=x onerror=alert(1)>'


class Client:
    """One browser-like HTTPS client of the relay's listen port (a cookie, no redirects followed)."""

    def __init__(self, system) -> None:
        self.system = system
        self.ctx = ssl.create_default_context(cafile=str(system.data_dir / "ca.pem"))
        self.cookie: str | None = None
        self.origin = f"https://127.0.0.1:{system.port}"

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPSConnection("127.0.0.1", self.system.port, context=self.ctx, timeout=10)
        try:
            sent = dict(headers or {})
            if self.cookie is not None:
                sent["Cookie"] = f"{sessions.COOKIE}={self.cookie}"
            conn.request(method, path, body=body, headers=sent)
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read().decode("utf-8", "replace")
        finally:
            conn.close()

    def sign_in(self, token: str, headers: dict | None = None):
        body = urllib.parse.urlencode({"token": token}).encode()
        sent = {"Content-Type": "application/x-www-form-urlencoded", "Origin": self.origin, "Sec-Fetch-Site": "same-origin", **(headers or {})}
        return self.request("POST", "/admin/signin", body, sent)

    def api(self, method: str, path: str, data=None, csrf: str | None = None, headers: dict | None = None):
        sent = {"Content-Type": "application/json", "Origin": self.origin, "Sec-Fetch-Site": "same-origin", **(headers or {})}
        if csrf is not None:
            sent["X-CSRF-Token"] = csrf
        status, _, text = self.request(method, path, None if data is None else json.dumps(data).encode(), sent)
        return status, json.loads(text) if text else None


def _cookie_of(headers: dict) -> str:
    header = headers["Set-Cookie"]
    name, _, rest = header.partition("=")
    assert name == sessions.COOKIE
    return rest.partition(";")[0]


def _csrf_of(page: str) -> str:
    marker = '<meta name="csrf-token" content="'
    return page.split(marker, 1)[1].split('"', 1)[0]


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    with running_relay(tmp_path_factory.mktemp("center")) as system:
        yield system


def test_without_a_session_only_the_sign_in_page_is_served(relay):
    client = Client(relay)
    status, headers, _ = client.request("GET", "/")
    assert status == 303 and headers["Location"] == "/admin/"
    for page in PAGES:
        status, headers, body = client.request("GET", page)
        assert status == 303 and headers["Location"] == "/admin/signin", page
        assert headers["Content-Security-Policy"] == CSP and headers["Cache-Control"] == "no-store"
        status, _, body = client.request("GET", page + "?fragment=1")
        assert status == 401 and json.loads(body)["error"] == "unauthorized"
    status, headers, body = client.request("GET", "/admin/signin")
    assert status == 200 and 'name="token"' in body and 'method="post"' in body
    assert headers["Content-Security-Policy"] == CSP
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["Referrer-Policy"] == "no-referrer"
    assert "<script>" not in body and "style=" not in body
    # The API itself: no bearer, no cookie, nothing.
    assert client.api("GET", "/v1/groups")[0] == 401
    assert client.api("POST", "/v1/groups", {"name": "nope"})[0] == 401


def test_sign_in_session_csrf_and_sign_out(relay):
    token = (relay.data_dir / "admin.token").read_text().strip()
    client = Client(relay)
    status, headers, body = client.sign_in("bha_wrong")
    assert status == 401 and "not the admin token" in body and "Set-Cookie" not in headers
    # A cross-site sign-in form (login CSRF) is refused even with the right token.
    status, headers, body = client.sign_in(token, {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"})
    assert status == 403 and "Set-Cookie" not in headers
    status, headers, body = client.sign_in(token)
    assert status == 303 and headers["Location"] == "/admin/"
    attributes = {a.strip().lower() for a in headers["Set-Cookie"].split(";")[1:]}
    assert {"httponly", "secure", "samesite=strict", "path=/"} <= attributes
    client.cookie = _cookie_of(headers)
    assert token not in headers["Location"] and token not in client.cookie
    csrf = None
    for page in PAGES:
        status, headers, body = client.request("GET", page)
        assert status == 200, (page, body[:300])
        assert headers["Content-Security-Policy"] == CSP and headers["Cache-Control"] == "no-store"
        assert token not in body
        assert "<script>" not in body and " style=" not in body and " on" + "click=" not in body
        csrf = _csrf_of(body)
    # The same JSON API the CLI uses: reading needs only the cookie...
    status, groups = client.api("GET", "/v1/groups")
    assert status == 200 and {g["name"] for g in groups} >= {"default"}
    # ...a change also the page's CSRF token, from the same origin.
    status, answer = client.api("POST", "/v1/groups", {"name": "no-csrf"})
    assert status == 403 and answer["error"] == "csrf_refused"
    status, answer = client.api("POST", "/v1/groups", {"name": "wrong-csrf"}, csrf="x" * len(csrf))
    assert status == 403 and answer["error"] == "csrf_refused"
    status, answer = client.api("POST", "/v1/groups", {"name": "cross"}, csrf=csrf, headers={"Origin": "https://evil.example"})
    assert status == 403 and answer["error"] == "cross_site_refused"
    status, answer = client.api("POST", "/v1/groups", {"name": "cross"}, csrf=csrf, headers={"Sec-Fetch-Site": "cross-site"})
    assert status == 403 and answer["error"] == "cross_site_refused"
    assert "cross" not in {g["name"] for g in relay.api("/v1/groups")}
    status, answer = client.api("POST", "/v1/groups", {"name": "from-the-page"}, csrf=csrf)
    assert status == 201 and answer["name"] == "from-the-page"
    # A refusal is the API's own message.
    status, answer = client.api("POST", "/v1/groups", {"name": "from-the-page"}, csrf=csrf)
    assert status == 409 and "from-the-page" in answer["detail"]
    # Sign-out ends the session for every copy of the cookie.
    kept = client.cookie
    body = urllib.parse.urlencode({"csrf": csrf}).encode()
    status, headers, _ = client.request(
        "POST", "/admin/signout", body, {"Content-Type": "application/x-www-form-urlencoded", "Origin": client.origin}
    )
    assert status == 303 and headers["Location"] == "/admin/signin"
    client.cookie = kept
    status, answer = client.api("GET", "/v1/groups")
    assert status == 401 and answer["error"] == "signed_out"
    assert client.request("GET", "/admin/")[0] == 303


def test_forged_and_expired_cookies_are_refused(relay):
    client = Client(relay)
    store = open_store(relay.data_dir)
    try:
        key_hex, _ = store.center_state()
        admin_hash = store.admin_token_hash()
    finally:
        store.close()
    key = sessions.mac_key(key_hex, admin_hash)
    _, good = sessions.issue(key, "test", __import__("time").time(), 60)
    client.cookie = good
    assert client.api("GET", "/v1/groups")[0] == 200
    # Expired (issued long ago), forged (another key), tampered (the MAC of another payload), garbage.
    _, expired = sessions.issue(key, "test", 1_000_000.0, 60)
    _, other_key = sessions.issue(sessions.mac_key("00" * 32, admin_hash), "test", __import__("time").time(), 60)
    version, payload, mac = good.split(".")
    _, evil = sessions.issue(key, "evil", 0.0, 10**12)
    tampered = f"{version}.{evil.split('.')[1]}.{mac}"
    for cookie, code in ((expired, "session_expired"), (other_key, "unauthorized"), (tampered, "unauthorized"), ("v1.x.y", "unauthorized"), ("a" * 5000, "unauthorized")):
        client.cookie = cookie
        status, answer = client.api("GET", "/v1/groups")
        assert status == 401 and answer["error"] == code, (cookie[:40], answer)
        assert client.request("GET", "/admin/connectors")[0] == 303


def test_hostile_names_are_escaped(relay, tmp_path):
    token = (relay.data_dir / "admin.token").read_text().strip()
    relay.cli(
        "connector", "register", "--service", relay.url, "--token", relay.token(), "--ca-sha256", relay.ca_sha256,
        "--state-dir", str(tmp_path / "hostile"), "--name", HOSTILE,
    )
    client = Client(relay)
    _, headers, _ = client.sign_in(token)
    client.cookie = _cookie_of(headers)
    for page in ("/admin/connectors", "/admin/connectors?q=" + urllib.parse.quote(HOSTILE), "/admin/log?q=" + urllib.parse.quote(HOSTILE)):
        status, _, body = client.request("GET", page)
        assert status == 200
        assert "<script>alert" not in body and "<img src=x" not in body
    status, _, body = client.request("GET", "/admin/connectors")
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in body


def test_failed_sign_ins_are_braked_per_address(relay):
    client = Client(relay)
    burst = AdminCenterSettings().sign_in.burst
    statuses = [client.sign_in(f"bha_guess{i}")[0] for i in range(burst + 1)]
    # The module's earlier tests spent some of this address's budget on their wrong token.
    assert 429 in statuses and set(statuses[: statuses.index(429)]) == {401} and statuses[-1] == 429
    token = (relay.data_dir / "admin.token").read_text().strip()
    # Braked: even the right token waits (the brake is per address, not per guess).
    status, headers, _ = client.sign_in(token)
    assert status == 429 and int(headers["Retry-After"]) > 0 and "Set-Cookie" not in headers
    assert "admin center sign-in refused" in relay.relay.log()
