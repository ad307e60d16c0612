"""Sans-I/O readers of HTTP/1.1 messages over httptools (llhttp): user requests, backend responses.

One source, two builds: run as plain Python this module is the pure twin; Cython compiles
the very same file (ext/backhaul/relay/http/_reader_c.py is a symlink to it) with the
types of ext/backhaul/relay/http/_reader_c.pxd, which makes the readers and the heads
cdef classes. ``backhaul.relay.http.reader`` picks one (BACKHAUL_PURE, BACKHAUL_REQUIRE_EXT).

A reader is fed bytes and appends events to its ``events`` deque:

- ``(HEAD, Request | Response)`` once a head is complete and passed every check;
- ``(BODY, bytes)`` body bytes, already de-chunked;
- ``(END, None)`` the message is complete (trailers are counted against the limits and dropped);
- ``(UPGRADE, bytes)`` the head asked to switch protocols; the bytes that followed it.

llhttp is strict by default and stays so here: both Content-Length and Transfer-Encoding,
duplicate Content-Length, obs-fold, bare CR or LF, control characters in header values
are all parse errors. On top of it the readers enforce the edge's own rules (one Host,
only the ``chunked`` transfer coding, HTTP/1.0 or 1.1, no CONNECT, no body on an Upgrade
request) and the size limits of :class:`backhaul.config.HttpLimits`. Every refusal is an
:class:`~backhaul.relay.http.errors.HttpError` carrying the status to answer with; after
it, or after an upgrade, a reader takes no more input.

Each header name is lower-cased once, as httptools hands the header over, and looked at
then (Host, framing, Expect, Connection); the head keeps the lower-cased names beside the
headers (``names``) so that the header translation never lowers them again. A refusal a
header earns is kept and raised when the head is complete, in the order the checks had
when they ran over the finished head (version, method, then the headers in order).
"""

from __future__ import annotations

import collections

import httptools
from httptools.parser.errors import HttpParserCallbackError, HttpParserError, HttpParserUpgrade

from backhaul.relay.http.errors import HttpError

#: Event kinds.
HEAD, BODY, END, UPGRADE = 0, 1, 2, 3

#: How a body is delimited.
NO_BODY, LENGTH, CHUNKED, UNTIL_CLOSE = 0, 1, 2, 3

#: Slack above the precise head limits for bytes httptools may hold while a head is
#: incomplete (it accumulates one header line before handing it over).
_HEAD_SLACK = 16 * 1024

_EMPTY: frozenset = frozenset()

#: The header names a reader looks at as they come (the others are only kept): a set
#: lookup spares most headers a method call in the pure twin.
_NOTED = frozenset({b"host", b"content-length", b"transfer-encoding", b"expect", b"connection"})


class Request:
    """A request head as the user sent it. Header names and values are the raw bytes;
    ``names`` are the header names lower-cased, in the same order."""

    __slots__ = (
        "method", "target", "version", "headers", "names", "host", "keep_alive", "framing", "length", "upgrade",
        "expect_continue", "connection",
    )

    def __init__(self, method: str, target: bytes, version: str, headers: list, names: list | None = None) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.names = names if names is not None else [name.lower() for name, _ in headers]
        self.host = None  # bytes, or None when the request has no Host header
        self.keep_alive = True
        self.framing = NO_BODY
        self.length = 0
        self.upgrade = False
        self.expect_continue = False
        #: lower-cased tokens of the Connection headers (the headers they name are hop-by-hop)
        self.connection = _EMPTY

    @property
    def has_body(self) -> bool:
        return self.framing == CHUNKED or (self.framing == LENGTH and self.length > 0)


class Response:
    """A response head from a backend (``names``: the header names lower-cased, in order)."""

    __slots__ = ("status", "reason", "version", "headers", "names", "keep_alive", "framing", "length", "connection")

    def __init__(self, status: int, reason: bytes, version: str, headers: list, names: list | None = None) -> None:
        self.status = status
        self.reason = reason
        self.version = version
        self.headers = headers
        self.names = names if names is not None else [name.lower() for name, _ in headers]
        self.keep_alive = True
        self.framing = NO_BODY
        self.length = 0
        self.connection = _EMPTY

    @property
    def interim(self) -> bool:
        """A 1xx response other than 101: more heads follow for the same request."""
        return self.status < 200 and self.status != 101


def _length(value: bytes, status: int) -> int:
    # llhttp has already refused anything but digits; the number itself may still be absurd.
    if len(value) > 18:
        raise HttpError(status, "Content-Length is too large")
    return int(value)


def _tokens(known: frozenset, value: bytes) -> frozenset:
    return known.union([token.strip().lower() for token in value.split(b",")])


class _Reader:
    """What both readers share: the event deque, header accounting, the head-size guard."""

    __slots__ = (
        "events", "_parser", "_headers", "_names", "_header_bytes", "_header_count", "_in_head", "_head_bytes", "_dead",
        "_max_bytes", "_max_count", "_status", "_connection", "_length", "_framing", "_error",
    )

    def __init__(self, max_bytes: int, max_count: int, status: int) -> None:
        self.events = collections.deque()
        self._parser = None
        self._headers = []
        self._names = []
        self._header_bytes = 0
        self._header_count = 0
        self._in_head = False
        self._head_bytes = 0
        self._dead = False
        self._max_bytes = max_bytes
        self._max_count = max_count
        self._status = status  # the answer to a refused message: 431 for users, 502 for backends
        # What the head's headers said so far (see _note), and the first refusal one earned.
        self._connection = _EMPTY
        self._length = 0
        self._framing = NO_BODY
        self._error = None

    def _begin(self):
        """A new head starts."""
        self._in_head = True
        self._headers = []
        self._names = []
        self._header_bytes = 0
        self._header_count = 0
        self._connection = _EMPTY
        self._length = 0
        self._error = None

    def _parse(self, data, what):
        """Hand ``data`` to httptools at once (no head under way, or one within this read)."""
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade as exc:
            self._dead = True
            self.events.append((UPGRADE, bytes(data[exc.args[0]:])))
        except HttpParserError as exc:
            self._failed(exc, what)
        else:
            if self._in_head:
                self._head_bytes = len(data)

    @property
    def mid_head(self) -> bool:
        """A head has started and is not complete yet."""
        return self._in_head

    @property
    def dead(self) -> bool:
        return self._dead

    def close(self) -> None:
        """Drop the parser (it refers back to this reader)."""
        self._dead = True
        self._parser = None

    # -- httptools callbacks shared by both kinds

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        self._header_count += 1
        if self._header_bytes > self._max_bytes:
            raise HttpError(self._status, f"the header lines are larger than {self._max_bytes} bytes")
        if self._header_count > self._max_count:
            raise HttpError(self._status, f"more than {self._max_count} header lines")
        if self._in_head:
            lower = name.lower()
            self._headers.append((name, value))
            self._names.append(lower)
            if lower in _NOTED and self._error is None:
                self._note(lower, value)
        # else a trailer: counted against the limits above, then dropped

    def _note(self, lower, value):
        """What a header of the head says (each kind of reader looks for its own)."""

    def on_body(self, data: bytes) -> None:
        self.events.append((BODY, data))

    def _feed(self, data, guard, what):
        """Parse ``data`` (the readers' ``feed`` inline this for the usual case)."""
        if self._dead:
            raise HttpError(self._status, f"no more input is taken after the {what} was refused or upgraded")
        if self._head_bytes > guard:
            self._dead = True
            raise HttpError(self._status, f"the {what} head is larger than {guard} bytes")
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade as exc:
            self._dead = True
            self.events.append((UPGRADE, bytes(data[exc.args[0]:])))
            return
        except HttpParserError as exc:
            self._failed(exc, what)
        if self._in_head:
            self._head_bytes += len(data)
        else:
            self._head_bytes = 0

    def _failed(self, exc, what):
        """Turn a parser error into the HttpError to answer with."""
        self._dead = True
        if isinstance(exc, HttpParserCallbackError) and isinstance(exc.__context__, HttpError):
            raise exc.__context__ from None
        if isinstance(exc, HttpParserCallbackError):
            raise exc
        raise HttpError(400 if self._status == 431 else 502, f"malformed {what}: {exc}") from None


class RequestReader(_Reader):
    """Reads the requests of one user connection."""

    __slots__ = ("_limits", "_url", "mid_body", "body_bytes", "body_start", "_host", "_hosts", "_lengths", "_expect")

    def __init__(self, limits) -> None:
        super().__init__(limits.max_header_bytes, limits.max_headers, 431)
        self._limits = limits
        self._url = b""
        #: The last head read announced a body, and the body has not ended yet.
        self.mid_body = False
        #: Body bytes (de-chunked: chunk framing and extensions are not progress) of every
        #: request read so far, and their count when the last head was complete; the
        #: edge's body clock compares them between two looks.
        self.body_bytes = 0
        self.body_start = 0
        self._host = None
        self._hosts = 0
        self._lengths = 0
        self._expect = False
        self._parser = httptools.HttpRequestParser(self)

    def feed(self, data) -> None:
        """Parse ``data``; events land in ``events``. Raises HttpError for a refused request."""
        if self._dead or self._head_bytes or self._in_head:
            limits = self._limits
            self._feed(data, limits.max_request_line + limits.max_header_bytes + _HEAD_SLACK, "request")
            return
        self._parse(data, "request")  # the usual case: a new request, or body bytes

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        self._begin()
        self._url = b""
        self._host = None
        self._hosts = 0
        self._lengths = 0
        self._framing = NO_BODY
        self._expect = False

    def on_url(self, fragment: bytes) -> None:
        self._url += fragment
        if len(self._url) > self._limits.max_request_line:
            raise HttpError(414, f"the request-target is longer than {self._limits.max_request_line} bytes")

    def _note(self, lower, value):
        if lower == b"host":
            self._hosts += 1
            if self._hosts > 1:
                self._error = HttpError(400, "more than one Host header")
            self._host = value
        elif lower == b"content-length":
            self._lengths += 1
            self._framing = LENGTH
            if len(value) > 18:
                self._error = HttpError(400, "Content-Length is too large")
            else:
                self._length = int(value)
        elif lower == b"transfer-encoding":
            if self._parser.get_http_version() == "1.0":
                self._error = HttpError(400, "Transfer-Encoding in an HTTP/1.0 request")
            elif value.strip().lower() != b"chunked":
                self._error = HttpError(501, "only the chunked transfer coding is supported")
            else:
                self._framing = CHUNKED
        elif lower == b"expect":
            if value.strip().lower() != b"100-continue":
                self._error = HttpError(417, "the only expectation supported is 100-continue")
            else:
                self._expect = True
        elif lower == b"connection":
            self._connection = _tokens(self._connection, value)

    def on_headers_complete(self) -> None:
        parser = self._parser
        self._in_head = False
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise HttpError(505, f"HTTP/{version} is not supported; use HTTP/1.1")
        method = parser.get_method().decode("ascii")
        if method == "CONNECT":
            raise HttpError(405, "CONNECT is not served here: this is a reverse proxy")
        if self._error is not None:
            raise self._error
        if self._lengths > 1:
            raise HttpError(400, "more than one Content-Length header")
        if self._host is None and version == "1.1":
            raise HttpError(400, "an HTTP/1.1 request needs a Host header")
        request = Request(method, self._url, version, self._headers, self._names)
        request.host = self._host
        request.framing = self._framing
        request.length = self._length
        request.expect_continue = self._expect
        request.connection = self._connection
        request.keep_alive = parser.should_keep_alive()
        request.upgrade = parser.should_upgrade()
        has_body = request.has_body
        if request.upgrade and has_body:
            raise HttpError(400, "an Upgrade request must not carry a body")
        self.mid_body = has_body
        self.body_start = self.body_bytes
        self.events.append((HEAD, request))

    def on_body(self, data: bytes) -> None:
        self.body_bytes += len(data)
        self.events.append((BODY, data))

    def on_message_complete(self) -> None:
        self.mid_body = False
        self.events.append((END, None))


class ResponseReader(_Reader):
    """Reads the responses of one backend connection, one request at a time.

    Call :meth:`expect` before each request is sent: a response to HEAD has no body
    whatever its headers say, and a 101 is only valid for an Upgrade request.
    """

    __slots__ = ("_limits", "_reason", "_no_body", "_upgrade_ok", "_body_framing", "_skip", "_in_body")

    def __init__(self, limits) -> None:
        super().__init__(limits.max_response_header_bytes, limits.max_response_headers, 502)
        self._limits = limits
        self._reason = b""
        self._no_body = False
        self._upgrade_ok = False
        self._body_framing = NO_BODY  # of the response under way (an UNTIL_CLOSE one ends at eof)
        self._in_body = False
        # Set once a response to HEAD is complete: llhttp would read the next bytes as its
        # body, so the parser is replaced once the current feed returns.
        self._skip = False
        self._parser = httptools.HttpResponseParser(self)

    def expect(self, head_request: bool, upgrade: bool) -> None:
        """The next response answers a HEAD request / an Upgrade request."""
        self._no_body = head_request
        self._upgrade_ok = upgrade

    @property
    def idle(self) -> bool:
        """No response has started (or the last one is complete)."""
        return not self._in_head and not self._in_body

    def feed(self, data) -> None:
        """Parse ``data``; events land in ``events``. Raises HttpError(502) for a bad response."""
        if self._dead or self._head_bytes or self._in_head:
            self._feed(data, self._limits.max_response_header_bytes + _HEAD_SLACK, "response")
        else:
            self._parse(data, "response")
        if self._skip:
            self._skip = False
            self._parser = httptools.HttpResponseParser(self)

    def eof(self) -> None:
        """The backend closed: ends a body delimited by the close, else refuses a cut response."""
        if self._in_body and self._body_framing == UNTIL_CLOSE:
            self._in_body = False
            self.events.append((END, None))
        elif self._in_head or self._in_body:
            self._dead = True
            raise HttpError(502, "the backend closed the connection in the middle of a response")

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        if self._skip:
            return
        self._begin()
        self._reason = b""
        self._framing = UNTIL_CLOSE

    def on_status(self, fragment: bytes) -> None:
        if self._skip:
            return
        self._reason += fragment
        if len(self._reason) > 1024:
            raise HttpError(502, "the backend's status line is too long")

    def _note(self, lower, value):
        if lower == b"content-length":
            if self._framing != CHUNKED:
                self._framing = LENGTH
                if len(value) > 18:
                    self._error = HttpError(502, "Content-Length is too large")
                else:
                    self._length = int(value)
        elif lower == b"transfer-encoding":
            if value.strip().lower() != b"chunked":
                self._error = HttpError(502, "the backend used a transfer coding other than chunked")
            else:
                self._framing = CHUNKED
        elif lower == b"connection":
            self._connection = _tokens(self._connection, value)

    def on_headers_complete(self) -> None:
        if self._skip:
            return
        parser = self._parser
        self._in_head = False
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise HttpError(502, f"the backend answered with HTTP/{version}")
        if self._error is not None:
            raise self._error
        status = parser.get_status_code()
        response = Response(status, self._reason, version, self._headers, self._names)
        response.keep_alive = parser.should_keep_alive()
        response.length = self._length
        response.connection = self._connection
        framing = self._framing
        if status == 101:
            if not self._upgrade_ok:
                raise HttpError(502, "the backend switched protocols for a request that did not ask to")
            framing = NO_BODY
        elif status < 200 or status == 204 or status == 304 or self._no_body:
            framing = NO_BODY
        response.framing = framing
        self._body_framing = framing
        self.events.append((HEAD, response))
        if status < 200:  # 1xx (interim) and 101 end nothing
            return
        if self._no_body:
            self.events.append((END, None))
            self._skip = True
        elif framing != NO_BODY:
            self._in_body = True

    def on_body(self, data: bytes) -> None:
        if not self._skip:
            self.events.append((BODY, data))

    def on_message_complete(self) -> None:
        if self._skip or self._parser.get_status_code() < 200:
            # A HEAD response had its END with its head; 1xx and 101 end nothing.
            return
        self._in_body = False
        self.events.append((END, None))
