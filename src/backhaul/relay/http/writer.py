"""Serialising HTTP/1.1 for the edge: request and response heads, chunk framing, the edge's own answers.

Every head the edge writes is HTTP/1.1. Header names and values are bytes; values that
did not come out of llhttp (the gate's headers, the edge's own) are checked for
characters that would split a header line before they are written.
"""

from __future__ import annotations

import http
import re
from typing import Iterable

LAST_CHUNK = b"0\r\n\r\n"

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_UNSAFE_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class UnsafeHeader(ValueError):
    """A header name that is not a token, or a value with CR, LF or another control character."""


def check_header(name: bytes, value: bytes) -> None:
    """Raise UnsafeHeader unless ``name: value`` is one well-formed header line."""
    if not _TOKEN.match(name):
        raise UnsafeHeader(f"header name {name!r} is not a token")
    if _UNSAFE_VALUE.search(value):
        raise UnsafeHeader(f"the value of header {name.decode('latin-1')!r} holds a control character")


def chunk(data) -> bytes:
    """One chunk of a chunked body (``data`` must not be empty: that is the last chunk)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def _lines(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    # (joins, not % per header: a head is written for every request and every response)
    lines = b"\r\n".join([b": ".join(header) for header in headers])
    return lines + b"\r\n\r\n" if lines else b"\r\n"


def request_head(method: str, target: bytes, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    return b"%s %s HTTP/1.1\r\n%b" % (method.encode("ascii"), target, _lines(headers))


def response_head(status: int, reason: bytes, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    return b"HTTP/1.1 %d %s\r\n%b" % (status, reason, _lines(headers))


def reason_phrase(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def local_response(
    status: int,
    message: str,
    request_id: str,
    *,
    close: bool,
    headers: Iterable[tuple[bytes, bytes]] = (),
    body: bytes | None = None,
    head_only: bool = False,
) -> bytes:
    """An answer made by the edge itself: a short text page saying what happened and the request id.

    With ``body`` given (a gate's own answer) that body is sent instead of the page.
    """
    phrase = reason_phrase(status)
    if body is None:
        body = f"{status} {phrase.decode()}\n{message}\nrequest id: {request_id}\n".encode()
        all_headers = [(b"Content-Type", b"text/plain; charset=utf-8"), (b"Cache-Control", b"no-store")]
    else:
        all_headers = []
    all_headers += headers
    all_headers.append((b"Content-Length", str(len(body)).encode()))
    all_headers.append((b"X-Request-Id", request_id.encode()))
    if close:
        all_headers.append((b"Connection", b"close"))
    head = response_head(status, phrase, all_headers)
    return head if head_only else head + body
