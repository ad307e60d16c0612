"""Wire constants of the backhaul tunnel protocol, version 1.

docs/protocol.md is the prose specification; this module is its machine-readable
half. Every number a peer must agree on lives here and nowhere else.

Frame layout (12-byte header, network byte order, then ``length`` payload bytes)::

    0        1        2                 4                                 8                                12
    +--------+--------+--------+--------+--------+--------+--------+--------+--------+--------+--------+--------+
    |  type  | flags  |    reserved     |            stream id              |              length               |
    +--------+--------+--------+--------+--------+--------+--------+--------+--------+--------+--------+--------+
"""

from __future__ import annotations

import enum

#: ALPN protocol id of a tunnel. A relay that does not offer it is not a backhaul relay.
ALPN_TUNNEL = "backhaul/1"
#: ALPN protocol id of the control API, served on the same port as tunnels.
ALPN_HTTP = "http/1.1"
#: ALPN protocol id of a relay-to-relay link (a node carrying a user's stream to the node
#: that holds a tunnel of the app's group), served on the listen port too.
ALPN_PEER = "backhaul-peer/1"

HEADER_SIZE = 12
#: struct format of the header; the codec packs and unpacks it by hand for speed.
HEADER_FORMAT = "!BBHII"

#: Largest payload any frame may carry. A larger ``length`` is a connection error.
MAX_PAYLOAD = 256 * 1024
#: Largest payload of the frames that carry small structured data
#: (OPEN, OPEN_FAIL, RST, GOAWAY, CONTROL, PING, PONG, WINDOW).
MAX_CONTROL_PAYLOAD = 16 * 1024
#: Largest UDP datagram a DATAGRAM frame carries (the largest IPv4 UDP payload).
MAX_DATAGRAM = 65507
#: Largest reason string in OPEN_FAIL / RST / GOAWAY, in UTF-8 bytes.
MAX_REASON = 1024

#: Stream id 0 addresses the tunnel itself (PING, PONG, GOAWAY, CONTROL, tunnel WINDOW).
CONNECTION_STREAM = 0
#: Largest stream id; ids are never reused within one tunnel.
MAX_STREAM_ID = 0xFFFFFFFF


class FrameType(enum.IntEnum):
    """Frame types. A receiver that sees any other value closes the tunnel with PROTOCOL_ERROR."""

    DATA = 0x0
    """Stream bytes. Counts against both the stream and the tunnel send windows."""
    OPEN = 0x1
    """Open a stream. Payload: a JSON object (app, target, proto, client, id)."""
    OPEN_OK = 0x2
    """The stream's target is connected; bytes may flow both ways. Empty payload."""
    OPEN_FAIL = 0x3
    """The stream could not be opened. Payload: u16 ErrorCode, then a UTF-8 reason."""
    FIN = 0x4
    """The sender will send no more DATA on this stream (half-close). Empty payload."""
    RST = 0x5
    """Abort the stream in both directions. Payload: u16 ErrorCode, then a UTF-8 reason."""
    WINDOW = 0x6
    """Grant send credit. Payload: u32 increment (1..2**31-1). Stream 0 means the tunnel."""
    PING = 0x7
    """Liveness probe on stream 0. Payload: 8 opaque bytes, echoed in PONG."""
    PONG = 0x8
    """Answer to PING. Payload: the 8 bytes of the PING."""
    DATAGRAM = 0x9
    """One UDP datagram of the flow named by the stream id. Not flow-controlled; may be dropped."""
    GOAWAY = 0xA
    """The sender opens no new streams and accepts none above the last id.
    Payload: u32 last stream id, u16 ErrorCode, then a UTF-8 reason."""
    CONTROL = 0xB
    """A small JSON control message on stream 0 (hello, config changed, drain)."""



class Flag(enum.IntFlag):
    """Header flags. Bits not defined for a frame type must be zero."""

    END = 0x01
    """On DATA: the last DATA of the stream in this direction, as if FIN followed."""


#: Send windows every stream and every tunnel start with, before any WINDOW frame.
INITIAL_STREAM_WINDOW = 256 * 1024
INITIAL_TUNNEL_WINDOW = 1024 * 1024

PING_PAYLOAD_SIZE = 8
WINDOW_PAYLOAD_SIZE = 4
MAX_WINDOW = 2**31 - 1
#: OPEN_FAIL and RST start with a u16 ErrorCode; the reason follows.
ERROR_CODE_SIZE = 2
#: A stream id on the wire (the header's, and GOAWAY's last stream id): u32.
STREAM_ID_SIZE = 4
#: GOAWAY starts with its last stream id and an ErrorCode; the reason follows.
GOAWAY_FIXED_SIZE = STREAM_ID_SIZE + ERROR_CODE_SIZE


class ErrorCode(enum.IntEnum):
    """Reasons carried by OPEN_FAIL, RST and GOAWAY, and raised locally as exceptions."""

    NO_ERROR = 0
    """Graceful: a drain or a normal close."""
    PROTOCOL_ERROR = 1
    """The peer broke a rule of this protocol (bad frame, wrong state)."""
    INTERNAL_ERROR = 2
    """The sender hit a bug or an unexpected local failure."""
    FLOW_CONTROL_ERROR = 3
    """The peer sent more than its window allowed, or overflowed a window."""
    FRAME_SIZE_ERROR = 4
    """A frame was longer than its type allows or shorter than its fixed fields."""
    REFUSED_STREAM = 5
    """The stream was not processed (limit reached or draining); it is safe to retry elsewhere."""
    CANCEL = 6
    """The stream is no longer wanted (the user went away)."""
    CONNECT_REFUSED = 7
    """The target actively refused the connection (RST from the target)."""
    CONNECT_TIMEOUT = 8
    """The target did not answer within the connect timeout."""
    HOST_UNREACHABLE = 9
    """No route to the target, or its name did not resolve."""
    TARGET_NOT_ALLOWED = 10
    """The connector's pulled configuration does not allow this target."""
    UNKNOWN_APP = 11
    """The connector's configuration has no app by that name."""
    STREAM_CLOSED = 12
    """A frame arrived for a stream that was already closed in that direction."""
    IDLE_TIMEOUT = 13
    """The stream or tunnel was idle for longer than allowed."""
    PEER_DEAD = 14
    """Keepalive PINGs went unanswered; the tunnel is presumed dead."""
    GOING_AWAY = 15
    """The tunnel is shutting down and the stream did not finish in time."""
    CONNECTION_RESET = 16
    """The target reset an established connection."""
    ENHANCE_YOUR_CALM = 17
    """The peer made this side do too much work that brings nothing (a PING, OPEN, RST, WINDOW,
    CONTROL or empty-frame flood; config.FloodLimits): the tunnel is closed (HTTP/2's code of
    that name)."""


#: The name of every code, and of every code this version does not know (a peer may send any
#: 32-bit value; metric labels must stay a fixed set).
UNKNOWN_CODE = "UNKNOWN"


def error_name(code: int) -> str:
    """The name of an OPEN_FAIL/RST/GOAWAY code for logs and metric labels."""
    member = ErrorCode._value2member_map_.get(code)
    return member.name if member is not None else UNKNOWN_CODE


#: Codes after which the relay may retry the open on another connector
#: (nothing of the stream has reached the target yet).
RETRYABLE_OPEN_FAILURES = frozenset(
    {ErrorCode.REFUSED_STREAM, ErrorCode.GOING_AWAY, ErrorCode.INTERNAL_ERROR, ErrorCode.PEER_DEAD}
)


class Role(enum.Enum):
    """Which end of the tunnel a session is; it decides stream-id parity (protocol.md)."""

    RELAY = 0
    CONNECTOR = 1
