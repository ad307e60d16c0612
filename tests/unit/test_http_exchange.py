"""The HTTP edge's connection state machine alone: bytes and stream events in, actions out, no sockets.

Like tests/unit/test_mux.py for the multiplexer, every case runs three ways (``mode``):
the user's bytes fed whole, byte by byte (as far as the machine lets the connection read:
it pauses reading), and whole with a pipelined next request trailing the case's request
in the same read, which must then be answered after it (or, when the case closes the
connection, never reach the app).
"""

from __future__ import annotations

import logging

import pytest

from backhaul.config import HttpLimits
from backhaul.protocol.constants import ErrorCode
from backhaul.relay.http import actions as A
from backhaul.relay.http import pacing as P
from backhaul.relay.http import states as X
from backhaul.relay.http.exchange import ExchangeMachine
from backhaul.relay.http.reader import BODY, END, HEAD, RequestReader, ResponseReader
from backhaul.relay.http.states import State
from backhaul.relay.http.translate import Route
from backhaul.relay.opening import CannotOpen
from backhaul.relay.preauth.contract import Allow, Respond
from backhaul.store import App

from .fakes import Clock

# (not codec_independent: the readers under the machine have two builds, and the suite
# runs this file against each)

LIMITS = HttpLimits()
MODES = ["whole", "bytes", "trailing"]
NEXT = b"GET /next HTTP/1.1\r\nHost: app.test\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Site:
    """What the machine reads of its edge."""

    def __init__(self, gate=None) -> None:
        self.routes = {
            "app.test": Route(App("web", "default", "http", None, None, "app.test", "http://10.0.0.5:8080")),
            "other.test": Route(App("other", "default", "http", None, None, "other.test", "http://10.0.0.6")),
            "sso.test": Route(App("sso", "default", "http", None, None, "sso.test", "http://10.0.0.7", "oidc")),
        }
        self.closing = False
        self.gate = gate


class Conn:
    """Plays the connection around the machine: carries out its actions and records them."""

    def __init__(self, mode: str = "whole", *, site: Site | None = None, limits: HttpLimits = LIMITS, can_write_eof=True):
        self.mode = mode
        self.clock = Clock()
        self.site = site or Site()
        self.m = ExchangeMachine(
            limits, self.site, scheme="http", conn_id="c0", client_ip="198.51.100.7", client="198.51.100.7:5000",
            clock=self.clock, can_write_eof=can_write_eof,
        )
        self.user = bytearray()  # what the user got
        self.streams: list[bytearray] = []  # what each stream carried to the app, in order of opening
        self.stream_open = False
        self.steps: list[tuple] = []  # stream and connection actions, in order
        self.armed: list[tuple[float, int]] = []  # (seconds, what for) each time the timer is armed anew
        self.counts: list[str] = []
        self.lines: list[tuple[int, str, dict]] = []
        self.done: list[str] = []  # ids of the completed requests
        self.gated = None  # the last GATE's (exchange, head)
        self.paused = False
        self.closed = None  # "close" or "abort"
        self.inbox = bytearray()  # bytes the user sent that the connection has not read yet
        self._running = False
        self.run()

    # -- the connection's side

    def run(self) -> None:
        if self._running:
            return
        self._running = True
        actions = self.m.actions
        i = 0
        while i < len(actions):
            kind, value = actions[i], actions[i + 1]
            i += 2
            if kind == A.WRITE:
                assert self.closed is None or self.closed == "close", "a write after an abort"
                self.user += value
            elif kind == A.SEND:
                if self.stream_open:
                    self.streams[-1] += value
            elif kind == A.PAUSE:
                self.paused = True
            elif kind == A.RESUME:
                self.paused = False
            elif kind in (A.OPEN, A.REOPEN):
                self.steps.append(("open" if kind == A.OPEN else "reopen", value.id))
                self.streams.append(bytearray())
                self.stream_open = True
            elif kind in (A.END_STREAM, A.RESET_STREAM, A.FORGET_STREAM):
                self.steps.append(({A.END_STREAM: "end", A.RESET_STREAM: "reset", A.FORGET_STREAM: "forget"}[kind], value))
                self.stream_open = False
            elif kind in (A.HALF_CLOSE, A.WRITE_EOF):
                self.steps.append(("half_close" if kind == A.HALF_CLOSE else "write_eof",))
            elif kind == A.GATE:
                self.gated = value
                self.steps.append(("gate", value[1].host))
            elif kind in (A.CLOSE, A.ABORT):
                self.closed = "close" if kind == A.CLOSE else "abort"
                self.steps.append((self.closed, value))
            elif kind == A.COUNT:
                self.counts.append(value)
            elif kind == A.LOG:
                self.lines.append(value[:3])
            elif kind == A.DONE:
                self.done.append(value.id)
            else:
                raise AssertionError(f"unknown action {kind}")
        actions.clear()
        pacing = self.m.pacing
        if pacing.due is not None:
            self.armed.append((pacing.due, pacing.timer))
            pacing.due = None
        self._running = False
        self._read()

    def _read(self) -> None:
        """Read what the user sent, as the socket would: not while paused or closed."""
        while self.inbox and not self.paused and self.closed is None:
            size = 1 if self.mode == "bytes" else len(self.inbox)
            data = bytes(self.inbox[:size])
            del self.inbox[:size]
            self.m.receive(data)
            self.run()

    # -- what the test does

    def request(self, raw: bytes) -> None:
        """The user sends a request (with the next one behind it in trailing mode)."""
        self.send(raw + (NEXT if self.mode == "trailing" else b""))

    def send(self, data: bytes) -> None:
        self.inbox += data
        self._read()

    def accept(self) -> None:
        assert self.m.link.state == X.L_OPENING
        self.m.link.accepted()
        self.run()

    def app(self, data: bytes) -> None:
        """The app's bytes arrive on the stream."""
        step = 1 if self.mode == "bytes" else len(data)
        for at in range(0, len(data), step):
            self.m.link.data(data[at:at + step])
            self.run()

    def app_ends(self) -> None:
        self.m.link.ended()
        self.run()

    def reject(self, code: int, reason: str = "no") -> None:
        self.m.link.rejected(code, reason)
        self.run()

    def reset(self, code: int, reason: str = "reset", tunnel_dead: bool = False) -> None:
        self.m.link.reset(code, reason, tunnel_dead)
        self.run()

    def time_out(self, seconds: float) -> None:
        self.clock.now += seconds
        self.m.timed_out()
        self.run()

    @property
    def sent(self) -> bytes:
        """What the current (last opened) stream carried."""
        return bytes(self.streams[-1])

    def finish(self, expect: str = "next") -> None:
        """In trailing mode: the pipelined request is answered after the case (``next``) or
        never reached the app (``closed``)."""
        if self.mode != "trailing":
            return
        if expect == "closed":
            assert self.closed is not None
            assert all(b"/next" not in stream for stream in self.streams)
            return
        assert self.closed is None
        if self.m.link.state == X.L_OPENING:
            self.accept()
        assert self.sent.endswith(b"\r\n\r\n") and b"GET /next HTTP/1.1\r\n" in self.sent
        before = len(self.user)
        self.app(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")
        assert self.user[before:].startswith(b"HTTP/1.1 200 OK\r\n") and self.user.endswith(b"\r\n\r\nnext")
        assert self.m.state is State.IDLE and not self.paused


def requests_in(data: bytes) -> list[tuple[bytes, bytes]]:
    """(head line, body) of each request in what a stream carried (bodies de-chunked)."""
    reader = RequestReader(LIMITS)
    reader.feed(data)
    out = []
    for kind, value in reader.events:
        if kind == HEAD:
            out.append([f"{value.method} ".encode() + value.target, b""])
        elif kind == BODY:
            out[-1][1] += value
    assert not reader.mid_head and not reader.mid_body
    return [tuple(item) for item in out]


def responses_in(data: bytes, head_request: bool = False) -> list[tuple[int, dict, bytes]]:
    """(status, headers, body) of each response the user got (bodies de-chunked)."""
    reader = ResponseReader(LIMITS)
    reader.expect(head_request, False)
    reader.feed(data)
    out = []
    for kind, value in reader.events:
        if kind == HEAD:
            out.append([value.status, {k.lower(): v for k, v in value.headers}, b""])
        elif kind == BODY:
            out[-1][2] += value
        elif kind == END:
            pass
    return [tuple(item) for item in out]


GET = b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n"


@pytest.fixture(params=MODES)
def mode(request) -> str:
    return request.param


# ---------------------------------------------------------------------- requests and answers


def test_get_opens_a_stream_and_keep_alive_reuses_it(mode):
    c = Conn(mode)
    assert c.armed == [(LIMITS.header_timeout, P.T_HEAD)] and c.m.state is State.IDLE
    c.send(GET)
    assert c.steps == [("open", "c0.1")] and c.m.state is State.OPENING
    assert c.m.pacing.timer == P.T_NONE  # no head wait while the stream opens
    c.accept()
    assert c.m.state is State.FORWARDING
    assert c.sent.startswith(b"GET / HTTP/1.1\r\n") and b"\r\nHost: 10.0.0.5:8080\r\n" in c.sent
    assert b"\r\nX-Request-Id: c0.1\r\n" in c.sent and b"\r\nX-Forwarded-For: 198.51.100.7\r\n" in c.sent
    assert c.armed[-1] == (LIMITS.response_timeout, P.T_RESPONSE)
    c.app(OK)
    assert responses_in(bytes(c.user)) == [(200, {b"content-length": b"2"}, b"ok")]
    assert c.m.state is State.IDLE and c.done == ["c0.1"]
    assert c.armed[-1] == (LIMITS.keepalive_timeout, P.T_IDLE)
    c.request(b"GET /two HTTP/1.1\r\nHost: app.test\r\n\r\n")
    assert [s[0] for s in c.steps] == ["open"]  # the same stream
    assert requests_in(c.sent)[-1] == (b"GET /two", b"")
    assert b"X-Request-Id: c0.2" in c.sent
    c.app(OK)
    assert [r[0] for r in responses_in(bytes(c.user))] == [200, 200]
    c.finish()


def test_pipelined_requests_are_answered_in_order_with_one_read_held(mode):
    c = Conn(mode)
    c.request(b"GET /a HTTP/1.1\r\nHost: app.test\r\n\r\nGET /b HTTP/1.1\r\nHost: app.test\r\n\r\n")
    assert c.paused  # /a's END waits for its stream: nothing more is read
    if mode == "bytes":
        assert c.inbox.startswith(b"GET /b")  # read no further than /a
    c.accept()
    assert requests_in(c.sent) == [(b"GET /a", b"")]  # /b waits for /a's answer
    assert c.paused and not c.inbox  # and so does the socket, with /b read
    c.app(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
    assert requests_in(c.sent) == [(b"GET /a", b""), (b"GET /b", b"")]
    assert responses_in(bytes(c.user))[0][2] == b"a"
    assert c.paused == (mode == "trailing")  # /next still waits behind /b
    c.app(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb")
    assert [r[2] for r in responses_in(bytes(c.user))] == [b"a", b"b"]
    c.finish()


def test_http_1_0_closes_after_its_answer(mode):
    c = Conn(mode)
    c.request(b"GET / HTTP/1.0\r\nHost: app.test\r\n\r\n")
    c.accept()
    assert c.sent.startswith(b"GET / HTTP/1.1\r\n")  # the edge speaks 1.1 to the app
    c.app(OK)
    assert c.user.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nConnection: close\r\n" in c.user
    assert c.closed == "close" and c.m.state is State.CLOSED
    c.finish("closed")


def test_http_1_0_keep_alive_is_said_in_the_answer(mode):
    c = Conn(mode)
    c.request(b"GET / HTTP/1.0\r\nHost: app.test\r\nConnection: keep-alive\r\n\r\n")
    c.accept()
    c.app(OK)
    assert b"\r\nConnection: keep-alive\r\n" in c.user and c.closed is None
    c.finish()


def test_connection_close_from_the_user_closes_after_the_answer(mode):
    c = Conn(mode)
    c.request(b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
    c.accept()
    c.app(OK)
    assert b"\r\nConnection: close\r\n" in c.user and c.closed == "close"
    c.finish("closed")


def test_connection_close_from_the_app_drops_the_stream_not_the_user(mode):
    c = Conn(mode)
    c.request(GET)
    c.accept()
    c.app(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    assert b"Connection: close" not in c.user and c.closed is None
    # the stream goes with its FIN; the next request gets a new one
    expected = [("open", "c0.1"), ("end", None)] + ([("open", "c0.2")] if mode == "trailing" else [])
    assert c.steps == expected
    c.finish()


def test_head_answer_has_no_body_and_the_stream_stays(mode):
    c = Conn(mode)
    c.request(b"HEAD / HTTP/1.1\r\nHost: app.test\r\n\r\n")
    c.accept()
    c.app(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    assert responses_in(bytes(c.user), head_request=True) == [(200, {b"content-length": b"10"}, b"")]
    assert c.m.link.usable and [step[0] for step in c.steps] == ["open"]
    c.finish()


def test_chunked_request_body_is_sent_chunked(mode):
    c = Conn(mode)
    c.send(b"POST /up HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n")
    c.accept()
    c.request(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    assert b"\r\nTransfer-Encoding: chunked\r\n" in c.sent
    assert requests_in(c.sent) == [(b"POST /up", b"hello world")]
    assert c.armed[-1] == (LIMITS.response_timeout, P.T_RESPONSE)
    c.app(OK)
    c.finish()


def test_length_request_body_is_sent_as_is(mode):
    c = Conn(mode)
    c.request(b"POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\n\r\nhello")
    c.accept()
    assert c.sent.endswith(b"\r\nContent-Length: 5\r\n\r\nhello")
    c.app(OK)
    c.finish()


def test_chunked_response_reaches_the_user_chunked(mode):
    c = Conn(mode)
    c.request(GET)
    c.accept()
    c.app(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert b"\r\nTransfer-Encoding: chunked\r\n" in c.user
    assert responses_in(bytes(c.user)) == [(200, {b"transfer-encoding": b"chunked"}, b"hello")]
    c.finish()


def test_a_body_until_close_is_rechunked_for_http_1_1(mode):
    c = Conn(mode)
    c.request(GET)
    c.accept()
    c.app(b"HTTP/1.1 200 OK\r\n\r\nhello world")
    assert c.m.state is State.FORWARDING  # the body ends with the stream
    c.app_ends()
    assert responses_in(bytes(c.user)) == [(200, {b"transfer-encoding": b"chunked"}, b"hello world")]
    assert c.user.endswith(b"0\r\n\r\n") and c.closed is None and ("end", None) in c.steps
    c.finish()


def test_a_body_until_close_ends_an_http_1_0_users_connection(mode):
    c = Conn(mode)
    c.request(b"GET / HTTP/1.0\r\nHost: app.test\r\nConnection: keep-alive\r\n\r\n")
    c.accept()
    c.app(b"HTTP/1.0 200 OK\r\n\r\nhello")
    c.app_ends()
    assert b"Transfer-Encoding" not in c.user and b"\r\nConnection: close\r\n" in c.user
    assert c.user.endswith(b"\r\n\r\nhello") and c.closed == "close"
    c.finish("closed")


def test_100_continue_waits_for_the_apps_100_then_times_the_body(mode):
    c = Conn(mode)
    c.send(b"POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    c.accept()
    assert c.armed[-1] == (LIMITS.response_timeout, P.T_RESPONSE)  # the app's 100 is waited for
    assert not c.m.pacing.body.running  # the client waits, as it was told it may
    c.app(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert c.user == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert c.m.pacing.body.running and c.m.pacing.timer == P.T_BODY  # now the body clock runs
    c.request(b"hello")
    assert requests_in(c.sent) == [(b"POST /", b"hello")]
    assert c.m.pacing.timer == P.T_RESPONSE and not c.m.pacing.body.running
    c.app(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    assert [r[0] for r in responses_in(bytes(c.user))] == [100, 201]
    c.finish()


def test_upgrade_switches_to_raw_bytes_after_101(mode):
    c = Conn(mode)
    c.request(b"GET /ws HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert c.paused  # bytes after the head wait for the 101
    c.accept()
    assert b"\r\nUpgrade: websocket\r\n" in c.sent
    c.app(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nfrom-app")
    assert c.m.state is State.UPGRADED and not c.paused and c.m.pacing.timer == P.T_NONE
    assert c.user.startswith(b"HTTP/1.1 101 Switching Protocols\r\n") and c.user.endswith(b"\r\n\r\nfrom-app")
    head_end = c.sent.index(b"\r\n\r\n") + 4
    if mode == "trailing":
        assert c.sent[head_end:] == NEXT  # what followed the head is the new protocol's
    c.send(b"\x81\x02hi")
    assert c.sent.endswith(b"\x81\x02hi")
    c.app(b"\x81\x02yo")
    assert c.user.endswith(b"\x81\x02yo")
    c.m.receive_eof()
    c.run()
    assert ("half_close",) in c.steps and c.closed is None
    c.app_ends()
    assert c.closed == "close"


def test_upgrade_refused_by_the_app_closes(mode):
    c = Conn(mode)
    c.request(b"GET /ws HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    c.accept()
    c.app(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    assert b"\r\nConnection: close\r\n" in c.user and c.closed == "close"
    c.finish("closed")


# ---------------------------------------------------------------------- retries before commit


def _kept_alive(mode) -> Conn:
    c = Conn(mode)
    c.send(GET)
    c.accept()
    c.app(OK)
    return c


@pytest.mark.parametrize("how", ["end", "reset"])
def test_a_get_on_a_kept_alive_stream_closed_before_its_answer_is_resent(mode, how):
    c = _kept_alive(mode)
    c.request(b"GET /again HTTP/1.1\r\nHost: app.test\r\n\r\n")
    assert requests_in(c.sent)[-1] == (b"GET /again", b"")
    if how == "end":
        c.app_ends()
    else:
        c.reset(ErrorCode.CONNECT_REFUSED)
    assert c.steps[-1] == ("open", "c0.2") and c.m.state is State.OPENING
    assert c.steps[-2][0] in ("reset", "forget")
    c.accept()
    assert requests_in(c.sent) == [(b"GET /again", b"")]  # on the new stream
    c.app(OK)
    assert [r[0] for r in responses_in(bytes(c.user))] == [200, 200] and c.closed is None
    c.finish()


def test_a_post_is_not_resent(mode):
    c = _kept_alive(mode)
    c.request(b"POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 2\r\n\r\nhi")
    c.app_ends()
    assert [s[0] for s in c.steps].count("open") == 1
    status, headers, body = responses_in(bytes(c.user))[-1]
    assert status == 502 and b"the app closed the connection without answering" in body
    assert headers[b"connection"] == b"close" and c.closed == "close"
    c.finish("closed")


def test_a_get_is_not_resent_once_its_answer_started(mode):
    c = _kept_alive(mode)
    c.request(GET)
    c.app(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhal")
    c.app_ends()  # cut mid-body
    assert c.closed == "abort" and c.steps[-1][1].startswith("the app's response was cut")
    assert [s[0] for s in c.steps].count("open") == 1
    c.finish("closed")


def test_a_get_is_resent_once_only(mode):
    c = _kept_alive(mode)
    c.send(GET)
    c.app_ends()
    c.accept()
    c.app_ends()  # the new stream was not kept alive: this failure is not retried
    assert responses_in(bytes(c.user))[-1][0] == 502 and c.closed == "close"


@pytest.mark.parametrize("code", [ErrorCode.REFUSED_STREAM, ErrorCode.GOING_AWAY, ErrorCode.PEER_DEAD])
def test_a_retryable_open_fail_is_offered_to_another_connector(mode, code):
    c = Conn(mode)
    c.request(GET)
    c.reject(code)
    assert c.steps == [("open", "c0.1"), ("reopen", "c0.1")]
    assert any(line[1] == "stream open refused, retrying on another connector" for line in c.lines)
    c.accept()
    assert requests_in(c.sent) == [(b"GET /", b"")]
    c.app(OK)
    assert responses_in(bytes(c.user))[0][0] == 200
    c.finish()


@pytest.mark.parametrize(("code", "status"), [(ErrorCode.CONNECT_REFUSED, 502), (ErrorCode.CONNECT_TIMEOUT, 504)])
def test_a_final_open_fail_is_answered(mode, code, status):
    c = Conn(mode)
    c.request(GET)
    c.reject(code, "connection refused")
    assert c.steps[:2] == [("open", "c0.1"), ("forget", code)]
    got = responses_in(bytes(c.user))[0]
    assert got[0] == status and b"the connector could not reach the app: connection refused" in got[2]
    assert c.closed is None  # nothing unread: the connection lives
    c.finish()


def test_a_reset_before_open_ok_on_a_dead_tunnel_is_retried(mode):
    c = Conn(mode)
    c.request(GET)
    c.reset(ErrorCode.PROTOCOL_ERROR, "tunnel lost", tunnel_dead=True)
    assert c.steps == [("open", "c0.1"), ("reopen", "c0.1")]
    c.accept()
    c.app(OK)
    c.finish()


def test_a_reset_before_open_ok_on_a_live_tunnel_is_an_answer(mode):
    c = Conn(mode)
    c.request(GET)
    c.reset(ErrorCode.CANCEL, "cancelled")
    assert c.steps[:2] == [("open", "c0.1"), ("forget", ErrorCode.CANCEL)]
    assert responses_in(bytes(c.user))[0][0] == 502
    c.finish()


@pytest.mark.parametrize(
    ("attempted", "unreachable", "text"),
    [
        (0, False, b"no connector of group 'default' is active, so the app cannot be reached"),
        (3, False, b"no connector of group 'default' could take the request; try again"),
        (1, True, b"the app's origin is down"),
    ],
)
def test_no_tunnel_takes_the_stream(mode, attempted, unreachable, text):
    c = Conn(mode)
    c.request(GET)
    c.m.link.open_failed(CannotOpen("the app's origin is down", unreachable, attempted))
    c.run()
    got = responses_in(bytes(c.user))[0]
    assert got[0] == 502 and text in got[2] and "http_no_connector" in c.counts
    c.finish()


def test_a_bad_response_is_a_502(mode):
    c = Conn(mode)
    c.request(GET)
    c.accept()
    c.app(b"HTTP/1.1 abc\r\n\r\n")
    got = responses_in(bytes(c.user))
    assert got[0][0] == 502 and b"the app's connection failed: malformed response" in got[0][2]
    assert c.steps[1][0] == "reset" and c.steps[1][1].startswith("malformed response")
    assert c.closed == "close"
    c.finish("closed")


def test_bytes_no_request_asked_for_drop_the_stream(mode):
    c = _kept_alive(mode)
    c.app(b"HTTP/1.1 200 OK\r\n")
    assert c.steps[-1] == ("reset", "the app sent bytes no request asked for")
    assert c.closed is None and c.m.state is State.IDLE
    c.request(GET)
    assert c.steps[-1] == ("open", "c0.2")  # a new stream for the next request
    c.accept()
    c.app(OK)
    c.finish()


# ---------------------------------------------------------------------- the edge's own answers


def test_unknown_host_is_404_and_keeps_the_connection(mode):
    c = Conn(mode)
    c.request(b"GET / HTTP/1.1\r\nHost: nowhere.test\r\n\r\n")
    got = responses_in(bytes(c.user))[0]
    assert got[0] == 404 and b"no app is published at nowhere.test" in got[2] and got[1][b"x-request-id"] == b"c0.1"
    assert ("open", "c0.1") not in c.steps and "http_edge_answers" in c.counts
    c.finish()


def test_an_edge_answer_before_the_body_was_read_closes(mode):
    c = Conn(mode)
    c.request(b"POST / HTTP/1.1\r\nHost: nowhere.test\r\nContent-Length: 5\r\n\r\nhello")
    got = responses_in(bytes(c.user))[0]
    assert got[0] == 404 and got[1][b"connection"] == b"close" and c.closed == "close"
    c.finish("closed")


def test_a_malformed_request_is_refused_and_closes(mode):
    c = Conn(mode)
    c.send(b"GET / HTTP/1.1\r\nHost: app.test\r\nHost: other.test\r\n\r\n" + (NEXT if mode == "trailing" else b""))
    got = responses_in(bytes(c.user))[0]
    assert got[0] == 400 and b"more than one Host header" in got[2] and c.closed == "close"
    assert "http_refused" in c.counts and not c.streams


def test_a_malformed_pipelined_request_waits_for_the_answer_before_it(mode):
    c = Conn(mode)
    c.send(GET + b"GET / HTTP/9.9\r\n\r\n")
    c.accept()
    assert c.closed is None and c.paused
    c.app(OK)
    statuses = [r[0] for r in responses_in(bytes(c.user))]
    assert statuses[0] == 200 and statuses[1] in (400, 505) and c.closed == "close"


def test_relay_draining_closes_after_the_answer(mode):
    c = Conn(mode)
    c.request(GET)
    c.accept()
    c.site.closing = True
    c.app(OK)
    assert b"\r\nConnection: close\r\n" in c.user and c.closed == "close"
    c.finish("closed")


def test_close_if_idle_closes_only_an_idle_connection():
    c = Conn()
    c.send(GET)
    c.m.close_if_idle()
    c.run()
    assert c.closed is None
    c.accept()
    c.app(OK)
    c.m.close_if_idle()
    c.run()
    assert c.closed == "close" and c.m.state is State.CLOSED


def test_abort_resets_the_stream():
    c = Conn()
    c.send(GET)
    c.accept()
    c.m.abort("app 'web' was changed or deleted")
    c.run()
    assert c.steps[-2:] == [("reset", "app 'web' was changed or deleted"), ("abort", "app 'web' was changed or deleted")]
    assert c.m.uses(c.site.routes["app.test"]) and not c.m.uses(c.site.routes["other.test"])


def test_another_app_gets_another_stream(mode):
    c = _kept_alive(mode)
    c.request(b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\n")
    assert c.steps[-2:] == [("end", None), ("open", "c0.2")]
    c.accept()
    assert b"\r\nHost: 10.0.0.6\r\n" in c.sent
    c.app(OK)
    c.finish()


# ---------------------------------------------------------------------- timers


def test_timers_follow_the_state():
    c = Conn()
    assert c.m.pacing.timer == P.T_HEAD
    c.send(b"GET / HTTP/1.1\r\n")
    c.time_out(LIMITS.header_timeout)
    got = responses_in(bytes(c.user))[0]
    assert got[0] == 408 and c.closed == "close"


def test_idle_keep_alive_times_out_quietly():
    c = _kept_alive("whole")
    assert c.m.pacing.timer == P.T_IDLE
    before = len(c.user)
    c.time_out(LIMITS.keepalive_timeout)
    assert c.closed == "close" and len(c.user) == before


def test_a_head_begun_in_the_keep_alive_wait_gets_the_head_timeout():
    c = _kept_alive("whole")
    c.send(b"GET /")
    assert c.m.pacing.timer == P.T_HEAD and c.armed[-1] == (LIMITS.header_timeout, P.T_HEAD)


def test_the_apps_answer_is_timed(mode):
    c = Conn(mode)
    c.request(GET)
    c.accept()
    assert c.m.pacing.timer == P.T_RESPONSE
    c.time_out(LIMITS.response_timeout)
    got = responses_in(bytes(c.user))[0]
    assert got[0] == 504 and b"the app did not answer within 60 s" in got[2]
    assert ("reset", "the backend did not answer in time") in c.steps and c.closed == "close"
    c.finish("closed")


def test_the_answer_cancels_the_response_timer():
    c = Conn()
    c.send(GET)
    c.accept()
    c.app(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
    assert c.m.pacing.timer == P.T_NONE  # the body streams: no deadline on the app
    c.app(b"cde")
    assert c.m.pacing.timer == P.T_IDLE


def test_a_slow_body_is_timed_out_with_408():
    c = Conn()
    c.send(b"POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 10\r\n\r\nab")
    assert c.paused and not c.m.pacing.body.running  # the body waits for the stream: not the client's time
    c.accept()
    assert c.m.pacing.body.running and c.m.pacing.timer == P.T_BODY
    for _ in range(5):
        c.time_out(LIMITS.body_timeout / 4)
        if c.closed:
            break
    got = responses_in(bytes(c.user))[0]
    # 2 bytes in the 20 s grace: the rate rule (500 bytes/s) cuts it at the look after
    assert got[0] == 408 and b"the request body came slower than 500 bytes/s (2 bytes in 22.5 s)" in got[2]
    assert "http_body_timeouts" in c.counts and c.closed == "close"


def test_the_body_clock_stops_while_the_tunnel_pushes_back():
    c = Conn()
    c.send(b"POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 10\r\n\r\nab")
    c.accept()
    c.m.pushback(True)
    c.run()
    assert c.paused and not c.m.pacing.body.running and c.m.pacing.timer == P.T_NONE
    c.clock.now += 3600  # the tunnel's time is not the client's
    c.m.pushback(False)
    c.run()
    assert not c.paused and c.m.pacing.body.running and c.m.pacing.timer == P.T_BODY


# ---------------------------------------------------------------------- the gate


def test_gate_allow_forwards_with_the_identity_headers(mode):
    c = Conn(mode, site=Site(gate=object()))
    c.request(b"GET / HTTP/1.1\r\nHost: sso.test\r\n\r\n")
    assert c.steps == [("gate", "sso.test")] and c.m.state is State.GATING
    ex, head = c.gated
    assert head.method == "GET" and head.client == "198.51.100.7"
    c.m.router.gate_answered(ex, Allow(user="ann", headers=(("X-Backhaul-User", "ann"),)))
    c.run()
    assert c.steps[-1] == ("open", "c0.1")
    c.accept()
    assert b"\r\nX-Backhaul-User: ann\r\n" in c.sent
    c.app(OK)
    if mode == "trailing":
        # /next is for app.test: another app, another stream
        assert c.steps[-2:] == [("end", None), ("open", "c0.2")]
    c.finish()


def test_gate_respond_answers_from_the_edge(mode):
    c = Conn(mode, site=Site(gate=object()))
    c.request(b"GET / HTTP/1.1\r\nHost: sso.test\r\n\r\n")
    c.m.router.gate_answered(c.gated[0], Respond(302, (("Location", "https://idp.test/auth"),)))
    c.run()
    got = responses_in(bytes(c.user))[0]
    assert got[0] == 302 and got[1][b"location"] == b"https://idp.test/auth" and ("open", "c0.1") not in c.steps
    c.finish()


def test_gate_unusable_answer_or_failure_is_a_503(mode):
    c = Conn(mode, site=Site(gate=object()))
    c.request(b"GET / HTTP/1.1\r\nHost: sso.test\r\n\r\n")
    c.m.router.gate_answered(c.gated[0], Allow(headers=(("X-Other", "x"),)))  # not an identity header
    c.run()
    got = responses_in(bytes(c.user))[0]
    assert got[0] == 503 and c.closed == "close"
    assert any(line[0] == logging.ERROR for line in c.lines)
    c2 = Conn(mode, site=Site(gate=object()))
    c2.request(b"GET / HTTP/1.1\r\nHost: sso.test\r\n\r\n")
    c2.m.router.gate_failed(c2.gated[0], RuntimeError("issuer down"))
    c2.run()
    assert responses_in(bytes(c2.user))[0][0] == 503 and c2.closed == "close"


def test_a_gated_app_without_a_gate_is_refused(mode):
    c = Conn(mode)
    c.request(b"GET / HTTP/1.1\r\nHost: sso.test\r\n\r\n")
    assert responses_in(bytes(c.user))[0][0] == 503 and ("open", "c0.1") not in c.steps
    c.finish()


# ---------------------------------------------------------------------- the table


def test_a_step_the_table_does_not_hold_is_a_bug():
    c = Conn()
    with pytest.raises(AssertionError, match="cannot SWITCH in state IDLE"):
        c.m.move(X.Step.SWITCH)
    assert set(X.TRANSITIONS) == set(State)
    assert all(X.TRANSITIONS[state][X.Step.CLOSE] is State.CLOSED for state in State)


def test_user_eof_after_the_requests_still_gets_the_answers(mode):
    c = Conn(mode)
    c.request(GET)
    assert c.m.receive_eof() is True
    c.run()
    c.accept()
    c.app(OK)
    if mode == "trailing":
        assert c.closed is None  # /next is owed an answer too
        c.app(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert c.closed == "close" and responses_in(bytes(c.user))[0][0] == 200


def test_each_body_chunk_costs_one_action_each_way():
    """Per DATA chunk of a body the machine asks for one write (or one send), nothing more."""
    c = Conn()
    c.send(b"POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 3000\r\n\r\n")
    c.accept()
    for _ in range(299):
        c.m.receive(b"x" * 10)
        assert c.m.actions == [A.SEND, b"x" * 10] and c.m.pacing.due is None
        c.run()
    c.m.receive(b"x" * 10)
    assert c.m.actions == [A.SEND, b"x" * 10]
    assert c.m.pacing.due == LIMITS.response_timeout  # the body is complete: the app's answer is timed
    c.run()
    c.app(b"HTTP/1.1 200 OK\r\nContent-Length: 3000\r\n\r\n")
    for _ in range(299):
        c.m.link.data(b"y" * 10)
        assert c.m.actions == [A.WRITE, b"y" * 10] and c.m.pacing.due is None
        c.run()
    c.app(b"y" * 10)
    assert responses_in(bytes(c.user))[0][2] == b"y" * 3000 and c.m.state is State.IDLE


def test_a_stream_that_ends_before_its_open_ok_is_a_refusal(mode):
    c = Conn(mode)
    c.request(GET)
    c.app_ends()
    assert c.steps[:2] == [("open", "c0.1"), ("forget", ErrorCode.PROTOCOL_ERROR)]
    assert responses_in(bytes(c.user))[0][0] == 502
    c.finish()


# ---------------------------------------------------------------------- which build


def test_the_machine_under_test_is_the_build_the_environment_asks_for(monkeypatch):
    import importlib
    import os
    import sys

    from backhaul.relay.http import exchange

    if os.environ.get("BACKHAUL_REQUIRE_EXT") == "1":
        assert exchange.IMPLEMENTATION == "cython"
        assert ExchangeMachine.__module__ == "backhaul.relay.http._exchange_c"
        assert not hasattr(Conn().m, "__dict__"), "a cdef class, not the Python one"
    elif os.environ.get("BACKHAUL_PURE") == "1":
        assert exchange.IMPLEMENTATION == "python"
        assert ExchangeMachine.__module__ == "backhaul.relay.http._exchange_py"
    # A missing build is an ImportError under BACKHAUL_REQUIRE_EXT=1, never a silent fallback.
    monkeypatch.delenv("BACKHAUL_PURE", raising=False)
    monkeypatch.setenv("BACKHAUL_REQUIRE_EXT", "1")
    monkeypatch.setitem(sys.modules, "backhaul.relay.http._exchange_c", None)
    monkeypatch.delitem(sys.modules, "backhaul.relay.http.exchange")
    with pytest.raises(ImportError, match="HTTP exchange machine"):
        importlib.import_module("backhaul.relay.http.exchange")
