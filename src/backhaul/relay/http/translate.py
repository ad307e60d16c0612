"""Header translation between the external and the internal view of an HTTP app.

What the application proxy does by default:

- requests: Host becomes the internal URL's host (unless the app keeps the external one:
  then the Host the user asked for, which for an absolute-form request is the URI's
  authority, RFC 9112 3.2.2), X-Forwarded-For gets the user's address appended,
  X-Forwarded-Proto and -Host say how the user reached the edge, X-Request-Id carries
  the edge's request id, the path is put under the internal URL's path; hop-by-hop
  headers and any header a client sends with the identity prefix are dropped, and so are
  names with "_" (CGI and WSGI servers read "_" as "-", so ``X_Backhaul_User`` would
  arrive as the identity header): all of them by default, as nginx does, or, with the
  edge's ``underscore_headers`` switch on, those that read as a header the edge sets;
- responses: Location and Content-Location pointing into the internal URL point into the
  external one, Set-Cookie Domain (and Path under the internal path) follow suit;
  hop-by-hop headers are dropped.

Framing headers (Content-Length, Transfer-Encoding, Connection) are the edge's to add.
"""

from __future__ import annotations

import re

import yarl

from backhaul.relay.http.reader import HttpError, Request, Response
from backhaul.relay.preauth.contract import IDENTITY_HEADER_PREFIX, RELAY_COOKIE_PREFIX

_IDENTITY = IDENTITY_HEADER_PREFIX.encode("ascii")
_RELAY_COOKIE = RELAY_COOKIE_PREFIX.encode("ascii")
#: Never forwarded in either direction: they describe one hop, or the edge sets them itself.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)
_SET_BY_EDGE = frozenset({b"x-forwarded-proto", b"x-forwarded-host", b"x-request-id"})
#: Names a client may not send in any spelling, "_" read as "-": the edge or the gate
#: sets them, or they frame the message (a backend folding Content_Length into
#: CONTENT_LENGTH would read the body differently from the edge).
_RESERVED = _HOP_BY_HOP | _SET_BY_EDGE | {b"host", b"x-forwarded-for"}
_RESERVED_PREFIXES = (_IDENTITY, b"x-forwarded-")
_HOST = re.compile(rb"^(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9._-]+))(?::([0-9]{1,5}))?$")


def split_host(value: bytes) -> str:
    """The host name of a Host header value (``name[:port]`` or ``[v6][:port]``), lower-cased."""
    match = _HOST.match(value)
    if match is None:
        raise HttpError(400, "malformed Host header")
    name = match.group(1) or match.group(2)
    return name.decode("ascii").lower().rstrip(".")


def reserved(folded: bytes) -> bool:
    """Whether a lower-cased header name, "_" already read as "-", is one clients may not send."""
    return folded in _RESERVED or folded.startswith(_RESERVED_PREFIXES)


def absolute_form(target: bytes) -> tuple[bytes, bytes]:
    """The authority and the origin-form target of an absolute-form request-target.

    ``target`` starts with ``http://`` or ``https://`` (any case); the authority is what
    comes before the first "/", "?" or "#" (HttpError 400 when it is empty), the target
    the rest, "/" put in front of it when it has no path.
    """
    start = target.index(b"//") + 2
    end = len(target)
    for stop in (b"/", b"?", b"#"):
        at = target.find(stop, start)
        if 0 <= at < end:
            end = at
    authority = target[start:end]
    if not authority:
        raise HttpError(400, "the absolute-form request-target names no host")
    rest = target[end:]
    return authority, rest if rest.startswith(b"/") else b"/" + rest


class Route:
    """An HTTP app as the edge routes to it, with its internal URL taken apart once."""

    __slots__ = ("app", "host", "authority", "prefix", "bases", "keep_host")

    def __init__(self, app) -> None:
        url = yarl.URL(app.internal_url)
        self.app = app
        host = url.host or ""
        self.host = host.lower().encode("ascii")
        shown = f"[{host}]" if ":" in host else host
        #: The Host header the backend gets.
        self.authority = (shown if url.is_default_port() else f"{shown}:{url.port}").encode("ascii")
        #: The internal URL's path without its trailing slash ("" for the root).
        self.prefix = url.raw_path.rstrip("/").encode("ascii")
        scheme = url.scheme.encode("ascii")
        bases = [scheme + b"://" + self.authority.lower()]
        if url.is_default_port():
            bases.append(b"%s://%s:%d" % (scheme, shown.lower().encode("ascii"), url.port))
        #: Lower-cased scheme://authority forms a backend may write its own URLs with.
        self.bases = tuple(bases)
        self.keep_host = bool(getattr(app, "keep_host", False))


def without_relay_cookies(value: bytes) -> bytes:
    """A Cookie header value without the relay's own cookies (b"" when nothing is left)."""
    kept = [crumb for crumb in (c.strip() for c in value.split(b";")) if crumb and not crumb.startswith(_RELAY_COOKIE)]
    return b"; ".join(kept)


def request_target(route: Route, target: bytes) -> bytes:
    """The request-target the backend gets: the path under the internal URL's path."""
    if target.startswith(b"/"):
        return route.prefix + target
    return target  # "*" of OPTIONS


def request_headers(
    route: Route,
    request: Request,
    *,
    client_ip: str,
    scheme: str,
    request_id: str,
    extra: tuple[tuple[bytes, bytes], ...] = (),
    underscores: bool = False,
    dropped: list[bytes] | None = None,
) -> list[tuple[bytes, bytes]]:
    """The headers the backend gets, without framing headers.

    ``underscores``: keep names with "_" unless they read as a reserved one; names dropped
    for their "_" are appended to ``dropped`` when it is given (for the edge's log).
    """
    tokens = request.connection
    # Host first, as clients send it: the user's (for absolute-form, the URI's authority,
    # which the edge put in request.host) when the app keeps it, else the internal URL's.
    host = request.host if route.keep_host and request.host is not None else route.authority
    out: list[tuple[bytes, bytes]] = [(b"Host", host)]
    forwarded_for: list[bytes] = []
    upgrade = None
    # (the reader lower-cased each name once: request.names)
    for lower, (name, value) in zip(request.names, request.headers):
        if lower == b"host":
            continue
        elif b"_" in lower:
            if lower in tokens:
                continue  # hop-by-hop, whatever its name
            if underscores and not reserved(lower.replace(b"_", b"-")):
                out.append((name, value))
            elif dropped is not None:
                dropped.append(name)
        elif lower == b"x-forwarded-for":
            forwarded_for.append(value)
        elif lower == b"upgrade":
            upgrade = value
        elif lower == b"cookie" and _RELAY_COOKIE in value:
            value = without_relay_cookies(value)
            if value:
                out.append((name, value))
        elif lower in _HOP_BY_HOP or lower in _SET_BY_EDGE or lower in tokens or lower.startswith(_IDENTITY):
            continue
        else:
            out.append((name, value))
    forwarded_for.append(client_ip.encode("ascii"))
    out.append((b"X-Forwarded-For", b", ".join(forwarded_for)))
    out.append((b"X-Forwarded-Proto", scheme.encode("ascii")))
    if request.host is not None:
        out.append((b"X-Forwarded-Host", request.host))
    out.append((b"X-Request-Id", request_id.encode("ascii")))
    out.extend(extra)
    if request.upgrade and upgrade is not None:
        out.append((b"Connection", b"upgrade"))
        out.append((b"Upgrade", upgrade))
    return out


def _strip_prefix(route: Route, path: bytes) -> bytes | None:
    """``path`` without the internal URL's path, or None when it is outside of it."""
    prefix = route.prefix
    if not prefix:
        return path
    if path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] in b"/?#"):
        rest = path[len(prefix):]
        return rest if rest.startswith(b"/") else b"/" + rest
    return None


def rewrite_url(route: Route, value: bytes, external_base: bytes) -> bytes:
    """A URL from the backend, pointed at the external URL when it points into the internal one."""
    lower = value.lower()
    for base in route.bases:
        if lower.startswith(base):
            rest = value[len(base):]
            if rest and rest[0] not in b"/?#":
                continue  # a longer host or port that merely starts the same
            path = _strip_prefix(route, rest or b"/")
            return value if path is None else external_base + path
    if route.prefix and value.startswith(b"/") and not value.startswith(b"//"):
        path = _strip_prefix(route, value)
        return value if path is None else path
    return value


def rewrite_cookie(route: Route, value: bytes, external_host: bytes) -> bytes:
    """A Set-Cookie value with Domain (and Path) translated from the internal URL to the external one."""
    parts = value.split(b";")
    changed = False
    for index in range(1, len(parts)):
        name, sep, attr = parts[index].partition(b"=")
        key = name.strip().lower()
        if key == b"domain" and attr.strip().lstrip(b".").lower() == route.host:
            parts[index] = b" Domain=" + external_host
            changed = True
        elif key == b"path" and route.prefix:
            path = _strip_prefix(route, attr.strip())
            if path is not None:
                parts[index] = b" Path=" + path
                changed = True
    return b";".join(parts) if changed else value


def response_headers(
    route: Route,
    response: Response,
    *,
    external_base: bytes,
    external_host: bytes,
    keep_length: bool = False,
) -> list[tuple[bytes, bytes]]:
    """The headers the user gets, without framing headers (``keep_length``: keep Content-Length,
    for a bodiless answer such as a response to HEAD, where it describes the would-be body)."""
    tokens = response.connection
    out: list[tuple[bytes, bytes]] = []
    upgrade = None
    for lower, (name, value) in zip(response.names, response.headers):
        if lower == b"location" or lower == b"content-location":
            out.append((name, rewrite_url(route, value, external_base)))
        elif lower == b"set-cookie":
            out.append((name, rewrite_cookie(route, value, external_host)))
        elif lower == b"content-length" and keep_length:
            out.append((name, value))
        elif lower == b"upgrade":
            upgrade = value
        elif lower == b"cookie" and _RELAY_COOKIE in value:
            value = without_relay_cookies(value)
            if value:
                out.append((name, value))
        elif lower in _HOP_BY_HOP or lower in tokens:
            continue
        else:
            out.append((name, value))
    if response.status == 101 and upgrade is not None:
        out.append((b"Connection", b"upgrade"))
        out.append((b"Upgrade", upgrade))
    return out
