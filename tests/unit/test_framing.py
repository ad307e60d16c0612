"""The frame codec, run against both builds through the ``codec`` fixture."""

from __future__ import annotations

import importlib
import os
import pickle
import struct
import sys
import tracemalloc

import pytest

from backhaul.protocol import constants
from backhaul.protocol.constants import ErrorCode, Flag, FrameType

HEADER = struct.Struct(constants.HEADER_FORMAT)


def header(ftype, flags=0, stream_id=1, length=0, reserved=0) -> bytes:
    return HEADER.pack(ftype, flags, reserved, stream_id, length)


def drain(decoder) -> list:
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    return frames


# One builder per frame type: (encoder call, expected Frame fields).
CASES = {
    "data": (lambda e: e.data(2, b"hello"), [(FrameType.DATA, 0, 2, b"hello")]),
    "data_end": (lambda e: e.data(4, b"bye", end=True), [(FrameType.DATA, Flag.END, 4, b"bye")]),
    "data_empty_end": (lambda e: e.data(4, b"", end=True), [(FrameType.DATA, Flag.END, 4, b"")]),
    "open": (
        lambda e: e.open(2, b'{"app":"web","target":"10.0.0.5:80","proto":"tcp"}'),
        [(FrameType.OPEN, 0, 2, b'{"app":"web","target":"10.0.0.5:80","proto":"tcp"}')],
    ),
    "open_ok": (lambda e: e.open_ok(2), [(FrameType.OPEN_OK, 0, 2, b"")]),
    "open_fail": (
        lambda e: e.open_fail(2, ErrorCode.CONNECT_REFUSED, "refused ü"),
        [(FrameType.OPEN_FAIL, 0, 2, b"\x00\x07refused \xc3\xbc")],
    ),
    "fin": (lambda e: e.fin(6), [(FrameType.FIN, 0, 6, b"")]),
    "rst": (lambda e: e.rst(6, ErrorCode.CANCEL, "gone"), [(FrameType.RST, 0, 6, b"\x00\x06gone")]),
    "window_stream": (lambda e: e.window(2, 65536), [(FrameType.WINDOW, 0, 2, b"\x00\x01\x00\x00")]),
    "window_tunnel": (
        lambda e: e.window(0, constants.MAX_WINDOW),
        [(FrameType.WINDOW, 0, 0, b"\x7f\xff\xff\xff")],
    ),
    "ping": (lambda e: e.ping(b"\x01" * 8), [(FrameType.PING, 0, 0, b"\x01" * 8)]),
    "pong": (lambda e: e.pong(b"abcdefgh"), [(FrameType.PONG, 0, 0, b"abcdefgh")]),
    "datagram": (lambda e: e.datagram(9, b"\x00udp"), [(FrameType.DATAGRAM, 0, 9, b"\x00udp")]),
    "datagram_max": (
        lambda e: e.datagram(9, bytes(constants.MAX_DATAGRAM)),
        [(FrameType.DATAGRAM, 0, 9, bytes(constants.MAX_DATAGRAM))],
    ),
    "goaway": (
        lambda e: e.goaway(40, ErrorCode.NO_ERROR, "drain"),
        [(FrameType.GOAWAY, 0, 0, b"\x00\x00\x00\x28\x00\x00drain")],
    ),
    "control": (lambda e: e.control(b'{"type":"drain"}'), [(FrameType.CONTROL, 0, 0, b'{"type":"drain"}')]),
    "max_stream_id": (lambda e: e.fin(constants.MAX_STREAM_ID), [(FrameType.FIN, 0, constants.MAX_STREAM_ID, b"")]),
    "data_max_payload": (
        lambda e: e.data(2, b"z" * constants.MAX_PAYLOAD),
        [(FrameType.DATA, 0, 2, b"z" * constants.MAX_PAYLOAD)],
    ),
}


def encode(codec, build) -> bytes:
    encoder = codec.FrameEncoder()
    build(encoder)
    return bytes(encoder.take())


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("split", ["whole", "bytewise", "trailing"])
def test_every_frame_type_round_trips(codec, name, split):
    build, expected = CASES[name]
    wire = encode(codec, build)
    expected_frames = [codec.Frame(*fields) for fields in expected]
    decoder = codec.FrameDecoder()
    if split == "whole":
        decoder.feed(wire)
        frames = drain(decoder)
    elif split == "bytewise":
        if len(wire) > 4096:
            pytest.skip("byte-at-a-time is exercised on the small frames")
        frames = []
        for i in range(len(wire)):
            decoder.feed(wire[i : i + 1])
            frames += drain(decoder)
            if i < len(wire) - 1:
                assert frames == [], "a frame was returned before all its bytes arrived"
    else:
        partial = encode(codec, lambda e: e.data(8, b"next frame"))[:-3]
        decoder.feed(wire + partial)
        frames = drain(decoder)
        assert decoder.buffered == len(partial)
        with pytest.raises(codec.FrameError) as info:
            decoder.eof()
        assert info.value.code == ErrorCode.PROTOCOL_ERROR
    assert frames == expected_frames
    if split != "trailing":
        assert decoder.buffered == 0
        decoder.eof()


def test_frame_is_read_only_and_comparable(codec):
    frame = codec.Frame(FrameType.DATA, Flag.END, 2, b"x")
    with pytest.raises(AttributeError):
        frame.payload = b"y"
    with pytest.raises(AttributeError):
        frame.stream_id = 3
    assert frame == codec.Frame(0, 1, 2, b"x")
    assert frame != codec.Frame(0, 0, 2, b"x")
    assert hash(frame) == hash(codec.Frame(0, 1, 2, b"x"))
    assert "DATA" in repr(frame) and "stream_id=2" in repr(frame)
    assert (frame.type, frame.flags, frame.stream_id, frame.payload) == (0, 1, 2, b"x")
    with pytest.raises(ValueError):
        codec.Frame(0, 0, constants.MAX_STREAM_ID + 1, b"")
    with pytest.raises(ValueError):
        codec.Frame(256, 0, 1, b"")


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_feed_many_megabytes_at_once(codec, kind):
    encoder = codec.FrameEncoder()
    chunk = bytes(range(256)) * 256  # 64 KiB
    for stream_id in range(2, 2 + 2 * 64, 2):
        encoder.data(stream_id, chunk)
        encoder.window(stream_id, 1)
    wire = encoder.take()
    assert len(wire) > 4 * 1024 * 1024
    decoder = codec.FrameDecoder()
    decoder.feed(kind(wire))
    frames = drain(decoder)
    assert len(frames) == 128
    assert all(f.payload == chunk for f in frames[::2])
    assert [f.stream_id for f in frames[::2]] == list(range(2, 130, 2))
    assert decoder.buffered == 0


@pytest.mark.parametrize("read_size", [1, 7, 4096, 65536, 300_000])
def test_get_buffer_buffer_updated_path(codec, read_size):
    encoder = codec.FrameEncoder()
    payloads = [bytes([i]) * (i * 997) for i in range(40)]
    for i, payload in enumerate(payloads):
        encoder.data(2 * i + 2, payload, end=True)
    wire = bytes(encoder.take())
    decoder = codec.FrameDecoder()
    frames = []
    pos = 0
    while pos < len(wire):
        view = decoder.get_buffer(-1)
        assert len(view) >= 64 * 1024 and not view.readonly
        n = min(read_size, len(view), len(wire) - pos)
        view[:n] = wire[pos : pos + n]
        pos += n
        # asyncio still holds the view while buffer_updated runs; the decoder must cope.
        decoder.buffer_updated(n)
        frames += drain(decoder)
        view.release()
    assert [f.payload for f in frames] == payloads
    assert all(f.flags == Flag.END for f in frames)
    decoder.eof()


def test_buffer_updated_rejects_more_than_given(codec):
    decoder = codec.FrameDecoder()
    view = decoder.get_buffer(-1)
    with pytest.raises(ValueError):
        decoder.buffer_updated(len(view) + 1)
    with pytest.raises(ValueError):
        decoder.buffer_updated(-1)


def test_stale_view_does_not_block_growth(codec):
    decoder = codec.FrameDecoder()
    stale = decoder.get_buffer(-1)
    wire = encode(codec, lambda e: e.data(2, b"q" * 200_000))
    decoder.feed(wire)  # must not try to resize a buffer the stale view still exports
    assert drain(decoder)[0].payload == b"q" * 200_000
    stale.release()


W = constants.MAX_WINDOW
MALFORMED = [
    ("unknown type", header(0x0C, 0, 1, 0), ErrorCode.PROTOCOL_ERROR),
    ("unknown type 0xff", header(0xFF, 0, 1, 0), ErrorCode.PROTOCOL_ERROR),
    ("reserved bits", header(FrameType.DATA, 0, 1, 0, reserved=1), ErrorCode.PROTOCOL_ERROR),
    ("reserved high bit", header(FrameType.PING, 0, 0, 8, reserved=0x8000) + bytes(8), ErrorCode.PROTOCOL_ERROR),
    ("undefined DATA flag", header(FrameType.DATA, 0x02, 1, 0), ErrorCode.PROTOCOL_ERROR),
    ("END on FIN", header(FrameType.FIN, Flag.END, 1, 0), ErrorCode.PROTOCOL_ERROR),
    ("END on OPEN", header(FrameType.OPEN, Flag.END, 1, 2) + b"{}", ErrorCode.PROTOCOL_ERROR),
    ("oversize DATA", header(FrameType.DATA, 0, 1, constants.MAX_PAYLOAD + 1), ErrorCode.FRAME_SIZE_ERROR),
    ("oversize length 2**32-1", header(FrameType.DATA, 0, 1, 0xFFFFFFFF), ErrorCode.FRAME_SIZE_ERROR),
    ("oversize OPEN", header(FrameType.OPEN, 0, 1, constants.MAX_CONTROL_PAYLOAD + 1), ErrorCode.FRAME_SIZE_ERROR),
    ("oversize CONTROL", header(FrameType.CONTROL, 0, 0, constants.MAX_CONTROL_PAYLOAD + 1), ErrorCode.FRAME_SIZE_ERROR),
    ("oversize DATAGRAM", header(FrameType.DATAGRAM, 0, 1, constants.MAX_DATAGRAM + 1), ErrorCode.FRAME_SIZE_ERROR),
    ("oversize RST reason", header(FrameType.RST, 0, 1, 2 + constants.MAX_REASON + 1), ErrorCode.FRAME_SIZE_ERROR),
    ("PING on a stream", header(FrameType.PING, 0, 3, 8) + bytes(8), ErrorCode.PROTOCOL_ERROR),
    ("PONG on a stream", header(FrameType.PONG, 0, 3, 8) + bytes(8), ErrorCode.PROTOCOL_ERROR),
    ("GOAWAY on a stream", header(FrameType.GOAWAY, 0, 3, 6) + bytes(6), ErrorCode.PROTOCOL_ERROR),
    ("CONTROL on a stream", header(FrameType.CONTROL, 0, 3, 2) + b"{}", ErrorCode.PROTOCOL_ERROR),
    ("DATA on stream 0", header(FrameType.DATA, 0, 0, 1) + b"x", ErrorCode.PROTOCOL_ERROR),
    ("OPEN on stream 0", header(FrameType.OPEN, 0, 0, 2) + b"{}", ErrorCode.PROTOCOL_ERROR),
    ("OPEN_OK on stream 0", header(FrameType.OPEN_OK, 0, 0, 0), ErrorCode.PROTOCOL_ERROR),
    ("OPEN_FAIL on stream 0", header(FrameType.OPEN_FAIL, 0, 0, 2) + bytes(2), ErrorCode.PROTOCOL_ERROR),
    ("FIN on stream 0", header(FrameType.FIN, 0, 0, 0), ErrorCode.PROTOCOL_ERROR),
    ("RST on stream 0", header(FrameType.RST, 0, 0, 2) + bytes(2), ErrorCode.PROTOCOL_ERROR),
    ("DATAGRAM on stream 0", header(FrameType.DATAGRAM, 0, 0, 1) + b"x", ErrorCode.PROTOCOL_ERROR),
    ("PING of 7", header(FrameType.PING, 0, 0, 7) + bytes(7), ErrorCode.FRAME_SIZE_ERROR),
    ("PONG of 9", header(FrameType.PONG, 0, 0, 9) + bytes(9), ErrorCode.FRAME_SIZE_ERROR),
    ("WINDOW of 3", header(FrameType.WINDOW, 0, 1, 3) + bytes(3), ErrorCode.FRAME_SIZE_ERROR),
    ("WINDOW of 5", header(FrameType.WINDOW, 0, 0, 5) + bytes(5), ErrorCode.FRAME_SIZE_ERROR),
    ("WINDOW zero increment", header(FrameType.WINDOW, 0, 1, 4) + bytes(4), ErrorCode.PROTOCOL_ERROR),
    ("WINDOW increment 2**31", header(FrameType.WINDOW, 0, 0, 4) + (W + 1).to_bytes(4, "big"), ErrorCode.PROTOCOL_ERROR),
    ("OPEN_OK with payload", header(FrameType.OPEN_OK, 0, 1, 1) + b"x", ErrorCode.FRAME_SIZE_ERROR),
    ("FIN with payload", header(FrameType.FIN, 0, 1, 1) + b"x", ErrorCode.FRAME_SIZE_ERROR),
    ("OPEN_FAIL of 1", header(FrameType.OPEN_FAIL, 0, 1, 1) + b"x", ErrorCode.FRAME_SIZE_ERROR),
    ("RST of 0", header(FrameType.RST, 0, 1, 0), ErrorCode.FRAME_SIZE_ERROR),
    ("GOAWAY of 5", header(FrameType.GOAWAY, 0, 0, 5) + bytes(5), ErrorCode.FRAME_SIZE_ERROR),
]


@pytest.mark.parametrize("wire,code", [(w, c) for _, w, c in MALFORMED], ids=[n for n, _, _ in MALFORMED])
@pytest.mark.parametrize("split", ["whole", "bytewise"])
def test_malformed_input_is_rejected_with_its_code(codec, wire, code, split):
    good = encode(codec, lambda e: e.data(2, b"before"))
    decoder = codec.FrameDecoder()
    pieces = [good + wire] if split == "whole" else [bytes([b]) for b in good + wire]
    frames = []
    with pytest.raises(codec.FrameError) as info:
        for piece in pieces:
            decoder.feed(piece)
            while (frame := decoder.next_frame()) is not None:
                frames.append(frame)
    assert frames == [codec.Frame(0, 0, 2, b"before")], "frames before the bad one are delivered"
    assert info.value.code == code
    assert isinstance(info.value.args[0], str) and info.value.args[0]


def test_oversize_is_detected_before_the_payload_arrives(codec):
    decoder = codec.FrameDecoder(max_payload=1000)
    decoder.feed(header(FrameType.DATA, 0, 2, 1001))
    with pytest.raises(codec.FrameError) as info:
        decoder.next_frame()
    assert info.value.code == ErrorCode.FRAME_SIZE_ERROR
    assert "1001" in info.value.args[0] and "DATA" in info.value.args[0]


def test_error_message_names_type_stream_and_value(codec):
    decoder = codec.FrameDecoder()
    decoder.feed(header(FrameType.PING, 0, 77, 8) + bytes(8))
    with pytest.raises(codec.FrameError) as info:
        decoder.next_frame()
    assert "PING" in info.value.args[0] and "77" in info.value.args[0]


def test_decoder_is_poisoned_after_an_error(codec):
    decoder = codec.FrameDecoder()
    decoder.feed(header(0x0D, 0, 1, 0))
    with pytest.raises(codec.FrameError) as first:
        decoder.next_frame()
    for call in (
        decoder.next_frame,
        decoder.eof,
        lambda: decoder.feed(encode(codec, lambda e: e.fin(2))),
        lambda: decoder.get_buffer(-1),
        lambda: decoder.buffer_updated(0),
    ):
        with pytest.raises(codec.FrameError) as again:
            call()
        assert again.value.code == first.value.code == ErrorCode.PROTOCOL_ERROR
        assert again.value.args == first.value.args


def test_truncation_is_an_error_only_at_eof(codec):
    wire = encode(codec, lambda e: e.data(2, b"abcdef", end=True))
    for cut in (1, constants.HEADER_SIZE - 1, constants.HEADER_SIZE, len(wire) - 1):
        decoder = codec.FrameDecoder()
        decoder.feed(wire[:cut])
        assert decoder.next_frame() is None
        assert decoder.buffered == cut
        with pytest.raises(codec.FrameError) as info:
            decoder.eof()
        assert info.value.code == ErrorCode.PROTOCOL_ERROR
    clean = codec.FrameDecoder()
    clean.feed(wire)
    assert drain(clean)
    clean.eof()


def test_decoder_max_payload_must_be_sane(codec):
    for bad in (0, -1, constants.MAX_PAYLOAD + 1):
        with pytest.raises(ValueError):
            codec.FrameDecoder(max_payload=bad)
        with pytest.raises(ValueError):
            codec.FrameEncoder(max_payload=bad)


def test_encoder_splits_with_end_only_on_the_last(codec):
    encoder = codec.FrameEncoder(max_payload=1000)
    payload = bytes(range(250)) * 14  # 3500 bytes
    encoder.data(2, payload, end=True)
    encoder.data(4, memoryview(payload)[:2000])
    encoder.data(6, b"", end=False)
    decoder = codec.FrameDecoder()
    decoder.feed(encoder.take())
    frames = drain(decoder)
    on_2 = [f for f in frames if f.stream_id == 2]
    assert [len(f.payload) for f in on_2] == [1000, 1000, 1000, 500]
    assert [f.flags for f in on_2] == [0, 0, 0, Flag.END]
    assert b"".join(f.payload for f in on_2) == payload
    on_4 = [f for f in frames if f.stream_id == 4]
    assert [(len(f.payload), f.flags) for f in on_4] == [(1000, 0), (1000, 0)]
    assert not [f for f in frames if f.stream_id == 6], "empty DATA without END sends nothing"


def test_take_hands_the_buffer_over(codec):
    encoder = codec.FrameEncoder()
    assert encoder.pending == 0
    assert encoder.take() == b""
    encoder.fin(2)
    assert encoder.pending == constants.HEADER_SIZE
    taken = encoder.take()
    assert isinstance(taken, bytearray)
    snapshot = bytes(taken)
    assert encoder.pending == 0
    encoder.data(2, b"more" * 100)
    assert bytes(taken) == snapshot, "the encoder touched a buffer it had handed over"
    second = encoder.take()
    assert second is not taken
    assert len(second) == constants.HEADER_SIZE + 400
    assert encoder.take() == b""


@pytest.mark.parametrize(
    "misuse",
    [
        lambda e: e.data(0, b"x"),
        lambda e: e.data(-1, b"x"),
        lambda e: e.data(constants.MAX_STREAM_ID + 1, b"x"),
        lambda e: e.open(0, b"{}"),
        lambda e: e.open(2, b"x" * (constants.MAX_CONTROL_PAYLOAD + 1)),
        lambda e: e.open_ok(0),
        lambda e: e.open_fail(2, 0x10000, "x"),
        lambda e: e.open_fail(2, -1, "x"),
        lambda e: e.fin(0),
        lambda e: e.rst(0, 1, "x"),
        lambda e: e.window(1, 0),
        lambda e: e.window(0, constants.MAX_WINDOW + 1),
        lambda e: e.window(-1, 5),
        lambda e: e.ping(b"1234567"),
        lambda e: e.pong(b"123456789"),
        lambda e: e.datagram(0, b"x"),
        lambda e: e.datagram(1, bytes(constants.MAX_DATAGRAM + 1)),
        lambda e: e.goaway(constants.MAX_STREAM_ID + 1, 0, "x"),
        lambda e: e.control(b"x" * (constants.MAX_CONTROL_PAYLOAD + 1)),
    ],
)
def test_encoder_rejects_misuse(codec, misuse):
    encoder = codec.FrameEncoder()
    with pytest.raises(ValueError):
        misuse(encoder)
    assert encoder.pending == 0, "a rejected call must not leave a partial frame behind"


def test_encoder_rejects_non_integer_ids(codec):
    with pytest.raises(TypeError):
        codec.FrameEncoder().fin(2.0)


def test_reason_is_truncated_at_a_character_boundary(codec):
    encoder = codec.FrameEncoder()
    reason = "é" * 600 + "tail"  # 1204 UTF-8 bytes; the cut at 1024 falls on a boundary of 2-byte chars
    encoder.rst(2, ErrorCode.CANCEL, "x" + reason)  # shifted by one so the cut splits a character
    encoder.goaway(2, ErrorCode.GOING_AWAY, reason)
    encoder.open_fail(4, ErrorCode.INTERNAL_ERROR, "bad \udcff surrogate")
    decoder = codec.FrameDecoder()
    decoder.feed(encoder.take())
    rst, goaway, fail = drain(decoder)
    code, text = codec.parse_error_payload(rst.payload)
    assert code == ErrorCode.CANCEL
    assert len(text.encode()) == constants.MAX_REASON - 1
    assert text == ("x" + reason)[: len(text)]
    last, code, text = codec.parse_goaway(goaway.payload)
    assert (last, code, len(text.encode())) == (2, ErrorCode.GOING_AWAY, constants.MAX_REASON)
    assert codec.parse_error_payload(fail.payload) == (ErrorCode.INTERNAL_ERROR, "bad ? surrogate")


def test_parse_helpers(codec):
    assert codec.parse_error_payload(b"\x00\x05") == (5, "")
    assert codec.parse_window(b"\x00\x00\x10\x00") == 4096
    assert codec.parse_goaway(b"\x00\x00\x00\x02\x00\x0fbye") == (2, 15, "bye")
    bad = [
        (codec.parse_error_payload, b"\x00", ErrorCode.FRAME_SIZE_ERROR),
        (codec.parse_error_payload, b"\x00\x01\xff\xfe", ErrorCode.PROTOCOL_ERROR),
        (codec.parse_error_payload, b"\x00\x01" + b"r" * (constants.MAX_REASON + 1), ErrorCode.FRAME_SIZE_ERROR),
        (codec.parse_goaway, b"\x00\x00\x00\x02\x00", ErrorCode.FRAME_SIZE_ERROR),
        (codec.parse_goaway, b"\x00\x00\x00\x02\x00\x00\xc3", ErrorCode.PROTOCOL_ERROR),
        (codec.parse_window, b"\x00\x00\x01", ErrorCode.FRAME_SIZE_ERROR),
        (codec.parse_window, b"\x00\x00\x00\x00", ErrorCode.PROTOCOL_ERROR),
        (codec.parse_window, b"\x80\x00\x00\x00", ErrorCode.PROTOCOL_ERROR),
    ]
    for parse, payload, code in bad:
        with pytest.raises(codec.FrameError) as info:
            parse(payload)
        assert info.value.code == code, (parse, payload)


def test_frame_error_carries_code_and_message(codec):
    error = codec.FrameError("bad thing", ErrorCode.FRAME_SIZE_ERROR)
    assert error.code == ErrorCode.FRAME_SIZE_ERROR and error.args[0] == "bad thing"
    again = pickle.loads(pickle.dumps(error))
    assert (again.code, again.args) == (error.code, error.args)


@pytest.mark.parametrize("chunk_size", [1000, 64 * 1024, 1024 * 1024])
def test_decoder_memory_is_bounded(codec, chunk_size):
    max_payload = 64 * 1024
    encoder = codec.FrameEncoder(max_payload=max_payload)
    for i in range(24):
        encoder.data(2 * i + 2, b"m" * (max_payload - i * 1000))
        encoder.ping(b"p" * 8)
    wire = bytes(encoder.take())
    decoder = codec.FrameDecoder(max_payload=max_payload)
    bound = constants.HEADER_SIZE + max_payload + chunk_size
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        worst = 0
        received = 0
        for pos in range(0, len(wire), chunk_size):
            decoder.feed(wire[pos : pos + chunk_size])
            # Measured with no frame held, so only the decoder's own buffer remains.
            while (frame := decoder.next_frame()) is not None:
                received += len(frame.payload)
                del frame
                worst = max(worst, tracemalloc.get_traced_memory()[0] - baseline)
            worst = max(worst, tracemalloc.get_traced_memory()[0] - baseline)
    finally:
        tracemalloc.stop()
    assert received == sum(max_payload - i * 1000 + 8 for i in range(24))
    # Allow a few KiB for the chunk slice and the interpreter's own bookkeeping.
    assert worst <= bound + 8 * 1024, f"decoder held {worst} bytes; bound is {bound}"


def test_decoder_releases_a_huge_buffer_once_drained(codec):
    decoder = codec.FrameDecoder()
    wire = encode(codec, lambda e: e.data(2, bytes(8 * 1024 * 1024)))
    tracemalloc.start()
    try:
        decoder.feed(wire)
        assert sum(len(f.payload) for f in drain(decoder)) == 8 * 1024 * 1024
        del wire
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < 1024 * 1024, f"decoder kept {held} bytes after draining"


def _reimport_framing(monkeypatch, env):
    for key in ("BACKHAUL_PURE", "BACKHAUL_REQUIRE_EXT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delitem(sys.modules, "backhaul.protocol.framing", raising=False)
    return importlib.import_module("backhaul.protocol.framing")


def test_selector_honours_backhaul_pure(monkeypatch):
    framing = _reimport_framing(monkeypatch, {"BACKHAUL_PURE": "1"})
    assert framing.IMPLEMENTATION == "python"
    from backhaul.protocol import _framing_py

    assert framing.FrameDecoder is _framing_py.FrameDecoder
    assert framing.parse_goaway is _framing_py.parse_goaway


def test_selector_warns_loudly_when_falling_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "backhaul.protocol._framing_c", None)
    with pytest.warns(RuntimeWarning, match="slow pure-Python twin"):
        framing = _reimport_framing(monkeypatch, {})
    assert framing.IMPLEMENTATION == "python"


def test_selector_refuses_fallback_when_ext_required(monkeypatch):
    monkeypatch.setitem(sys.modules, "backhaul.protocol._framing_c", None)
    with pytest.raises(ImportError, match="bootstrap.sh"):
        _reimport_framing(monkeypatch, {"BACKHAUL_REQUIRE_EXT": "1"})


def test_selector_uses_the_extension_when_built(monkeypatch):
    try:
        importlib.import_module("backhaul.protocol._framing_c")
    except ImportError as exc:
        if os.environ.get("BACKHAUL_REQUIRE_EXT") == "1":
            pytest.fail(f"the Cython codec is required but does not import: {exc}")
        pytest.skip("Cython codec not built")
    framing = _reimport_framing(monkeypatch, {"BACKHAUL_REQUIRE_EXT": "1"})
    assert framing.IMPLEMENTATION == "cython"


def test_frames_are_counted_both_ways(codec):
    encoder = codec.FrameEncoder(max_payload=4)
    encoder.data(1, b"0123456789", end=True)  # three DATA frames
    encoder.window(0, 5)
    encoder.ping(b"12345678")
    assert encoder.frames == 5
    decoder = codec.FrameDecoder()
    wire = bytes(encoder.take())
    decoder.feed(wire[:-3])
    assert len(drain(decoder)) == 4
    assert decoder.frames == 4, "a frame not yet complete must not be counted"
    decoder.feed(wire[-3:])
    drain(decoder)
    assert decoder.frames == 5
