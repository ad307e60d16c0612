"""Signing in to the admin center through OpenID Connect, against the test issuer (a real
HTTPS issuer, tests/e2e/oidc_issuer.py) and a real relay: only a user whose id_token
carries the admin claim gets a session (the relay has two workers: the flow and the
session hold on whichever answers); a flow started elsewhere, or answered with an
error, gets none."""

from __future__ import annotations

import http.client
import ssl
import urllib.parse

import pytest

from backhaul.center import sessions
from backhaul.center.oidc import FLOW_COOKIE

from .harness import System, running_relay
from .oidc_issuer import OidcIssuer
from .test_oidc_relay import oidc_flags

pytestmark = [pytest.mark.e2e, pytest.mark.codec_independent]


def _get(url: str, ctx: ssl.SSLContext, cookies: dict[str, str] | None = None):
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPSConnection(parts.hostname, parts.port, context=ctx, timeout=10)
    try:
        headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())} if cookies else {}
        conn.request("GET", parts.path + ("?" + parts.query if parts.query else ""), headers=headers)
        response = conn.getresponse()
        set_cookies = {}
        for name, value in response.getheaders():
            if name.lower() == "set-cookie":
                key, _, rest = value.partition("=")
                set_cookies[key] = rest.partition(";")[0]
        return response.status, response.getheader("Location"), set_cookies, response.read().decode()
    finally:
        conn.close()


def _sign_in(system, issuer, relay_ctx, issuer_ctx):
    """Walk the redirects a browser follows; the callback's answer."""
    status, location, cookies, _ = _get(f"{system.url}/admin/oidc/login", relay_ctx)
    assert status == 302 and location.startswith(issuer.url + "/authorize?") and FLOW_COOKIE in cookies
    status, back, _, _ = _get(location, issuer_ctx)
    assert status == 302 and back.startswith(f"https://127.0.0.1:{system.port}/.backhaul/oidc/callback?")
    return back, cookies


def test_only_users_with_the_admin_claim_sign_in(tmp_path):
    with OidcIssuer(tmp_path) as issuer, running_relay(
        tmp_path, workers=2, relay_args=(*oidc_flags(issuer), "--admin-oidc-claim", "groups=backhaul-admins")
    ) as system:
        relay_ctx = ssl.create_default_context(cafile=str(system.data_dir / "ca.pem"))
        issuer_ctx = ssl.create_default_context(cafile=str(issuer.ca_path))
        status, _, _, page = _get(f"{system.url}/admin/signin", relay_ctx)
        assert status == 200 and 'href="/admin/oidc/login"' in page

        # Signed in at the issuer, but not an admin: no session.
        back, flow = _sign_in(system, issuer, relay_ctx, issuer_ctx)
        status, _, cookies, page = _get(back, relay_ctx, flow)
        assert status == 403 and "groups=backhaul-admins" in page and sessions.COOKIE not in cookies

        # A callback without the flow cookie (started in another browser): refused.
        issuer.user["groups"] = ["staff", "backhaul-admins"]
        back, flow = _sign_in(system, issuer, relay_ctx, issuer_ctx)
        status, _, cookies, _ = _get(back, relay_ctx)
        assert status == 400 and sessions.COOKIE not in cookies
        # The issuer's error answer: refused.
        state = urllib.parse.parse_qs(urllib.parse.urlsplit(back).query)["state"][0]
        status, _, cookies, _ = _get(f"{system.url}/.backhaul/oidc/callback?error=access_denied&state={state}", relay_ctx, flow)
        assert status == 403 and sessions.COOKIE not in cookies

        # An admin: a session, which opens the pages and the API.
        back, flow = _sign_in(system, issuer, relay_ctx, issuer_ctx)
        status, _, cookies, page = _get(back, relay_ctx, flow)
        assert status == 200 and 'http-equiv="refresh"' in page and sessions.COOKIE in cookies
        session = {sessions.COOKIE: cookies[sessions.COOKIE]}
        status, _, _, page = _get(f"{system.url}/admin/", relay_ctx, session)
        assert status == 200 and issuer.user["email"] in page
        assert _get(f"{system.url}/v1/groups", relay_ctx, session)[0] == 200
        # The code is single-use: replaying the callback signs nobody in.
        status, _, cookies, _ = _get(back, relay_ctx, flow)
        assert status != 200 and sessions.COOKIE not in cookies
        assert "not an admin" in system.relay.log()


def test_the_admin_claim_needs_an_issuer(tmp_path):
    relay = System(tmp_path)
    relay.init()
    result = relay.cli("service", "run", "--data-dir", str(relay.data_dir), "--admin-oidc-claim", "groups=x", check=False)
    assert result.returncode != 0 and "--admin-oidc-claim needs --oidc-issuer" in result.stderr
