"""Differential and fuzz tests: the pure twin and the Cython build must agree byte for byte."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backhaul.protocol import constants

# The codec fixtures hand out modules, which hold no state between examples.
QUIET = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=QUIET)

stream_ids = st.integers(1, constants.MAX_STREAM_ID)
codes = st.integers(0, 0xFFFF)
reasons = st.text(max_size=40)
small = st.binary(max_size=64)

calls = st.one_of(
    st.tuples(st.just("data"), stream_ids, st.binary(max_size=3000), st.booleans()),
    st.tuples(st.just("open"), stream_ids, small),
    st.tuples(st.just("open_ok"), stream_ids),
    st.tuples(st.just("open_fail"), stream_ids, codes, reasons),
    st.tuples(st.just("fin"), stream_ids),
    st.tuples(st.just("rst"), stream_ids, codes, reasons),
    st.tuples(st.just("window"), st.integers(0, constants.MAX_STREAM_ID), st.integers(1, constants.MAX_WINDOW)),
    st.tuples(st.just("ping"), st.binary(min_size=8, max_size=8)),
    st.tuples(st.just("pong"), st.binary(min_size=8, max_size=8)),
    st.tuples(st.just("datagram"), stream_ids, small),
    st.tuples(st.just("goaway"), st.integers(0, constants.MAX_STREAM_ID), codes, reasons),
    st.tuples(st.just("control"), small),
)


def run(decoder, pieces):
    """Feed pieces, collecting frames; returns (frames as tuples, error code or None)."""
    frames = []
    try:
        for piece in pieces:
            decoder.feed(piece)
            while (frame := decoder.next_frame()) is not None:
                frames.append((frame.type, frame.flags, frame.stream_id, frame.payload))
        decoder.eof()
    except Exception as exc:  # noqa: BLE001 - the outcome itself is what is compared
        return frames, (type(exc).__name__, getattr(exc, "code", None))
    return frames, None


def split(wire: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(wire) + 1) for c in cuts})
    edges = [0, *points, len(wire)]
    return [wire[a:b] for a, b in zip(edges, edges[1:])]


@SETTINGS
@given(sequence=st.lists(calls, max_size=12), cuts=st.lists(st.integers(0, 10**6), max_size=8),
       max_payload=st.sampled_from([1000, constants.MAX_PAYLOAD]), encoder_side=st.booleans())
def test_valid_streams_decode_identically(both_codecs, sequence, cuts, max_payload, encoder_side):
    pure, compiled = both_codecs
    encoders = [pure.FrameEncoder(max_payload=max_payload), compiled.FrameEncoder(max_payload=max_payload)]
    for name, *args in sequence:
        for encoder in encoders:
            getattr(encoder, name)(*args)
    wires = [bytes(e.take()) for e in encoders]
    assert wires[0] == wires[1], "the two encoders wrote different bytes"
    pieces = split(wires[encoder_side], cuts)
    py_frames, py_error = run(pure.FrameDecoder(), pieces)
    c_frames, c_error = run(compiled.FrameDecoder(), pieces)
    assert py_error is None and c_error is None
    assert py_frames == c_frames
    expected_count = 0
    for name, *args in sequence:
        if name == "data":
            expected_count += max(1 if args[2] else 0, -(-len(args[1]) // max_payload))
        else:
            expected_count += 1
    assert len(py_frames) == expected_count


frame_headers = st.builds(
    struct.Struct(constants.HEADER_FORMAT).pack,
    st.integers(0, 0x0F),
    st.sampled_from([0, 0, 0, 1, 2, 0x80]),
    st.sampled_from([0, 0, 0, 1]),
    st.sampled_from([0, 1, 2, 3, constants.MAX_STREAM_ID]),
    st.sampled_from([0, 1, 2, 4, 6, 8, 9, 100, 1031, 1032, 16384, 16385, 65508, 0xFFFFFFFF]),
)
garbage = st.lists(st.one_of(st.binary(max_size=40), frame_headers), max_size=10).map(b"".join)


@SETTINGS
@given(wire=garbage, cuts=st.lists(st.integers(0, 10**6), max_size=6))
def test_garbage_has_the_same_outcome_on_both(both_codecs, wire, cuts):
    pure, compiled = both_codecs
    pieces = split(wire, cuts)
    py = run(pure.FrameDecoder(), pieces)
    c = run(compiled.FrameDecoder(), pieces)
    assert py == c
    if py[1] is not None:
        assert py[1][0] == "FrameError", "malformed input must raise FrameError, nothing else"


@settings(max_examples=300, deadline=None, suppress_health_check=QUIET)
@given(wire=st.binary(max_size=600), cuts=st.lists(st.integers(0, 1000), max_size=5))
def test_random_bytes_never_crash_or_hang(codec, wire, cuts):
    frames, error = run(codec.FrameDecoder(max_payload=512), split(wire, cuts))
    assert error is None or error[0] == "FrameError"
    consumed = sum(constants.HEADER_SIZE + len(f[3]) for f in frames)
    assert consumed <= len(wire)
    if error is None:
        assert consumed == len(wire), "eof() passed although bytes were left over"


@pytest.mark.parametrize("payload", [b"", b"\x00", b"\x00\x01\x80", b"\xff" * 10])
def test_parse_helpers_agree(both_codecs, payload):
    pure, compiled = both_codecs
    for name in ("parse_error_payload", "parse_window", "parse_goaway"):
        outcomes = []
        for module in (pure, compiled):
            try:
                outcomes.append(getattr(module, name)(payload))
            except module.FrameError as exc:
                outcomes.append(("FrameError", exc.code))
        assert outcomes[0] == outcomes[1], name
