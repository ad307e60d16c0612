"""The HTTP edge's message readers: framing, limits and hostile input.

Every case is fed three ways: whole, one byte at a time, and followed by another request
(which must never be read as part of, or instead of, a refused one: that is smuggling).
The readers have two builds (the Cython one and the pure twin, one source): the suite
runs this file once per build (BACKHAUL_REQUIRE_EXT=1, then BACKHAUL_PURE=1).
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest

from backhaul.config import HttpLimits
from backhaul.relay.http.reader import (
    BODY,
    CHUNKED,
    END,
    HEAD,
    LENGTH,
    NO_BODY,
    UNTIL_CLOSE,
    UPGRADE,
    HttpError,
    RequestReader,
    ResponseReader,
)

NEXT = b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"
MODES = ["whole", "bytes", "trailing"]
LIMITS = HttpLimits()


def _feed(reader, data: bytes, mode: str) -> None:
    if mode == "bytes":
        for i in range(len(data)):
            reader.feed(data[i : i + 1])
    else:
        reader.feed(data + (NEXT if mode == "trailing" else b""))


def read(data: bytes, mode: str = "whole", limits: HttpLimits = LIMITS) -> list:
    """The events of ``data``, with body pieces joined; HttpError propagates."""
    reader = RequestReader(limits)
    _feed(reader, data, mode)
    events = []
    for kind, value in reader.events:
        if kind == BODY and events and events[-1][0] == BODY:
            events[-1] = (BODY, events[-1][1] + value)
        else:
            events.append((kind, value))
    if mode == "trailing" and not any(kind == UPGRADE for kind, _ in events):
        assert events[-2][0] == HEAD and events[-2][1].target == b"/next", "the next request was not read after"
        events = events[:-2]
    return events


def refused(data: bytes, mode: str, limits: HttpLimits = LIMITS) -> HttpError:
    reader = RequestReader(limits)
    with pytest.raises(HttpError) as info:
        _feed(reader, data, mode)
    # Nothing after the refused head may come out as a request of its own.
    assert not any(kind == HEAD and value.target == b"/next" for kind, value in reader.events)
    assert reader.dead
    return info.value


@pytest.mark.parametrize("mode", MODES)
def test_get(mode):
    events = read(b"GET /a?b=c HTTP/1.1\r\nHost: app.test:8080\r\nAccept: */*\r\n\r\n", mode)
    assert [kind for kind, _ in events] == [HEAD, END]
    request = events[0][1]
    assert (request.method, request.target, request.version, request.host) == ("GET", b"/a?b=c", "1.1", b"app.test:8080")
    assert request.headers == [(b"Host", b"app.test:8080"), (b"Accept", b"*/*")]
    assert request.keep_alive and request.framing == NO_BODY and not request.has_body


@pytest.mark.parametrize("mode", MODES)
def test_content_length_body(mode):
    events = read(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello world", mode)
    assert [kind for kind, _ in events] == [HEAD, BODY, END]
    assert events[0][1].framing == LENGTH and events[0][1].length == 11
    assert events[1][1] == b"hello world"


@pytest.mark.parametrize("mode", MODES)
def test_chunked_body_is_dechunked_and_trailers_dropped(mode):
    data = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n"
    events = read(data, mode)
    assert [kind for kind, _ in events] == [HEAD, BODY, END]
    assert events[0][1].framing == CHUNKED
    assert events[1][1] == b"hello world"
    assert (b"X-Trailer", b"1") not in events[0][1].headers


@pytest.mark.parametrize("mode", ["whole", "bytes"])
def test_pipelined_requests_come_out_in_order(mode):
    data = b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nPOST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhiGET /3 HTTP/1.1\r\nHost: a\r\n\r\n"
    events = read(data, mode)
    assert [(k, v.target if k == HEAD else v) for k, v in events] == [
        (HEAD, b"/1"), (END, None), (HEAD, b"/2"), (BODY, b"hi"), (END, None), (HEAD, b"/3"), (END, None)
    ]


def test_http10_keep_alive_follows_the_connection_header():
    assert not read(b"GET / HTTP/1.0\r\n\r\n")[0][1].keep_alive
    assert read(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")[0][1].keep_alive
    assert not read(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")[0][1].keep_alive


@pytest.mark.parametrize("mode", ["whole", "bytes"])
def test_upgrade_hands_over_the_bytes_after_the_head(mode):
    data = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x05hello"
    reader = RequestReader(LIMITS)
    if mode == "bytes":
        # The edge stops reading at the upgrade; so does this loop.
        for i in range(len(data)):
            if reader.dead:
                break
            reader.feed(data[i : i + 1])
    else:
        reader.feed(data)
    kinds = [kind for kind, _ in reader.events]
    assert kinds[:2] == [HEAD, END] and reader.events[0][1].upgrade
    rest = b"".join(value for kind, value in reader.events if kind == UPGRADE)
    if mode == "whole":
        assert rest == b"\x81\x05hello"
    assert reader.dead


def _body_progress(data: bytes, mode: str) -> list[tuple[bool, int]]:
    """(mid_body, body_bytes - body_start) after each piece fed, the edge's view of a body.

    With trailing data, the next (bodiless) request's head starts a new count: then the
    second figure is the body bytes of the first request, and the next one is not mid-body."""
    reader = RequestReader(LIMITS)
    seen = []
    pieces = [data[i : i + 1] for i in range(len(data))] if mode == "bytes" else [data + (NEXT if mode == "trailing" else b"")]
    for piece in pieces:
        reader.feed(piece)
        if mode == "trailing":
            assert reader.body_start == reader.body_bytes and reader.events[-2][1].target == b"/next"
            seen.append((reader.mid_body, reader.body_bytes))
        else:
            seen.append((reader.mid_body, reader.body_bytes - reader.body_start))
    return seen


@pytest.mark.parametrize("mode", MODES)
def test_body_progress_counts_body_bytes_only(mode):
    head = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n"
    seen = _body_progress(head + b"hello", mode)
    assert seen[-1] == (False, 5)
    if mode == "bytes":
        # Nothing is a body before the head ends; then every byte counts, and the last ends it.
        assert seen[: len(head) - 1] == [(False, 0)] * (len(head) - 1)
        assert seen[len(head) - 1 :] == [(True, 0), (True, 1), (True, 2), (True, 3), (True, 4), (False, 5)]


@pytest.mark.parametrize("mode", MODES)
def test_chunk_framing_and_extensions_are_not_body_progress(mode):
    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    # A trickle of chunk extensions carries no body: the body clock must not see progress.
    stalling = head + b"5;" + b"x" * 200
    seen = _body_progress(stalling, "whole" if mode == "trailing" else mode)
    assert seen[-1] == (True, 0)
    seen = _body_progress(head + b"5;ext=1\r\nhello\r\n0\r\n\r\n", mode)
    assert seen[-1] == (False, 5)


def test_body_start_follows_each_request_of_a_connection():
    reader = RequestReader(LIMITS)
    reader.feed(b"POST /1 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc")
    assert (reader.mid_body, reader.body_bytes, reader.body_start) == (False, 3, 0)
    reader.feed(b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nde")
    assert (reader.mid_body, reader.body_bytes, reader.body_start) == (True, 5, 3)
    reader.feed(b"fgGET /3 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (reader.mid_body, reader.body_bytes, reader.body_start) == (False, 7, 7)
    # A head without a body (or with Content-Length: 0) is never mid-body.
    reader.feed(b"POST /4 HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
    assert not reader.mid_body


def test_expect_100_continue_is_noted():
    request = read(b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx")[0][1]
    assert request.expect_continue


def test_absolute_form_target_is_kept_for_the_edge():
    request = read(b"GET http://app.test/x HTTP/1.1\r\nHost: other\r\n\r\n")[0][1]
    assert request.target == b"http://app.test/x"


HOSTILE = {
    # request smuggling: ambiguous bodies
    "content-length and transfer-encoding": (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "transfer-encoding and content-length": (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n", 400),
    "duplicate content-length": (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    "conflicting content-length": (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde", 400),
    "content-length list": (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc", 400),
    "negative content-length": (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
    "huge content-length": (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n", 400),
    "transfer-encoding twice": (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "chunked not last": (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", 400),
    "other transfer coding": (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    "identity transfer coding": (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\nabc", 501),
    "transfer-encoding in http/1.0": (b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "bad chunk size": (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n", 400),
    "chunk size bare lf": (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n", 400),
    "chunk extension bare lf": (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;x\nabc\r\n0\r\n\r\n", 400),
    "chunk data too long": (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcd\r\n0\r\n\r\n", 400),
    # header syntax
    "obs-fold": (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n", 400),
    "bare lf after request line": (b"GET / HTTP/1.1\nHost: a\r\n\r\n", 400),
    "bare lf after header": (b"GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n", 400),
    "bare cr in header": (b"GET / HTTP/1.1\r\nHost: a\rX: y\r\n\r\n", 400),
    "cr injected in value": (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", 400),
    "nul in value": (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400),
    "control character in value": (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n", 400),
    "space before colon": (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    "space in name": (b"GET / HTTP/1.1\r\nHo st: a\r\n\r\n", 400),
    "no colon": (b"GET / HTTP/1.1\r\nHost: a\r\nX-Broken\r\n\r\n", 400),
    "cr lf in target": (b"GET /a\rb HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "space in target": (b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    # what the edge accepts
    "two hosts": (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "no host in http/1.1": (b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", 400),
    "http/2 request line": (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    "http/0.9": (b"GET /\r\n\r\n", 505),
    "connect": (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 405),
    "unknown method": (b"FROB / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "other expectation": (b"POST / HTTP/1.1\r\nHost: a\r\nExpect: magic\r\nContent-Length: 1\r\n\r\nx", 417),
    "upgrade with a body": (b"POST / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c\r\nContent-Length: 3\r\n\r\nabc", 400),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_requests_are_refused(case, mode):
    data, status = HOSTILE[case]
    assert refused(data, mode).status == status


SMALL = HttpLimits(max_request_line=64, max_header_bytes=256, max_headers=5)


@pytest.mark.parametrize("mode", MODES)
def test_long_target_is_414(mode):
    assert refused(b"GET /" + b"a" * 64 + b" HTTP/1.1\r\nHost: a\r\n\r\n", mode, SMALL).status == 414
    read(b"GET /" + b"a" * 63 + b" HTTP/1.1\r\nHost: a\r\n\r\n", mode, SMALL)


@pytest.mark.parametrize("mode", MODES)
def test_too_many_or_too_large_headers_are_431(mode):
    lines = b"".join(b"X-%d: 1\r\n" % i for i in range(5))
    assert refused(b"GET / HTTP/1.1\r\nHost: a\r\n" + lines + b"\r\n", mode, SMALL).status == 431
    assert refused(b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 260 + b"\r\n\r\n", mode, SMALL).status == 431


@pytest.mark.parametrize("mode", ["whole", "bytes"])
def test_trailers_count_against_the_header_limits(mode):
    trailers = b"".join(b"T-%d: 1\r\n" % i for i in range(10))
    data = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n" + trailers + b"\r\n"
    assert refused(data, mode, SMALL).status == 431


def test_endless_header_line_is_cut_off_without_buffering_it():
    reader = RequestReader(SMALL)
    reader.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX: ")
    with pytest.raises(HttpError) as info:
        for _ in range(10_000):
            reader.feed(b"v" * 1024)
    assert info.value.status == 431
    # Refused at the guard: the head plus slack, not the 10 MB offered.
    assert reader._head_bytes < SMALL.max_request_line + SMALL.max_header_bytes + 32 * 1024


def test_a_refused_reader_takes_no_more_input():
    reader = RequestReader(LIMITS)
    with pytest.raises(HttpError):
        reader.feed(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    with pytest.raises(HttpError):
        reader.feed(NEXT)
    assert not any(kind == HEAD for kind, _ in reader.events)


# ---------------------------------------------------------------------------- responses


def respond(data: bytes, *, head_request: bool = False, upgrade: bool = False, bytewise: bool = False, eof: bool = False):
    reader = ResponseReader(LIMITS)
    reader.expect(head_request, upgrade)
    if bytewise:
        for i in range(len(data)):
            reader.feed(data[i : i + 1])
    else:
        reader.feed(data)
    if eof:
        reader.eof()
    return reader, list(reader.events)


def _shape(events):
    out = []
    for kind, value in events:
        if kind == HEAD:
            out.append(("HEAD", value.status))
        elif kind == BODY:
            if out and out[-1][0] == "BODY":
                out[-1] = ("BODY", out[-1][1] + value)
            else:
                out.append(("BODY", value))
        else:
            out.append(({END: "END", UPGRADE: "UPGRADE"}[kind], value))
    return out


@pytest.mark.parametrize("bytewise", [False, True])
def test_response_framings(bytewise):
    _, events = respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", bytewise=bytewise)
    assert _shape(events) == [("HEAD", 200), ("BODY", b"hi"), ("END", None)] and events[0][1].framing == LENGTH
    _, events = respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n", bytewise=bytewise)
    assert _shape(events) == [("HEAD", 200), ("BODY", b"hi"), ("END", None)] and events[0][1].framing == CHUNKED
    _, events = respond(b"HTTP/1.0 200 OK\r\n\r\nuntil the end", bytewise=bytewise, eof=True)
    assert _shape(events) == [("HEAD", 200), ("BODY", b"until the end"), ("END", None)]
    assert events[0][1].framing == UNTIL_CLOSE and not events[0][1].keep_alive


def test_bodiless_responses():
    for status in (204, 304):
        _, events = respond(b"HTTP/1.1 %d X\r\nContent-Length: 5\r\n\r\n" % status)
        assert _shape(events) == [("HEAD", status), ("END", None)]


def test_response_to_head_has_no_body_and_the_next_response_parses():
    reader, events = respond(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", head_request=True)
    assert _shape(events) == [("HEAD", 200), ("END", None)]
    assert events[0][1].length == 1000
    reader.events.clear()
    reader.expect(False, False)
    reader.feed(b"HTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nx")
    assert _shape(reader.events) == [("HEAD", 201), ("BODY", b"x"), ("END", None)]


def test_interim_responses_come_before_the_final_one():
    _, events = respond(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert _shape(events) == [("HEAD", 100), ("HEAD", 200), ("END", None)]
    assert events[0][1].interim


def test_switching_protocols_only_for_an_upgrade_request():
    data = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nRAW"
    _, events = respond(data, upgrade=True)
    assert _shape(events) == [("HEAD", 101), ("UPGRADE", b"RAW")]
    with pytest.raises(HttpError) as info:
        respond(data)
    assert info.value.status == 502


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
        b"HTTP/1.1 200 OK\r\nX: a\rb\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/2 200 OK\r\n\r\n",
        b"SSH-2.0-OpenSSH\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(201)) + b"\r\n",
    ],
)
def test_malformed_responses_are_bad_gateway(data):
    with pytest.raises(HttpError) as info:
        respond(data)
    assert info.value.status == 502


def test_a_response_cut_short_is_bad_gateway():
    with pytest.raises(HttpError) as info:
        respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", eof=True)
    assert info.value.status == 502
    reader, _ = respond(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", eof=True)
    assert reader.idle


def test_connection_tokens_are_collected_for_hop_by_hop_removal():
    request = read(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Foo\r\nConnection: Upgrade\r\n\r\n")[0][1]
    assert request.connection == {b"keep-alive", b"x-foo", b"upgrade"}
    _, events = respond(b"HTTP/1.1 200 OK\r\nConnection: close, X-Bar\r\nContent-Length: 0\r\n\r\n")
    assert events[0][1].connection == {b"close", b"x-bar"}


def test_header_names_are_lowered_once_and_kept_beside_the_headers():
    request = read(b"GET / HTTP/1.1\r\nHOST: a\r\nX-Mixed-Case: 1\r\nConnection: X-Mixed-Case\r\n\r\n")[0][1]
    assert request.headers == [(b"HOST", b"a"), (b"X-Mixed-Case", b"1"), (b"Connection", b"X-Mixed-Case")]
    assert request.names == [b"host", b"x-mixed-case", b"connection"]
    assert request.host == b"a"
    _, events = respond(b"HTTP/1.1 200 OK\r\nContent-LENGTH: 2\r\nSet-Cookie: a=b\r\n\r\nok")
    assert events[0][1].names == [b"content-length", b"set-cookie"] and events[0][1].length == 2


@pytest.mark.parametrize("mode", MODES)
def test_refusals_keep_their_order_version_method_then_headers_in_order(mode):
    # Each header is looked at as it is read, its refusal raised with the complete head:
    # the version and the method come first, then the first header that breaks a rule.
    assert refused(b"GET / HTTP/2.0\r\nHost: a\r\nHost: b\r\n\r\n", mode).status == 505
    assert refused(b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\nExpect: x\r\n\r\n", mode).status == 405
    assert refused(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nExpect: x\r\n\r\n", mode).status == 400
    assert refused(b"GET / HTTP/1.1\r\nExpect: x\r\nHost: a\r\nHost: b\r\n\r\n", mode).status == 417
    assert refused(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\nExpect: x\r\n\r\n", mode).status == 501


# ---------------------------------------------------------------------- which build


def _reimport_reader(monkeypatch, env):
    for key in ("BACKHAUL_PURE", "BACKHAUL_REQUIRE_EXT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delitem(sys.modules, "backhaul.relay.http.reader", raising=False)
    return importlib.import_module("backhaul.relay.http.reader")


def test_the_build_under_test_is_the_one_the_environment_asks_for():
    from backhaul.relay.http import reader

    if os.environ.get("BACKHAUL_REQUIRE_EXT") == "1":
        assert reader.IMPLEMENTATION == "cython"
        assert type(reader.RequestReader(LIMITS)).__module__ == "backhaul.relay.http._reader_c"
    elif os.environ.get("BACKHAUL_PURE") == "1":
        assert reader.IMPLEMENTATION == "python"
        assert reader.RequestReader.__module__ == "backhaul.relay.http._reader_py"


def test_selector_honours_backhaul_pure(monkeypatch):
    reader = _reimport_reader(monkeypatch, {"BACKHAUL_PURE": "1"})
    from backhaul.relay.http import _reader_py

    assert reader.IMPLEMENTATION == "python" and reader.ResponseReader is _reader_py.ResponseReader


def test_selector_uses_the_extension_when_required(monkeypatch):
    try:
        importlib.import_module("backhaul.relay.http._reader_c")
    except ImportError as exc:
        if os.environ.get("BACKHAUL_REQUIRE_EXT") == "1":
            pytest.fail(f"the compiled HTTP reader is required but does not import: {exc}")
        pytest.skip("the compiled HTTP reader is not built")
    reader = _reimport_reader(monkeypatch, {"BACKHAUL_REQUIRE_EXT": "1"})
    assert reader.IMPLEMENTATION == "cython"
    assert not hasattr(reader.RequestReader(LIMITS), "__dict__"), "a cdef class, not the Python one"


def test_selector_refuses_the_fallback_when_the_extension_is_required(monkeypatch):
    monkeypatch.setitem(sys.modules, "backhaul.relay.http._reader_c", None)
    with pytest.raises(ImportError, match="bootstrap.sh"):
        _reimport_reader(monkeypatch, {"BACKHAUL_REQUIRE_EXT": "1"})


def test_selector_warns_loudly_when_falling_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "backhaul.relay.http._reader_c", None)
    with pytest.warns(RuntimeWarning, match="slow pure-Python twin"):
        reader = _reimport_reader(monkeypatch, {})
    assert reader.IMPLEMENTATION == "python"


def test_both_builds_raise_the_one_http_error():
    from backhaul.relay.http import _reader_py, errors

    assert _reader_py.HttpError is errors.HttpError
    try:
        compiled = importlib.import_module("backhaul.relay.http._reader_c")
    except ImportError:
        return  # (the build is checked by the tests above)
    with pytest.raises(errors.HttpError):
        compiled.RequestReader(LIMITS).feed(b"GET / HTTP/1.1\r\n\r\n")
