"""The tunnel multiplexer: many streams over one byte stream, as a sans-I/O state machine.

``Session`` is compiled by Cython from ``_mux_py.py`` (its theory of operation is there)
when the extension is built, and is that pure-Python source otherwise; both behave
identically (``backhaul.twins`` picks one, the same way as for the frame codec). This
module is what callers import: the session, its events, its role and its error.
"""

from __future__ import annotations

from typing import Any

from backhaul import twins
from backhaul.protocol.constants import Role
from backhaul.protocol.errors import SessionError
from backhaul.protocol.events import (
    ControlReceived,
    DatagramReceived,
    DataReceived,
    Event,
    GoAwayReceived,
    PongReceived,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamRejected,
    StreamReset,
    TunnelFailed,
    WriteResumed,
)

_impl, IMPLEMENTATION = twins.load("backhaul.protocol", "mux", "tunnel multiplexer")

Session = _impl.Session


def stream_meta(app: str, target: str, proto: str, client: str, request_id: str, **extra: Any) -> dict:
    """The OPEN metadata of protocol.md, in one place."""
    meta = {"app": app, "target": target, "proto": proto, "client": client, "id": request_id}
    meta.update(extra)
    return meta


__all__ = [
    "IMPLEMENTATION",
    "Role",
    "Session",
    "SessionError",
    "stream_meta",
    "Event",
    "StreamOpened",
    "StreamAccepted",
    "StreamRejected",
    "DataReceived",
    "StreamEnded",
    "StreamReset",
    "WriteResumed",
    "PongReceived",
    "GoAwayReceived",
    "ControlReceived",
    "DatagramReceived",
    "TunnelFailed",
]
