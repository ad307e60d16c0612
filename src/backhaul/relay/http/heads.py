"""What the HTTP edge makes of message heads: the host a request is for, the head the gate
sees, the gate's answer checked, the head sent to the backend and the one sent to the user.

Pure functions over the reader's :class:`Request`/:class:`Response` (no state of their
own): :mod:`backhaul.relay.http.exchange` decides when each is used, and what the
connection's close decision is; these only build and check bytes.
"""

from __future__ import annotations

from backhaul.relay.http import translate, writer
from backhaul.relay.http.reader import CHUNKED, LENGTH, NO_BODY, HttpError, Request, Response
from backhaul.relay.preauth.contract import IDENTITY_HEADER_PREFIX, Allow, RequestHead, Respond

_CONNECTION_CLOSE = (b"Connection", b"close")
_CONNECTION_KEEP_ALIVE = (b"Connection", b"keep-alive")
_CHUNKED = (b"Transfer-Encoding", b"chunked")


def authority(request: Request) -> bytes:
    """The Host a request is for; an absolute-form target's authority replaces Host (RFC 9112,
    3.2.2), for routing and for a --keep-host app's backend alike, so ``request`` is updated."""
    target = request.target
    host = request.host
    if not target.startswith(b"/"):
        if target[:8].lower().startswith((b"http://", b"https://")):
            host, request.target = translate.absolute_form(target)
            request.host = host
        elif not (target == b"*" and request.method == "OPTIONS"):
            raise HttpError(400, "the request-target must be a path")
    if host is None:
        raise HttpError(400, "the request names no host")
    return host


def gate_head(request: Request, host: str, scheme: str, client_ip: str, underscores: bool) -> RequestHead:
    """The request as the pre-authentication gate sees it: what the backend would get of it."""
    prefix = IDENTITY_HEADER_PREFIX
    headers = []
    for lower, (_, value) in zip(request.names, request.headers):
        key = lower.decode("latin-1")  # (names are tokens: ASCII, so lowering bytes or str is alike)
        if "_" in key and (not underscores or translate.reserved(key.replace("_", "-").encode("latin-1"))):
            continue  # what the backend will not get either
        if not key.startswith(prefix):
            headers.append((key, value.decode("latin-1")))
    return RequestHead(
        method=request.method,
        target=request.target.decode("latin-1"),
        headers=tuple(headers),
        scheme=scheme,
        host=host,
        client=client_ip,
    )


def identity_headers(decision: Allow) -> tuple[tuple[bytes, bytes], ...]:
    """The headers an Allow adds to the request, checked; raises UnicodeError or writer.UnsafeHeader."""
    extra = []
    for name, value in decision.headers:
        raw_name, raw_value = name.encode("ascii"), value.encode("utf-8")
        if not name.lower().startswith(IDENTITY_HEADER_PREFIX):
            raise writer.UnsafeHeader(f"identity header {name!r} lacks the prefix {IDENTITY_HEADER_PREFIX!r}")
        writer.check_header(raw_name, raw_value)
        extra.append((raw_name, raw_value))
    return tuple(extra)


def respond_headers(decision: Respond) -> list[tuple[bytes, bytes]]:
    """The headers of a gate's own answer, checked; raises UnicodeError or writer.UnsafeHeader."""
    headers = []
    for name, value in decision.headers:
        raw_name, raw_value = name.encode("ascii"), value.encode("utf-8")
        writer.check_header(raw_name, raw_value)
        headers.append((raw_name, raw_value))
    return headers


def backend_request(
    route: translate.Route,
    request: Request,
    client_ip: str,
    scheme: str,
    request_id: str,
    extra: tuple,
    underscores: bool,
    dropped: list[bytes],
) -> bytes:
    """The request head as the backend gets it (header names dropped for their "_" land in ``dropped``)."""
    headers = translate.request_headers(
        route,
        request,
        client_ip=client_ip,
        scheme=scheme,
        request_id=request_id,
        extra=extra,
        underscores=underscores,
        dropped=dropped,
    )
    if request.framing == LENGTH:
        headers.append((b"Content-Length", str(request.length).encode("ascii")))
    elif request.framing == CHUNKED:
        headers.append(_CHUNKED)
    return writer.request_head(request.method, translate.request_target(route, request.target), headers)


def interim_response(route: translate.Route, response: Response, external_base: bytes, external_host: bytes) -> bytes:
    """A 1xx head (not 101) as the user gets it."""
    headers = translate.response_headers(route, response, external_base=external_base, external_host=external_host)
    return writer.response_head(response.status, response.reason, headers)


def user_response(
    route: translate.Route,
    response: Response,
    external_base: bytes,
    external_host: bytes,
    http11: bool,
    close: bool,
) -> tuple[bytes, bool, bool]:
    """The final head as the user gets it: (head, close, rechunk).

    A body the backend delimits otherwise than by Content-Length reaches an HTTP/1.1 user
    chunked (``rechunk``), an HTTP/1.0 user delimited by the close (so ``close`` may turn
    True); ``close`` is then said in the head, and an HTTP/1.0 user kept alive is told so.
    """
    headers = translate.response_headers(
        route,
        response,
        external_base=external_base,
        external_host=external_host,
        keep_length=response.framing == NO_BODY,
    )
    rechunk = False
    if response.framing == LENGTH:
        headers.append((b"Content-Length", str(response.length).encode("ascii")))
    elif response.framing != NO_BODY:
        if http11:
            rechunk = True
            headers.append(_CHUNKED)
        else:
            close = True
    if response.status != 101:
        if close:
            headers.append(_CONNECTION_CLOSE)
        elif not http11:
            headers.append(_CONNECTION_KEEP_ALIVE)
    return writer.response_head(response.status, response.reason, headers), close, rechunk
