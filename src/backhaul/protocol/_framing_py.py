"""The tunnel frame codec: one source, two builds.

Run as plain Python this module is the pure twin. Cython compiles the very same file
(ext/backhaul/protocol/_framing_c.py is a symlink to it) with the types declared in
ext/backhaul/protocol/_framing_c.pxd; branches on ``cython.compiled`` then take the
pointer paths, everything else is shared so both builds behave identically.
``backhaul.protocol.framing`` picks one. See docs/protocol.md for the wire format.
"""

from __future__ import annotations

import operator
import struct

import cython

from backhaul.protocol import constants
from backhaul.protocol.constants import ErrorCode, FrameType

if not cython.compiled:
    # The compiled build gets these from the .pxd cimports; the pure twin never calls them.
    PyByteArray_AS_STRING = PyByteArray_FromStringAndSize = PyByteArray_Resize = None
    PyObject_GetBuffer = PyBuffer_Release = PyBUF_SIMPLE = Py_buffer = None
    PyBytes_FromStringAndSize = memcpy = memmove = None

_HEADER = struct.Struct(constants.HEADER_FORMAT)

HEADER_SIZE = cython.declare(cython.Py_ssize_t, constants.HEADER_SIZE)
#: Free space get_buffer() guarantees: one socket read.
READ_CHUNK = cython.declare(cython.Py_ssize_t, 64 * 1024)

_DATA = cython.declare(cython.int, int(FrameType.DATA))
_OPEN = cython.declare(cython.int, int(FrameType.OPEN))
_OPEN_OK = cython.declare(cython.int, int(FrameType.OPEN_OK))
_OPEN_FAIL = cython.declare(cython.int, int(FrameType.OPEN_FAIL))
_FIN = cython.declare(cython.int, int(FrameType.FIN))
_RST = cython.declare(cython.int, int(FrameType.RST))
_WINDOW = cython.declare(cython.int, int(FrameType.WINDOW))
_PING = cython.declare(cython.int, int(FrameType.PING))
_PONG = cython.declare(cython.int, int(FrameType.PONG))
_DATAGRAM = cython.declare(cython.int, int(FrameType.DATAGRAM))
_GOAWAY = cython.declare(cython.int, int(FrameType.GOAWAY))
_CONTROL = cython.declare(cython.int, int(FrameType.CONTROL))
_MAX_TYPE = cython.declare(cython.int, int(max(FrameType)))
_END = cython.declare(cython.int, int(constants.Flag.END))

_MAX_PAYLOAD = cython.declare(cython.Py_ssize_t, constants.MAX_PAYLOAD)
_MAX_CONTROL = cython.declare(cython.Py_ssize_t, constants.MAX_CONTROL_PAYLOAD)
_MAX_DATAGRAM = cython.declare(cython.Py_ssize_t, constants.MAX_DATAGRAM)
_MAX_REASON = cython.declare(cython.Py_ssize_t, constants.MAX_REASON)
_MAX_WINDOW = cython.declare(cython.longlong, constants.MAX_WINDOW)
_MAX_STREAM_ID = cython.declare(cython.longlong, constants.MAX_STREAM_ID)
_PING_SIZE = cython.declare(cython.Py_ssize_t, constants.PING_PAYLOAD_SIZE)
_WINDOW_SIZE = cython.declare(cython.Py_ssize_t, constants.WINDOW_PAYLOAD_SIZE)
_CODE_SIZE = cython.declare(cython.Py_ssize_t, constants.ERROR_CODE_SIZE)
_GOAWAY_FIXED = cython.declare(cython.Py_ssize_t, constants.GOAWAY_FIXED_SIZE)
_STREAM_ID_SIZE = cython.declare(cython.Py_ssize_t, constants.STREAM_ID_SIZE)


class FrameError(Exception):
    """The peer sent bytes that break the tunnel protocol; ``code`` is the ErrorCode to close with."""

    def __init__(self, message: str, code: int = ErrorCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = int(code)

    def __reduce__(self):
        return (type(self), (self.args[0], self.code))


def _type_name(ftype) -> str:
    try:
        return FrameType(ftype).name
    except ValueError:
        return f"0x{ftype:02x}"


class Frame:
    """One decoded or hand-built frame. Immutable."""

    __slots__ = ("type", "flags", "stream_id", "payload")

    def __init__(self, type, flags, stream_id, payload) -> None:
        if not 0 <= type <= 0xFF or not 0 <= flags <= 0xFF:
            raise ValueError(f"frame type {type!r} and flags {flags!r} must each fit in one byte")
        if not 0 <= stream_id <= _MAX_STREAM_ID:
            raise ValueError(f"stream id {stream_id!r} is outside 0..{_MAX_STREAM_ID}")
        if not isinstance(payload, bytes):
            payload = bytes(payload)
        if cython.compiled:
            self.type = type
            self.flags = flags
            self.stream_id = stream_id
            self.payload = payload
        else:
            setter = object.__setattr__
            setter(self, "type", type)
            setter(self, "flags", flags)
            setter(self, "stream_id", stream_id)
            setter(self, "payload", payload)

    def __setattr__(self, name, value):
        raise AttributeError(f"Frame is read-only; cannot set {name!r}")

    def __delattr__(self, name):
        raise AttributeError(f"Frame is read-only; cannot delete {name!r}")

    def __eq__(self, other):
        if not isinstance(other, Frame):
            return NotImplemented
        return (
            self.type == other.type
            and self.flags == other.flags
            and self.stream_id == other.stream_id
            and self.payload == other.payload
        )

    def __ne__(self, other):
        result = self.__eq__(other)
        if result is NotImplemented:
            return result
        return not result

    def __hash__(self):
        return hash((self.type, self.flags, self.stream_id, self.payload))

    def __repr__(self):
        shown = self.payload[:32]
        more = "..." if len(self.payload) > 32 else ""
        return (
            f"Frame({_type_name(self.type)}, flags=0x{self.flags:02x}, stream_id={self.stream_id}, "
            f"payload={shown!r}{more} ({len(self.payload)} bytes))"
        )


def _new_frame(ftype, flags, sid, payload):
    """Build a decoded frame without re-validating what the decoder already checked."""
    if cython.compiled:
        frame: Frame = Frame.__new__(Frame)
        frame.type = ftype
        frame.flags = flags
        frame.stream_id = sid
        frame.payload = payload
    else:
        frame = Frame(ftype, flags, sid, payload)
    return frame


class FrameDecoder:
    """Turns the tunnel's byte stream into Frames, validating every header on arrival.

    Bytes live in one bytearray between a read cursor and a write cursor. It is never
    resized in place (a caller may still hold the view get_buffer() returned); growing or
    shrinking swaps in a new one. It holds at most one partial frame plus one feed.
    """

    def __init__(self, max_payload=constants.MAX_PAYLOAD) -> None:
        if not 0 < max_payload <= _MAX_PAYLOAD:
            raise ValueError(f"max_payload must be within 1..{_MAX_PAYLOAD}, not {max_payload!r}")
        self._max_payload = max_payload
        self._base = HEADER_SIZE + max_payload + READ_CHUNK
        self._buf = bytearray()
        self._start = 0
        self._end = 0
        self._error = None
        #: frames returned so far (read by metrics; a plain counter, no call per frame)
        self.frames = 0

    @property
    def buffered(self):
        """Bytes held that are not yet returned as frames."""
        return self._end - self._start

    def _raise_if_failed(self):
        if self._error is not None:
            raise self._error.with_traceback(None)

    def _fail(self, message, code):
        """Poison the decoder: this error is raised by every later call."""
        self._error = FrameError(message, code)
        self._buf = bytearray()
        self._start = 0
        self._end = 0
        raise self._error

    def _reserve(self, n):
        """Make at least ``n`` bytes of free space after the write cursor."""
        unread: cython.Py_ssize_t = self._end - self._start
        capacity: cython.Py_ssize_t = len(self._buf)
        need: cython.Py_ssize_t = unread + n
        newcap: cython.Py_ssize_t
        if capacity > self._base and need <= self._base:
            newcap = self._base
        elif capacity - self._end >= n:
            return
        elif need <= capacity:
            if unread:
                if cython.compiled:
                    base: cython.p_char = PyByteArray_AS_STRING(self._buf)
                    memmove(base, base + self._start, unread)
                else:
                    self._buf[:unread] = self._buf[self._start : self._end]
            self._start = 0
            self._end = unread
            return
        else:
            # Doubling amortises small feeds; the cap keeps one frame plus this feed the most ever held.
            newcap = max(need, min(2 * capacity, HEADER_SIZE + self._max_payload + n))
        if cython.compiled:
            fresh: bytearray = PyByteArray_FromStringAndSize(cython.NULL, newcap)
            if unread:
                memcpy(PyByteArray_AS_STRING(fresh), PyByteArray_AS_STRING(self._buf) + self._start, unread)
        else:
            fresh = bytearray(newcap)
            fresh[:unread] = self._buf[self._start : self._end]
        self._buf = fresh
        self._start = 0
        self._end = unread

    def feed(self, data) -> None:
        """Append received bytes (any bytes-like object, any size); they are copied in."""
        self._raise_if_failed()
        if cython.compiled:
            view: Py_buffer
            PyObject_GetBuffer(data, cython.address(view), PyBUF_SIMPLE)
            try:
                if view.len:
                    self._reserve(view.len)
                    memcpy(PyByteArray_AS_STRING(self._buf) + self._end, view.buf, view.len)
                    self._end += view.len
            finally:
                PyBuffer_Release(cython.address(view))
        else:
            with memoryview(data) as view:
                n = view.nbytes
                if n:
                    self._reserve(n)
                    self._buf[self._end : self._end + n] = view.cast("B")
                    self._end += n

    def get_buffer(self, sizehint) -> memoryview:
        """Writable free space for one socket read (asyncio BufferedProtocol.get_buffer)."""
        self._raise_if_failed()
        self._reserve(READ_CHUNK)
        return memoryview(self._buf)[self._end :]

    def buffer_updated(self, nbytes) -> None:
        """``nbytes`` were written at the start of the last get_buffer() view."""
        self._raise_if_failed()
        if not 0 <= nbytes <= len(self._buf) - self._end:
            raise ValueError(f"buffer_updated({nbytes!r}) exceeds the {len(self._buf) - self._end} bytes get_buffer() gave")
        self._end += nbytes

    def eof(self) -> None:
        """The byte stream ended; a partial frame left over is a protocol error."""
        self._raise_if_failed()
        if self._end != self._start:
            self._fail(
                f"tunnel closed in the middle of a frame ({self._end - self._start} bytes of it received)",
                ErrorCode.PROTOCOL_ERROR,
            )

    def _check_header(self, ftype, flags, reserved, sid, length):
        """Raise FrameError unless the header is valid; everything checkable before the payload."""
        if ftype > _MAX_TYPE:
            self._fail(f"unknown frame type 0x{ftype:02x} on stream {sid}", ErrorCode.PROTOCOL_ERROR)
        name = FrameType(ftype).name
        if reserved:
            self._fail(f"{name} frame on stream {sid} has reserved bits 0x{reserved:04x} set", ErrorCode.PROTOCOL_ERROR)
        allowed: cython.int = _END if ftype == _DATA else 0
        if flags & ~allowed:
            self._fail(f"{name} frame on stream {sid} has undefined flags 0x{flags:02x}", ErrorCode.PROTOCOL_ERROR)
        if length > self._max_payload:
            self._fail(
                f"{name} frame on stream {sid} is {length} bytes, over the {self._max_payload}-byte limit",
                ErrorCode.FRAME_SIZE_ERROR,
            )
        if ftype == _DATA:
            limit: cython.Py_ssize_t = self._max_payload
        elif ftype == _DATAGRAM:
            limit = _MAX_DATAGRAM
        elif ftype == _OPEN_FAIL or ftype == _RST:
            limit = _CODE_SIZE + _MAX_REASON
        elif ftype == _GOAWAY:
            limit = _GOAWAY_FIXED + _MAX_REASON
        else:
            limit = _MAX_CONTROL
        if length > limit:
            self._fail(
                f"{name} frame on stream {sid} is {length} bytes, over the {limit}-byte limit of its type",
                ErrorCode.FRAME_SIZE_ERROR,
            )
        if ftype == _PING or ftype == _PONG or ftype == _GOAWAY or ftype == _CONTROL:
            if sid != 0:
                self._fail(f"{name} frame must be on stream 0, not stream {sid}", ErrorCode.PROTOCOL_ERROR)
        elif ftype != _WINDOW and sid == 0:
            self._fail(f"{name} frame on stream 0; it needs a stream id", ErrorCode.PROTOCOL_ERROR)
        if ftype == _PING or ftype == _PONG:
            if length != _PING_SIZE:
                self._fail(f"{name} payload is {length} bytes; it must be {_PING_SIZE}", ErrorCode.FRAME_SIZE_ERROR)
        elif ftype == _WINDOW:
            if length != _WINDOW_SIZE:
                self._fail(
                    f"WINDOW payload on stream {sid} is {length} bytes; it must be {_WINDOW_SIZE}",
                    ErrorCode.FRAME_SIZE_ERROR,
                )
        elif ftype == _OPEN_OK or ftype == _FIN:
            if length != 0:
                self._fail(f"{name} frame on stream {sid} must be empty, not {length} bytes", ErrorCode.FRAME_SIZE_ERROR)
        elif ftype == _OPEN_FAIL or ftype == _RST:
            if length < _CODE_SIZE:
                self._fail(f"{name} frame on stream {sid} is {length} bytes, too short for its error code", ErrorCode.FRAME_SIZE_ERROR)
        elif ftype == _GOAWAY:
            if length < _GOAWAY_FIXED:
                self._fail(f"GOAWAY frame is {length} bytes, too short for its last stream id and code", ErrorCode.FRAME_SIZE_ERROR)

    def next_frame(self):
        """Return the next complete frame, or None until more bytes arrive. Raises FrameError."""
        if self._error is not None:
            raise self._error.with_traceback(None)
        start: cython.Py_ssize_t = self._start
        avail: cython.Py_ssize_t = self._end - start
        if avail < HEADER_SIZE:
            return None
        ftype: cython.int
        flags: cython.int
        reserved: cython.int
        sid: cython.uint
        length: cython.Py_ssize_t
        if cython.compiled:
            p: cython.p_uchar = cython.cast(cython.p_uchar, PyByteArray_AS_STRING(self._buf)) + start
            ftype = p[0]
            flags = p[1]
            reserved = (p[2] << 8) | p[3]
            sid = (
                (cython.cast(cython.uint, p[4]) << 24)
                | (cython.cast(cython.uint, p[5]) << 16)
                | (cython.cast(cython.uint, p[6]) << 8)
                | p[7]
            )
            length = cython.cast(
                cython.Py_ssize_t,
                (cython.cast(cython.uint, p[8]) << 24)
                | (cython.cast(cython.uint, p[9]) << 16)
                | (cython.cast(cython.uint, p[10]) << 8)
                | p[11],
            )
        else:
            ftype, flags, reserved, sid, length = _HEADER.unpack_from(self._buf, start)
        if not (ftype == _DATA and reserved == 0 and (flags & ~_END) == 0 and sid != 0 and length <= self._max_payload):
            self._check_header(ftype, flags, reserved, sid, length)
        total: cython.Py_ssize_t = HEADER_SIZE + length
        if avail < total:
            return None
        if cython.compiled:
            payload = PyBytes_FromStringAndSize(cython.cast(cython.p_char, p) + HEADER_SIZE, length)
        else:
            with memoryview(self._buf) as view:
                payload = view[start + HEADER_SIZE : start + total].tobytes()
        if ftype == _WINDOW:
            increment = int.from_bytes(payload, "big")
            if not 1 <= increment <= _MAX_WINDOW:
                self._fail(
                    f"WINDOW increment {increment} on stream {sid} is outside 1..{_MAX_WINDOW}",
                    ErrorCode.PROTOCOL_ERROR,
                )
        start += total
        if start == self._end:
            self._start = self._end = 0
            if len(self._buf) > self._base:
                self._buf = bytearray()
        else:
            self._start = start
        self.frames += 1
        return _new_frame(ftype, flags, sid, payload)


def _check_stream(stream_id, allow_zero=False):
    stream_id = operator.index(stream_id)
    lowest = 0 if allow_zero else 1
    if not lowest <= stream_id <= _MAX_STREAM_ID:
        raise ValueError(f"stream id {stream_id!r} is outside {lowest}..{_MAX_STREAM_ID}")
    return stream_id


def _check_code(code):
    code = operator.index(code)
    if not 0 <= code <= 0xFFFF:
        raise ValueError(f"error code {code!r} does not fit in 16 bits; use a backhaul ErrorCode")
    return code


def _nbytes(payload):
    if isinstance(payload, (bytes, bytearray)):
        return len(payload)
    with memoryview(payload) as view:
        return view.nbytes


def _encode_reason(reason):
    """UTF-8 reason cut to MAX_REASON bytes at a character boundary; never fails on odd text."""
    raw = str(reason).encode("utf-8", "replace")
    if len(raw) > _MAX_REASON:
        raw = raw[:_MAX_REASON].decode("utf-8", "ignore").encode("utf-8")
    return raw


class FrameEncoder:
    """Appends frames to one output buffer that take() hands over for transport.write()."""

    def __init__(self, max_payload=constants.MAX_PAYLOAD) -> None:
        if not 0 < max_payload <= _MAX_PAYLOAD:
            raise ValueError(f"max_payload must be within 1..{_MAX_PAYLOAD}, not {max_payload!r}")
        self._max_payload = max_payload
        self._out = bytearray()
        #: frames encoded so far (read by metrics; a plain counter, no call per frame)
        self.frames = 0

    @property
    def pending(self):
        """Bytes encoded and not yet taken."""
        return len(self._out)

    def take(self):
        """Everything encoded since the last take() as one buffer (b"" when nothing); the encoder lets go of it."""
        out = self._out
        if not out:
            return b""
        self._out = bytearray()
        return out

    def _put(self, ftype, flags, sid, payload, offset, length):
        """Append one frame whose payload is ``payload[offset:offset + length]`` (already validated)."""
        out: bytearray = self._out
        self.frames += 1
        if cython.compiled:
            pos: cython.Py_ssize_t = len(out)
            view: Py_buffer
            PyObject_GetBuffer(payload, cython.address(view), PyBUF_SIMPLE)
            try:
                PyByteArray_Resize(out, pos + HEADER_SIZE + length)
                p: cython.p_uchar = cython.cast(cython.p_uchar, PyByteArray_AS_STRING(out)) + pos
                p[0] = ftype
                p[1] = flags
                p[2] = 0
                p[3] = 0
                p[4] = (sid >> 24) & 0xFF
                p[5] = (sid >> 16) & 0xFF
                p[6] = (sid >> 8) & 0xFF
                p[7] = sid & 0xFF
                p[8] = (length >> 24) & 0xFF
                p[9] = (length >> 16) & 0xFF
                p[10] = (length >> 8) & 0xFF
                p[11] = length & 0xFF
                if length:
                    memcpy(p + HEADER_SIZE, cython.cast(cython.p_char, view.buf) + offset, length)
            finally:
                PyBuffer_Release(cython.address(view))
        else:
            out += _HEADER.pack(ftype, flags, 0, sid, length)
            if length:
                if offset == 0 and isinstance(payload, (bytes, bytearray)) and length == len(payload):
                    out += payload
                else:
                    with memoryview(payload) as view:
                        out += view[offset : offset + length]

    def _small(self, ftype, sid, payload, what):
        """Append a frame whose whole payload must fit the small-frame limit."""
        length: cython.Py_ssize_t = _nbytes(payload)
        if length > _MAX_CONTROL:
            raise ValueError(f"{what} payload is {length} bytes; the limit is {_MAX_CONTROL}")
        self._put(ftype, 0, sid, payload, 0, length)

    def data(self, stream_id, payload, end=False) -> None:
        """Queue stream bytes, split into frames of at most max_payload; END marks the last one."""
        stream_id = _check_stream(stream_id)
        total: cython.Py_ssize_t = _nbytes(payload)
        if total == 0:
            if end:
                self._put(_DATA, _END, stream_id, b"", 0, 0)
            return
        step: cython.Py_ssize_t = self._max_payload
        offset: cython.Py_ssize_t = 0
        size: cython.Py_ssize_t
        while offset < total:
            size = min(step, total - offset)
            last = offset + size == total
            self._put(_DATA, _END if (end and last) else 0, stream_id, payload, offset, size)
            offset += size

    def open(self, stream_id, payload) -> None:
        """Queue OPEN; ``payload`` is the UTF-8 JSON object described in docs/protocol.md."""
        stream_id = _check_stream(stream_id)
        self._small(_OPEN, stream_id, payload, "OPEN")

    def open_ok(self, stream_id) -> None:
        """Queue OPEN_OK: the target is connected."""
        stream_id = _check_stream(stream_id)
        self._put(_OPEN_OK, 0, stream_id, b"", 0, 0)

    def open_fail(self, stream_id, code, reason) -> None:
        """Queue OPEN_FAIL with an ErrorCode and a reason (cut to MAX_REASON UTF-8 bytes)."""
        stream_id = _check_stream(stream_id)
        code = _check_code(code)
        self._small(_OPEN_FAIL, stream_id, code.to_bytes(_CODE_SIZE, "big") + _encode_reason(reason), "OPEN_FAIL")

    def fin(self, stream_id) -> None:
        """Queue FIN: no more DATA from this side on the stream."""
        stream_id = _check_stream(stream_id)
        self._put(_FIN, 0, stream_id, b"", 0, 0)

    def rst(self, stream_id, code, reason) -> None:
        """Queue RST with an ErrorCode and a reason (cut to MAX_REASON UTF-8 bytes)."""
        stream_id = _check_stream(stream_id)
        code = _check_code(code)
        self._small(_RST, stream_id, code.to_bytes(_CODE_SIZE, "big") + _encode_reason(reason), "RST")

    def window(self, stream_id, increment) -> None:
        """Queue WINDOW granting ``increment`` bytes of credit; stream 0 is the tunnel."""
        stream_id = _check_stream(stream_id, True)
        increment = operator.index(increment)
        if not 1 <= increment <= _MAX_WINDOW:
            raise ValueError(f"window increment {increment!r} is outside 1..{_MAX_WINDOW}")
        self._put(_WINDOW, 0, stream_id, increment.to_bytes(_WINDOW_SIZE, "big"), 0, _WINDOW_SIZE)

    def _ping(self, ftype, opaque, what):
        if _nbytes(opaque) != _PING_SIZE:
            raise ValueError(f"{what} payload must be exactly {_PING_SIZE} bytes, not {len(opaque)}")
        self._put(ftype, 0, 0, opaque, 0, _PING_SIZE)

    def ping(self, opaque) -> None:
        """Queue PING with 8 opaque bytes the peer echoes."""
        self._ping(_PING, opaque, "PING")

    def pong(self, opaque) -> None:
        """Queue PONG echoing a PING's 8 bytes."""
        self._ping(_PONG, opaque, "PONG")

    def datagram(self, flow_id, payload) -> None:
        """Queue one UDP datagram of flow ``flow_id``."""
        flow_id = _check_stream(flow_id)
        length: cython.Py_ssize_t = _nbytes(payload)
        limit: cython.Py_ssize_t = min(_MAX_DATAGRAM, self._max_payload)
        if length > limit:
            raise ValueError(f"datagram of {length} bytes is over the {limit}-byte limit")
        self._put(_DATAGRAM, 0, flow_id, payload, 0, length)

    def goaway(self, last_stream_id, code, reason) -> None:
        """Queue GOAWAY: no streams above ``last_stream_id`` will be processed."""
        last_stream_id = _check_stream(last_stream_id, True)
        code = _check_code(code)
        payload = last_stream_id.to_bytes(_STREAM_ID_SIZE, "big") + code.to_bytes(_CODE_SIZE, "big") + _encode_reason(reason)
        self._small(_GOAWAY, 0, payload, "GOAWAY")

    def control(self, payload) -> None:
        """Queue a CONTROL message (a UTF-8 JSON object with a "type" key)."""
        self._small(_CONTROL, 0, payload, "CONTROL")


def _reason(raw: bytes, what: str) -> str:
    if len(raw) > _MAX_REASON:
        raise FrameError(f"{what} reason is {len(raw)} bytes, over the {_MAX_REASON}-byte limit", ErrorCode.FRAME_SIZE_ERROR)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FrameError(f"{what} reason is not valid UTF-8 ({exc.reason} at byte {exc.start})", ErrorCode.PROTOCOL_ERROR) from None


def parse_error_payload(payload) -> tuple:
    """Split an OPEN_FAIL or RST payload into (code, reason). Raises FrameError."""
    payload = bytes(payload)
    if len(payload) < _CODE_SIZE:
        raise FrameError(
            f"error payload is {len(payload)} bytes; it needs at least {_CODE_SIZE} for the code", ErrorCode.FRAME_SIZE_ERROR
        )
    return int.from_bytes(payload[:_CODE_SIZE], "big"), _reason(payload[_CODE_SIZE:], "error")


def parse_window(payload) -> int:
    """The credit increment of a WINDOW payload. Raises FrameError."""
    payload = bytes(payload)
    if len(payload) != _WINDOW_SIZE:
        raise FrameError(f"WINDOW payload is {len(payload)} bytes; it must be {_WINDOW_SIZE}", ErrorCode.FRAME_SIZE_ERROR)
    increment = int.from_bytes(payload, "big")
    if not 1 <= increment <= _MAX_WINDOW:
        raise FrameError(f"WINDOW increment {increment} is outside 1..{_MAX_WINDOW}", ErrorCode.PROTOCOL_ERROR)
    return increment


def parse_goaway(payload) -> tuple:
    """Split a GOAWAY payload into (last_stream_id, code, reason). Raises FrameError."""
    payload = bytes(payload)
    if len(payload) < _GOAWAY_FIXED:
        raise FrameError(
            f"GOAWAY payload is {len(payload)} bytes; it needs at least {_GOAWAY_FIXED}", ErrorCode.FRAME_SIZE_ERROR
        )
    return (
        int.from_bytes(payload[:_STREAM_ID_SIZE], "big"),
        int.from_bytes(payload[_STREAM_ID_SIZE:_GOAWAY_FIXED], "big"),
        _reason(payload[_GOAWAY_FIXED:], "GOAWAY"),
    )
