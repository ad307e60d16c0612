"""Header translation between the external and internal view of an HTTP app, and the edge's writer."""

from __future__ import annotations

import pytest

from backhaul.relay.http import translate as translate
from backhaul.relay.http import writer as writer
from backhaul.relay.http.reader import HttpError, Request, Response
from backhaul.store import App

# (not codec_independent: the HTTP readers have two builds, and the suite
# runs this file against each)


def route(internal_url: str = "http://10.0.0.5:8080", keep_host: bool = False) -> translate.Route:
    app = App("web", "default", "http", None, "x:1", "app.example.com", internal_url, "passthrough", keep_host=keep_host)
    return translate.Route(app)


def _tokens(message):
    """Set the Connection tokens as the readers do."""
    message.connection = frozenset(
        token.strip().lower() for name, value in message.headers if name.lower() == b"connection" for token in value.split(b",")
    )
    return message


def request(headers, method="GET", upgrade=False, host=b"app.example.com") -> Request:
    req = Request(method, b"/", "1.1", list(headers))
    req.host = host
    req.upgrade = upgrade
    return _tokens(req)


def forwarded(r, req, **kw):
    return translate.request_headers(r, req, client_ip="198.51.100.7", scheme="https", request_id="abc.1", **kw)


def test_route_takes_the_internal_url_apart():
    r = route("http://10.0.0.5:8080/intranet/")
    assert (r.host, r.authority, r.prefix) == (b"10.0.0.5", b"10.0.0.5:8080", b"/intranet")
    assert r.bases == (b"http://10.0.0.5:8080",)
    r = route("https://Wiki.Corp")
    assert (r.authority, r.prefix) == (b"wiki.corp", b"")
    assert r.bases == (b"https://wiki.corp", b"https://wiki.corp:443")
    assert route("http://[fd00::5]:81/").authority == b"[fd00::5]:81"


def test_request_headers_rewrite_host_and_add_forwarding():
    req = request([(b"Host", b"app.example.com"), (b"Accept", b"text/html"), (b"X-Forwarded-For", b"203.0.113.1")])
    out = forwarded(route(), req)
    assert out == [
        (b"Host", b"10.0.0.5:8080"),
        (b"Accept", b"text/html"),
        (b"X-Forwarded-For", b"203.0.113.1, 198.51.100.7"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Host", b"app.example.com"),
        (b"X-Request-Id", b"abc.1"),
    ]


def test_keep_host_passes_the_external_host():
    out = forwarded(route(keep_host=True), request([(b"Host", b"app.example.com:8443")], host=b"app.example.com:8443"))
    assert (b"Host", b"app.example.com:8443") in out


def test_client_cannot_set_what_the_edge_sets():
    req = request(
        [
            (b"Host", b"app.example.com"),
            (b"X-Backhaul-User", b"admin"),
            (b"x-backhaul-groups", b"root"),
            (b"X-Forwarded-Proto", b"http"),
            (b"X-Forwarded-Host", b"evil"),
            (b"X-Request-Id", b"forged"),
        ]
    )
    out = forwarded(route(), req, extra=((b"x-backhaul-user", b"alice@corp"),))
    names = [name.lower() for name, _ in out]
    assert names.count(b"x-forwarded-proto") == names.count(b"x-forwarded-host") == names.count(b"x-request-id") == 1
    assert [v for n, v in out if n.lower().startswith(b"x-backhaul-")] == [b"alice@corp"]
    assert (b"X-Request-Id", b"abc.1") in out


FORGED = [
    (b"X_Backhaul_User", b"mallory"),
    (b"X-Backhaul_User", b"mallory"),
    (b"x_backhaul-email", b"mallory@evil"),
    (b"X_Forwarded_For", b"10.0.0.1"),
    (b"X_Forwarded_Proto", b"https"),
    (b"X_Forwarded-Host", b"intranet"),
    (b"X_Forwarded_Anything", b"1"),
    (b"X_Request_Id", b"forged"),
    (b"Content_Length", b"0"),
    (b"Transfer_Encoding", b"chunked"),
]


@pytest.mark.parametrize("underscores", [False, True])
def test_identity_and_edge_headers_cannot_be_forged_with_underscores(underscores):
    # CGI and WSGI servers read "_" as "-": X_Backhaul_User would arrive as HTTP_X_BACKHAUL_USER.
    req = request([(b"Host", b"app.example.com"), *FORGED, (b"Accept", b"*/*")])
    dropped: list[bytes] = []
    out = forwarded(route(), req, extra=((b"x-backhaul-user", b"alice@corp"),), underscores=underscores, dropped=dropped)
    folded = [name.lower().replace(b"_", b"-") for name, _ in out]
    assert folded.count(b"x-backhaul-user") == 1 and (b"x-backhaul-user", b"alice@corp") in out
    assert b"mallory" not in b"".join(value for _, value in out)
    assert [name for name, _ in out if b"_" in name] == []
    assert folded.count(b"x-forwarded-for") == folded.count(b"x-request-id") == 1
    assert (b"X-Forwarded-For", b"198.51.100.7") in out
    assert b"content-length" not in folded and b"transfer-encoding" not in folded
    assert dropped == [name for name, _ in FORGED]
    assert (b"Accept", b"*/*") in out


def test_other_underscore_headers_are_dropped_unless_the_switch_keeps_them():
    req = request([(b"Host", b"a"), (b"X_Custom_Token", b"t"), (b"Connection", b"X_Hop"), (b"X_Hop", b"1")])
    dropped: list[bytes] = []
    assert (b"X_Custom_Token", b"t") not in forwarded(route(), req, dropped=dropped)
    assert dropped == [b"X_Custom_Token"]  # X_Hop went as hop-by-hop
    kept = forwarded(route(), req, underscores=True)
    assert (b"X_Custom_Token", b"t") in kept
    assert (b"X_Hop", b"1") not in kept  # named in Connection: hop-by-hop, whatever its spelling


@pytest.mark.parametrize(
    "name, reserved",
    [
        (b"x-backhaul-user", True), (b"x-backhaul-anything", True), (b"x-forwarded-for", True),
        (b"x-forwarded-port", True), (b"x-request-id", True), (b"host", True), (b"content-length", True),
        (b"transfer-encoding", True), (b"connection", True), (b"x-custom", False), (b"x-backhaul", False),
        (b"accept", False), (b"x-real-ip", False),
    ],
)
def test_reserved_names(name, reserved):
    assert translate.reserved(name) is reserved


def test_absolute_form_request_on_a_keep_host_app_gets_the_uris_authority_as_host():
    # The edge routes by the URI's authority and puts it in request.host (RFC 9112 3.2.2).
    req = request([(b"Host", b"unrelated.example"), (b"Accept", b"*/*")], host=b"kept.example.com:8080")
    out = forwarded(route(keep_host=True), req)
    assert [v for n, v in out if n.lower() == b"host"] == [b"kept.example.com:8080"]
    assert out[0] == (b"Host", b"kept.example.com:8080")
    assert (b"X-Forwarded-Host", b"kept.example.com:8080") in out
    # Not keeping the host: the internal URL's, as always; one Host either way.
    out = forwarded(route(), req)
    assert [v for n, v in out if n.lower() == b"host"] == [b"10.0.0.5:8080"]


def test_http10_request_without_host_gets_one():
    req = Request("GET", b"/", "1.0", [(b"Accept", b"*/*")])
    assert forwarded(route(), req)[0] == (b"Host", b"10.0.0.5:8080")


@pytest.mark.parametrize(
    "target, authority, rest",
    [
        (b"http://app.test/x?y=1", b"app.test", b"/x?y=1"),
        (b"https://app.test:8443", b"app.test:8443", b"/"),
        (b"HTTP://App.Test?q=/x", b"App.Test", b"/?q=/x"),
        (b"http://[fd00::1]:81/a", b"[fd00::1]:81", b"/a"),
        (b"http://user@app.test/", b"user@app.test", b"/"),  # split_host refuses it afterwards
    ],
)
def test_absolute_form(target, authority, rest):
    assert translate.absolute_form(target) == (authority, rest)


@pytest.mark.parametrize("target", [b"http:///x", b"http://", b"http://?x", b"https:///"])
def test_absolute_form_without_a_host_is_400(target):
    with pytest.raises(HttpError) as info:
        translate.absolute_form(target)
    assert info.value.status == 400


def test_hop_by_hop_and_connection_listed_headers_are_dropped():
    req = request(
        [
            (b"Host", b"app.example.com"),
            (b"Connection", b"keep-alive, X-Secret"),
            (b"Keep-Alive", b"timeout=5"),
            (b"X-Secret", b"1"),
            (b"TE", b"trailers"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Content-Length", b"5"),
            (b"Proxy-Connection", b"keep-alive"),
            (b"Upgrade", b"websocket"),
            (b"Cookie", b"a=b"),
        ]
    )
    names = {name.lower() for name, _ in forwarded(route(), req)}
    assert names.isdisjoint({b"connection", b"keep-alive", b"x-secret", b"te", b"transfer-encoding", b"content-length", b"proxy-connection", b"upgrade"})
    assert b"cookie" in names


@pytest.mark.parametrize(
    "value, expected",
    [
        (b"backhaul_session=abc.def", None),
        (b"theme=dark; backhaul_session=abc; lang=en", b"theme=dark; lang=en"),
        (b"backhaul_login_XYZ=1;backhaul_session=2", None),
        (b"theme=backhaul_session", b"theme=backhaul_session"),
        (b"a=1; b=2", b"a=1; b=2"),
    ],
)
def test_the_relays_own_cookies_never_reach_the_backend(value, expected):
    req = request([(b"Host", b"app.example.com"), (b"Cookie", value)])
    cookies = [v for name, v in forwarded(route(), req) if name.lower() == b"cookie"]
    assert cookies == ([] if expected is None else [expected])


def test_upgrade_request_keeps_its_upgrade():
    req = request([(b"Host", b"a"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"), (b"Sec-WebSocket-Key", b"k")], upgrade=True)
    out = forwarded(route(), req)
    assert out[-2:] == [(b"Connection", b"upgrade"), (b"Upgrade", b"websocket")]
    assert (b"Sec-WebSocket-Key", b"k") in out


def test_request_target_goes_under_the_internal_path():
    assert translate.request_target(route("http://h/app/"), b"/x?y=1") == b"/app/x?y=1"
    assert translate.request_target(route("http://h/"), b"/x") == b"/x"
    assert translate.request_target(route("http://h/app"), b"*") == b"*"


@pytest.mark.parametrize(
    "internal, value, expected",
    [
        ("http://10.0.0.5:8080", b"http://10.0.0.5:8080/login?next=/", b"https://app.example.com/login?next=/"),
        ("http://10.0.0.5:8080", b"HTTP://10.0.0.5:8080", b"https://app.example.com/"),
        ("http://10.0.0.5:8080", b"http://10.0.0.5:80801/x", b"http://10.0.0.5:80801/x"),
        ("http://10.0.0.5:8080", b"http://elsewhere/x", b"http://elsewhere/x"),
        ("http://10.0.0.5:8080", b"/relative", b"/relative"),
        ("http://wiki", b"http://wiki:80/page", b"https://app.example.com/page"),
        ("http://wiki", b"http://wiki/page", b"https://app.example.com/page"),
        ("http://wiki/app/", b"http://wiki/app/page", b"https://app.example.com/page"),
        ("http://wiki/app/", b"http://wiki/app", b"https://app.example.com/"),
        ("http://wiki/app/", b"http://wiki/other/page", b"http://wiki/other/page"),
        ("http://wiki/app/", b"http://wiki/application", b"http://wiki/application"),
        ("http://wiki/app/", b"/app/page", b"/page"),
        ("http://wiki/app/", b"/other", b"/other"),
    ],
)
def test_location_rewrite(internal, value, expected):
    assert translate.rewrite_url(route(internal), value, b"https://app.example.com") == expected


@pytest.mark.parametrize(
    "value, expected",
    [
        (b"sid=1; Domain=10.0.0.5; Path=/", b"sid=1; Domain=app.example.com; Path=/"),
        (b"sid=1; domain=.10.0.0.5", b"sid=1; Domain=app.example.com"),
        (b"sid=1; Domain=other.corp", b"sid=1; Domain=other.corp"),
        (b"sid=1; Path=/", b"sid=1; Path=/"),
        (b"sid=1", b"sid=1"),
    ],
)
def test_cookie_domain_rewrite(value, expected):
    assert translate.rewrite_cookie(route(), value, b"app.example.com") == expected


def test_cookie_path_under_the_internal_path():
    r = route("http://wiki/app/")
    assert translate.rewrite_cookie(r, b"s=1; Domain=wiki; Path=/app/x", b"ext") == b"s=1; Domain=ext; Path=/x"
    assert translate.rewrite_cookie(r, b"s=1; Path=/elsewhere", b"ext") == b"s=1; Path=/elsewhere"


def test_response_headers():
    response = _tokens(Response(
        302,
        b"Found",
        "1.1",
        [
            (b"Location", b"http://10.0.0.5:8080/next"),
            (b"Content-Location", b"http://10.0.0.5:8080/here"),
            (b"Set-Cookie", b"a=1; Domain=10.0.0.5"),
            (b"Connection", b"close, X-Hop"),
            (b"X-Hop", b"1"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Content-Length", b"0"),
            (b"Cache-Control", b"no-cache"),
        ],
    ))
    out = translate.response_headers(route(), response, external_base=b"https://app.example.com", external_host=b"app.example.com")
    assert out == [
        (b"Location", b"https://app.example.com/next"),
        (b"Content-Location", b"https://app.example.com/here"),
        (b"Set-Cookie", b"a=1; Domain=app.example.com"),
        (b"Cache-Control", b"no-cache"),
    ]
    kept = translate.response_headers(route(), response, external_base=b"x", external_host=b"x", keep_length=True)
    assert (b"Content-Length", b"0") in kept


def test_switching_protocols_keeps_its_upgrade():
    response = _tokens(Response(101, b"Switching Protocols", "1.1", [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"), (b"Sec-WebSocket-Accept", b"x")]))
    out = translate.response_headers(route(), response, external_base=b"x", external_host=b"x")
    assert out == [(b"Sec-WebSocket-Accept", b"x"), (b"Connection", b"upgrade"), (b"Upgrade", b"websocket")]


@pytest.mark.parametrize(
    "value, host",
    [(b"App.Example.com", "app.example.com"), (b"app.example.com:8080", "app.example.com"), (b"[::1]:80", "::1"), (b"a.", "a")],
)
def test_split_host(value, host):
    assert translate.split_host(value) == host


@pytest.mark.parametrize("value", [b"", b"a b", b"a:port", b"a:123456", b"user@a", b"a/b", b"[::1", b"a:80:80"])
def test_split_host_refuses_garbage(value):
    with pytest.raises(HttpError):
        translate.split_host(value)


def test_writer():
    assert writer.chunk(b"hello") == b"5\r\nhello\r\n"
    assert writer.request_head("GET", b"/x", [(b"Host", b"h")]) == b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n"
    page = writer.local_response(502, "no connector", "abc.1", close=True)
    head, body = page.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"X-Request-Id: abc.1" in head and b"Connection: close" in head
    assert b"Content-Length: %d" % len(body) in head
    assert b"abc.1" in body and b"no connector" in body
    assert writer.local_response(404, "x", "i", close=False, head_only=True).endswith(b"\r\n\r\n")
    writer.check_header(b"x-backhaul-user", "José".encode())
    for name, value in [(b"x-a", b"a\r\nb"), (b"x-a", b"a\nb"), (b"x-a", b"a\x00"), (b"x a", b"v"), (b"x:a", b"v")]:
        with pytest.raises(writer.UnsafeHeader):
            writer.check_header(name, value)
