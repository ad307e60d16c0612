"""The OIDC gate driven directly against a real test issuer over HTTPS on 127.0.0.1.

Browser logins follow the gate's redirect to the issuer with a real HTTP client and
bring the issuer's redirect back to the gate; bearer tokens are minted by the issuer.
Only time is faked (an injected clock), to walk past expiries and rate limits.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import http.cookies
import json
import os
import secrets
import ssl
import stat
import time
from urllib.parse import parse_qs, urlsplit

import aiohttp
import jwt
import pytest

from backhaul.config import OidcSettings
from backhaul.relay.preauth.oidc import (
    CALLBACK_PATH,
    JWKS_PATH,
    LOGOUT_PATH,
    OidcGate,
    safe_back_to,
)
from backhaul.relay.preauth.contract import Allow, RequestHead, Respond
from backhaul.store.base import App

from .oidc_issuer import OidcIssuer, SigningKey

pytestmark = pytest.mark.codec_independent

HOST = "app.example.test"
PORT = 8443
APP = App(name="web", group="default", proto="http", external_host=HOST, internal_url="http://127.0.0.1:9/", preauth="oidc")
HTML = (("accept", "text/html,application/xhtml+xml"),)
CA_SHA256 = "ab" * 32


class Clock:
    """Wall time that a test moves forward by hand."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def issuer(tmp_path):
    with OidcIssuer(tmp_path) as issuer_:
        yield issuer_


@pytest.fixture
def data_dir(tmp_path):
    path = tmp_path / "relay"
    path.mkdir()
    (path / "service.json").write_text(json.dumps({"names": ["localhost"], "ca_sha256": CA_SHA256}))
    return path


def settings_for(issuer: OidcIssuer, **changes) -> OidcSettings:
    return OidcSettings(
        issuer=issuer.issuer, client_id=issuer.client_id, client_secret=issuer.client_secret, ca_file=str(issuer.ca_path), **changes
    )


def run_with_gate(data_dir, issuer, scenario, clock=None, **changes):
    """Run ``scenario(gate)`` on a fresh event loop with a gate for ``issuer``; the gate is closed after."""

    async def main():
        gate = OidcGate.create(data_dir, settings_for(issuer, **changes), clock=clock or time.time)
        try:
            return await scenario(gate)
        finally:
            await gate.close()

    return asyncio.run(main())


def head(target="/", *, method="GET", headers=(), scheme="https", host=HOST, port=PORT) -> RequestHead:
    return RequestHead(method, target, (("host", f"{host}:{port}"), *headers), scheme, host, "127.0.0.1")


def header(response: Respond, name: str) -> str | None:
    return next((v for k, v in response.headers if k == name), None)


def set_cookies(response: Respond) -> dict[str, http.cookies.Morsel]:
    jar = http.cookies.SimpleCookie()
    for name, value in response.headers:
        if name == "set-cookie":
            jar.load(value)
    return dict(jar)


def cookie_header(*morsels: http.cookies.Morsel) -> tuple[tuple[str, str], ...]:
    return (("cookie", "; ".join(f"{m.key}={m.value}" for m in morsels)),)


async def to_issuer(issuer: OidcIssuer, location: str) -> str:
    """Follow the gate's redirect to the issuer as a browser would; the issuer's redirect back."""
    ctx = ssl.create_default_context(cafile=str(issuer.ca_path))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session, session.get(location, allow_redirects=False) as resp:
        assert resp.status == 302, await resp.text()
        return resp.headers["Location"]


async def start_login(gate, issuer, target="/"):
    """The gate's login redirect for ``target``: (login cookie, callback target the issuer sends back)."""
    first = await gate.check(APP, head(target, headers=HTML))
    assert isinstance(first, Respond) and first.status == 302
    (login,) = set_cookies(first).values()
    back = urlsplit(await to_issuer(issuer, header(first, "location")))
    assert (back.scheme, back.netloc, back.path) == ("https", f"{HOST}:{PORT}", CALLBACK_PATH)
    return login, f"{back.path}?{back.query}"


async def login(gate, issuer, target="/"):
    """A whole browser login: (the callback's answer, the session cookie)."""
    login_cookie, callback = await start_login(gate, issuer, target)
    done = await gate.check(APP, head(callback, headers=cookie_header(login_cookie)))
    assert done.status == 302, done.body
    return done, set_cookies(done)["backhaul_session"]


async def fetch_relay_jwks(gate) -> jwt.PyJWKSet:
    answer = await gate.check(APP, head(JWKS_PATH))
    assert answer.status == 200 and header(answer, "content-type") == "application/json"
    return jwt.PyJWKSet.from_dict(json.loads(answer.body))


def verify_identity(jwks: jwt.PyJWKSet, token: str) -> dict:
    """What a backend does with x-backhaul-identity: check it against the relay's JWKS."""
    kid = jwt.get_unverified_header(token)["kid"]
    return jwt.decode(token, jwks[kid].key, algorithms=["ES256"], audience=HOST, issuer=f"urn:backhaul:relay:{CA_SHA256}")


# ---------------------------------------------------------------------- browser login


def test_browser_login_round_trip(data_dir, issuer):
    async def scenario(gate):
        first = await gate.check(APP, head("/reports?year=2024", headers=HTML))
        assert first.status == 302
        auth = urlsplit(header(first, "location"))
        params = {k: v[0] for k, v in parse_qs(auth.query).items()}
        assert f"{auth.scheme}://{auth.netloc}{auth.path}" == f"{issuer.url}/authorize"
        assert params["redirect_uri"] == f"https://{HOST}:{PORT}{CALLBACK_PATH}"
        assert params["code_challenge_method"] == "S256" and params["client_id"] == issuer.client_id
        assert params["response_type"] == "code" and "openid" in params["scope"].split()
        assert params["state"] and params["nonce"] and params["state"] != params["nonce"]
        (login_cookie,) = set_cookies(first).values()
        assert login_cookie.key == "backhaul_login_" + params["state"]
        assert login_cookie["httponly"] and login_cookie["secure"] and login_cookie["samesite"] == "Lax"
        assert login_cookie["path"] == "/.backhaul/oidc/"

        back = urlsplit(await to_issuer(issuer, header(first, "location")))
        done = await gate.check(APP, head(f"{back.path}?{back.query}", headers=cookie_header(login_cookie)))
        assert done.status == 302 and header(done, "location") == "/reports?year=2024"
        cookies = set_cookies(done)
        session = cookies["backhaul_session"]
        assert session["httponly"] and session["secure"] and session["samesite"] == "Lax" and session["path"] == "/"
        assert int(session["max-age"]) == 8 * 3600
        assert cookies[login_cookie.key]["max-age"] == "0", "the finished login's cookie is deleted"

        allowed = await gate.check(APP, head("/reports", headers=cookie_header(session)))
        assert isinstance(allowed, Allow) and allowed.user == "alice"
        headers = dict(allowed.headers)
        assert headers["x-backhaul-user"] == "alice"
        assert headers["x-backhaul-email"] == "alice@example.test"
        assert headers["x-backhaul-name"] == "Alice Example"
        claims = verify_identity(await fetch_relay_jwks(gate), headers["x-backhaul-identity"])
        assert claims["sub"] == "user-0001" and claims["email"] == "alice@example.test" and claims["idp"] == issuer.issuer
        assert 0 < claims["exp"] - time.time() <= 120

        # A second code exchange of the same answer is refused by the issuer (codes are single-use).
        again = await gate.check(APP, head(f"{back.path}?{back.query}", headers=cookie_header(login_cookie)))
        assert again.status == 502
        assert issuer.hits["/token"] == 2

    run_with_gate(data_dir, issuer, scenario)


def test_plain_http_cookies_are_not_secure_and_logout_clears_the_session(data_dir, issuer):
    async def scenario(gate):
        first = await gate.check(APP, head("/", headers=HTML, scheme="http", port=8080))
        params = parse_qs(urlsplit(header(first, "location")).query)
        assert params["redirect_uri"] == [f"http://{HOST}:8080{CALLBACK_PATH}"]
        (login_cookie,) = set_cookies(first).values()
        assert not login_cookie["secure"]
        back = urlsplit(await to_issuer(issuer, header(first, "location")))
        done = await gate.check(APP, head(f"{back.path}?{back.query}", headers=cookie_header(login_cookie), scheme="http", port=8080))
        session = set_cookies(done)["backhaul_session"]
        assert not session["secure"]

        out = await gate.check(APP, head(LOGOUT_PATH, headers=cookie_header(session)))
        assert out.status == 200
        cleared = set_cookies(out)["backhaul_session"]
        assert cleared.value == "" and cleared["max-age"] == "0" and cleared["path"] == "/"

    run_with_gate(data_dir, issuer, scenario)


def test_session_cookie_is_bound_to_its_host_expires_and_cannot_be_altered(data_dir, issuer):
    clock = Clock()

    async def scenario(gate):
        _, session = await login(gate, issuer)
        other = App(name="other", group="default", proto="http", external_host="other.example.test", internal_url="http://127.0.0.1:9/", preauth="oidc")
        elsewhere = await gate.check(other, head("/", host="other.example.test", headers=cookie_header(session)))
        assert elsewhere.status == 401, "a session for one app host opens no other"

        payload, signature = session.value.split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
        claims["sub"] = "someone-else"
        forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        session_forged = http.cookies.Morsel()
        session_forged.set("backhaul_session", f"{forged}.{signature}", "")
        assert (await gate.check(APP, head("/", headers=cookie_header(session_forged)))).status == 401

        clock.advance(8 * 3600 - 5)
        assert isinstance(await gate.check(APP, head("/", headers=cookie_header(session))), Allow)
        clock.advance(10)
        expired = await gate.check(APP, head("/", headers=cookie_header(session)))
        assert expired.status == 401
        assert (await gate.check(APP, head("/", headers=(*HTML, *cookie_header(session))))).status == 302

    run_with_gate(data_dir, issuer, scenario, clock=clock)


def test_callback_refuses_tampered_mixed_up_and_stale_logins(data_dir, issuer):
    clock = Clock()

    async def scenario(gate):
        cookie_a, callback_a = await start_login(gate, issuer)
        cookie_b, callback_b = await start_login(gate, issuer)
        query_a = parse_qs(urlsplit(callback_a).query)

        # The state in the answer was changed: no login of that state exists in this browser.
        tampered = f"{CALLBACK_PATH}?code={query_a['code'][0]}&state=AAAAAAAAAAAAAAAAAAAAAA"
        assert (await gate.check(APP, head(tampered, headers=cookie_header(cookie_a, cookie_b)))).status == 400
        # Login A's answer with only login B's cookie (a login started in another browser).
        assert (await gate.check(APP, head(callback_a, headers=cookie_header(cookie_b)))).status == 400
        # B's cookie renamed to A's state: the signed state inside does not match.
        renamed = http.cookies.Morsel()
        renamed.set(cookie_a.key, cookie_b.value, "")
        assert (await gate.check(APP, head(callback_a, headers=cookie_header(renamed)))).status == 400
        # A state that is not one the relay makes (header injection attempt).
        injected = f"{CALLBACK_PATH}?code=x&state=abc%0d%0aSet-Cookie:%20x=1"
        answer = await gate.check(APP, head(injected, headers=cookie_header(cookie_a)))
        assert answer.status == 400 and all("\n" not in v and "\r" not in v for _, v in answer.headers)
        # The login's signature is checked.
        forged = http.cookies.Morsel()
        forged.set(cookie_a.key, cookie_a.value[:-4] + ("AAAA" if not cookie_a.value.endswith("AAAA") else "BBBB"), "")
        assert (await gate.check(APP, head(callback_a, headers=cookie_header(forged)))).status == 400
        assert issuer.hits["/token"] == 0, "no code was exchanged for a refused callback"

        # Login B is still good; login A, left for longer than the login lifetime, is not.
        done = await gate.check(APP, head(callback_b, headers=cookie_header(cookie_b)))
        assert done.status == 302
        clock.advance(601)
        assert (await gate.check(APP, head(callback_a, headers=cookie_header(cookie_a)))).status == 400

    run_with_gate(data_dir, issuer, scenario, clock=clock)


@pytest.mark.parametrize(
    "changes, why",
    [
        ({"nonce": "not-the-login-nonce"}, "nonce"),
        ({"aud": "another-client"}, "audience"),
        ({"iss": "https://127.0.0.1:1"}, "issuer"),
        ({"key": SigningKey()}, "signature"),
        ({"lifetime": -3600}, "expired"),
    ],
)
def test_callback_refuses_an_id_token_that_does_not_verify(data_dir, issuer, changes, why):
    # A stranger's key signs under the issuer's key id.
    issuer.id_token_changes = {**changes, "kid": issuer.key.kid} if "key" in changes else changes

    async def scenario(gate):
        login_cookie, callback = await start_login(gate, issuer)
        answer = await gate.check(APP, head(callback, headers=cookie_header(login_cookie)))
        assert answer.status == 403, why
        assert "backhaul_session" not in set_cookies(answer)

    run_with_gate(data_dir, issuer, scenario)


def test_issuer_refusing_the_login_is_a_403(data_dir, issuer):
    issuer.deny = "access_denied"

    async def scenario(gate):
        login_cookie, callback = await start_login(gate, issuer)
        answer = await gate.check(APP, head(callback, headers=cookie_header(login_cookie)))
        assert answer.status == 403 and b"access_denied" in answer.body

    run_with_gate(data_dir, issuer, scenario)


@pytest.mark.parametrize(
    "target",
    ["//evil.example/path", "/\\evil.example/", "/\t/evil.example/", "https://evil.example/"],
)
def test_no_open_redirect_after_login(data_dir, issuer, target):
    async def scenario(gate):
        done, _ = await login(gate, issuer, target)
        assert header(done, "location") == "/"

    run_with_gate(data_dir, issuer, scenario)


def test_safe_back_to_keeps_same_host_paths_only():
    assert safe_back_to("/a/b?c=d&e=%2F%2Fx") == "/a/b?c=d&e=%2F%2Fx"
    for bad in ("//x", "/\\x", "http://x/", "x", "", "/" + "a" * 3000, "/a\nb", "/é"):
        assert safe_back_to(bad) == "/"


def test_unauthenticated_api_and_non_get_requests_get_401(data_dir, issuer):
    async def scenario(gate):
        api = await gate.check(APP, head("/api/items", headers=(("accept", "application/json"),)))
        assert api.status == 401 and header(api, "www-authenticate") == f'Bearer realm="{HOST}"'
        post = await gate.check(APP, head("/form", method="POST", headers=HTML))
        assert post.status == 401
        navigate = await gate.check(APP, head("/", headers=(("sec-fetch-mode", "navigate"),)))
        assert navigate.status == 302

    run_with_gate(data_dir, issuer, scenario)


# ---------------------------------------------------------------------- bearer tokens


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"), ("accept", "application/json"))


def _hs256_with_public_key(issuer: OidcIssuer) -> str:
    """The classic algorithm-confusion forgery: HS256 keyed with the issuer's public key."""
    from cryptography.hazmat.primitives import serialization

    pem = issuer.key.key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    enc = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()
    now = int(time.time())
    signing_input = enc({"alg": "HS256", "kid": issuer.key.kid}) + "." + enc(
        {"iss": issuer.issuer, "aud": issuer.client_id, "sub": "x", "iat": now, "exp": now + 60}
    )
    sig = base64.urlsafe_b64encode(hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()).rstrip(b"=").decode()
    return f"{signing_input}.{sig}"


def test_bearer_tokens(data_dir, issuer):
    async def scenario(gate):
        ok = await gate.check(APP, head("/api", headers=bearer(issuer.mint())))
        assert isinstance(ok, Allow) and ok.user == "alice"
        claims = verify_identity(await fetch_relay_jwks(gate), dict(ok.headers)["x-backhaul-identity"])
        assert claims["preferred_username"] == "alice"
        # Ten seconds past exp is inside the 30 s leeway.
        assert isinstance(await gate.check(APP, head("/api", headers=bearer(issuer.mint(lifetime=-10)))), Allow)

        refused = {
            "expired": issuer.mint(lifetime=-120),
            "signature": issuer.mint(key=SigningKey(), kid=issuer.key.kid),
            "client id": issuer.mint(aud="another-client"),
            "issuer": issuer.mint(iss="https://127.0.0.1:1"),
            "not valid yet": issuer.mint(nbf=int(time.time()) + 600),
            "'sub' claim": issuer.mint(sub=None),
            "does not publish": issuer.mint(key=SigningKey()),
            "algorithm 'none'": jwt.encode({"iss": issuer.issuer, "aud": issuer.client_id, "sub": "x"}, None, algorithm="none"),
            "algorithm 'HS256'": _hs256_with_public_key(issuer),
            "not a signed JWT": "not-a-jwt",
            "longer than": issuer.mint(name="x" * 9000),
        }
        for why, token in refused.items():
            answer = await gate.check(APP, head("/api", headers=bearer(token)))
            assert isinstance(answer, Respond) and answer.status == 401, why
            challenge = header(answer, "www-authenticate")
            assert 'error="invalid_token"' in challenge and why in challenge, (why, challenge)

    run_with_gate(data_dir, issuer, scenario)


def test_identity_headers_cannot_carry_control_characters(data_dir, issuer):
    issuer.user = {**issuer.user, "preferred_username": "eve\r\nx-backhaul-user: admin", "name": "Zoë 100%"}

    async def scenario(gate):
        ok = await gate.check(APP, head("/api", headers=bearer(issuer.mint())))
        headers = dict(ok.headers)
        assert headers["x-backhaul-user"] == "eve%0D%0Ax-backhaul-user: admin"
        assert headers["x-backhaul-name"] == "Zo%C3%AB 100%25"
        claims = verify_identity(await fetch_relay_jwks(gate), headers["x-backhaul-identity"])
        assert claims["name"] == "Zoë 100%", "the signed token carries the exact value"

    run_with_gate(data_dir, issuer, scenario)


def test_unverified_email_is_not_passed_on(data_dir, issuer):
    async def scenario(gate):
        ok = await gate.check(APP, head("/api", headers=bearer(issuer.mint(email_verified=False))))
        assert "x-backhaul-email" not in dict(ok.headers)

    run_with_gate(data_dir, issuer, scenario)


# ---------------------------------------------------------------------- issuer keys


def test_key_rotation_is_followed_and_unknown_keys_cannot_hammer_the_issuer(data_dir, issuer):
    clock = Clock()

    async def scenario(gate):
        old = issuer.key
        assert isinstance(await gate.check(APP, head("/", headers=bearer(issuer.mint()))), Allow)
        assert issuer.hits["/jwks"] == 1 and issuer.hits["/.well-known/openid-configuration"] == 1

        # A flood of tokens under made-up key ids costs the issuer one JWKS request per interval.
        clock.advance(31)
        for _ in range(40):
            answer = await gate.check(APP, head("/", headers=bearer(issuer.mint(kid=secrets.token_hex(8)))))
            assert answer.status == 401
        assert issuer.hits["/jwks"] == 2

        # The issuer rotates; within the interval the new key is not fetched yet ...
        issuer.rotate()
        new_token = issuer.mint()
        assert (await gate.check(APP, head("/", headers=bearer(new_token)))).status == 401
        assert issuer.hits["/jwks"] == 2
        # ... after it, the first token under the new key id fetches the new JWKS.
        clock.advance(31)
        assert isinstance(await gate.check(APP, head("/", headers=bearer(new_token))), Allow)
        assert issuer.hits["/jwks"] == 3
        retired = await gate.check(APP, head("/", headers=bearer(issuer.mint(key=old))))
        assert retired.status == 401, "a key the issuer no longer publishes signs nothing"

        # Concurrent tokens under one new key id share one fetch.
        issuer.rotate()
        clock.advance(31)
        answers = await asyncio.gather(*(gate.check(APP, head("/", headers=bearer(issuer.mint()))) for _ in range(10)))
        assert all(isinstance(a, Allow) for a in answers), answers
        assert issuer.hits["/jwks"] == 4

        # After the cache's lifetime, discovery and keys are fetched again.
        clock.advance(3600)
        later = issuer.mint(iat=int(clock.now), exp=int(clock.now) + 300)
        assert isinstance(await gate.check(APP, head("/", headers=bearer(later))), Allow)
        assert issuer.hits["/jwks"] == 5 and issuer.hits["/.well-known/openid-configuration"] == 2

    run_with_gate(data_dir, issuer, scenario, clock=clock)


def test_cached_keys_and_metadata_outlive_an_issuer_outage(data_dir, issuer):
    clock = Clock()

    async def scenario(gate):
        assert isinstance(await gate.check(APP, head("/", headers=bearer(issuer.mint()))), Allow)
        token = issuer.mint(lifetime=7200)
        issuer.stop()
        clock.advance(3601)
        assert isinstance(await gate.check(APP, head("/", headers=bearer(token))), Allow)
        login_redirect = await gate.check(APP, head("/", headers=HTML))
        assert login_redirect.status == 302

    run_with_gate(data_dir, issuer, scenario, clock=clock)


def test_unreachable_issuer_is_a_503(data_dir, issuer):
    issuer.stop()

    async def scenario(gate):
        assert (await gate.check(APP, head("/", headers=HTML))).status == 503
        assert (await gate.check(APP, head("/", headers=bearer(issuer.mint())))).status == 503
        assert (await gate.check(APP, head("/"))).status == 401

    run_with_gate(data_dir, issuer, scenario, http_timeout=2.0)


def test_issuer_answers_are_bounded(data_dir, issuer):
    # Forty key ids (one key under each, generating forty RSA keys would be slow).
    issuer.published = [SigningKey(issuer.key.key) for _ in range(40)]

    async def scenario(gate):
        assert isinstance(await gate.check(APP, head("/", headers=bearer(issuer.mint(key=issuer.published[0])))), Allow)
        assert len(gate.client._keys) == 8
        beyond = await gate.check(APP, head("/", headers=bearer(issuer.mint(key=issuer.published[20]))))
        assert beyond.status == 401

    run_with_gate(data_dir, issuer, scenario, max_keys=8)

    async def oversized(gate):
        assert (await gate.check(APP, head("/", headers=bearer(issuer.mint(key=issuer.published[0]))))).status == 503

    run_with_gate(data_dir, issuer, oversized, max_document=4096)


def test_signed_identity_tokens_are_reused_and_their_cache_is_bounded(data_dir, issuer):
    async def scenario(gate):
        first = await gate.check(APP, head("/", headers=bearer(issuer.mint())))
        again = await gate.check(APP, head("/", headers=bearer(issuer.mint())))
        assert dict(first.headers)["x-backhaul-identity"] == dict(again.headers)["x-backhaul-identity"]
        for n in range(50):
            await gate.check(APP, head("/", headers=bearer(issuer.mint(sub=f"user-{n}"))))
        assert gate.identity.cached == 16

    run_with_gate(data_dir, issuer, scenario, identity_cache=16)


# ---------------------------------------------------------------------- relay paths and workers


def test_reserved_paths_never_reach_the_app(data_dir, issuer):
    async def scenario(gate):
        _, session = await login(gate, issuer)
        unknown = await gate.check(APP, head("/.backhaul/admin", headers=cookie_header(session)))
        assert unknown.status == 404
        post = await gate.check(APP, head(JWKS_PATH, method="POST", headers=cookie_header(session)))
        assert post.status == 405
        keys = await fetch_relay_jwks(gate)
        assert [k.key_type for k in keys.keys] == ["EC"] and keys.keys[0].algorithm_name == "ES256"

    run_with_gate(data_dir, issuer, scenario)


def test_two_workers_share_logins_sessions_and_keys(data_dir, issuer):
    async def scenario(_):
        a = OidcGate.create(data_dir, settings_for(issuer))
        b = OidcGate.create(data_dir, settings_for(issuer))
        try:
            login_cookie, callback = await start_login(a, issuer)
            done = await b.check(APP, head(callback, headers=cookie_header(login_cookie)))
            assert done.status == 302, "a login started in one worker finishes in another"
            session = set_cookies(done)["backhaul_session"]
            assert isinstance(await a.check(APP, head("/", headers=cookie_header(session))), Allow)
            assert a.identity.jwks == b.identity.jwks
        finally:
            await a.close()
            await b.close()

    run_with_gate(data_dir, issuer, scenario)
    for name in ("identity.key", "session.key"):
        assert stat.S_IMODE(os.stat(data_dir / name).st_mode) == 0o600


def test_warm_up_fetches_discovery_and_keys_before_the_first_request(data_dir, issuer):
    async def scenario(gate):
        gate.warm_up()
        await gate._warm_up
        assert issuer.hits["/.well-known/openid-configuration"] == 1 and issuer.hits["/jwks"] == 1
        assert isinstance(await gate.check(APP, head("/", headers=bearer(issuer.mint()))), Allow)
        assert issuer.hits["/jwks"] == 1

    run_with_gate(data_dir, issuer, scenario)


def test_verified_bearer_tokens_are_cached_bounded_and_dropped_with_their_key(data_dir, issuer):
    clock = Clock()

    async def scenario(gate):
        tokens = [issuer.mint(sub=f"user-{n}") for n in range(12)]
        for token in tokens:
            assert isinstance(await gate.check(APP, head("/", headers=bearer(token))), Allow)
        assert gate.client.verified == 8, "the cache of verified tokens is bounded"
        # A cached token still expires.
        clock.advance(300 + 31)
        answer = await gate.check(APP, head("/", headers=bearer(tokens[-1])))
        assert answer.status == 401 and "expired" in header(answer, "www-authenticate")
        assert gate.client.verified == 7
        # A key that leaves the JWKS takes the tokens it signed out of the cache with it.
        clock.now = time.time()
        retiring = issuer.key
        token = issuer.mint()
        assert isinstance(await gate.check(APP, head("/", headers=bearer(token))), Allow)
        issuer.rotate()
        clock.advance(31)
        assert isinstance(await gate.check(APP, head("/", headers=bearer(issuer.mint(iat=int(clock.now), exp=int(clock.now) + 60)))), Allow)
        assert gate.client.verified == 1
        assert (await gate.check(APP, head("/", headers=bearer(token)))).status == 401
        assert retiring not in issuer.published

    run_with_gate(data_dir, issuer, scenario, clock=clock, verified_cache=8)
