"""The error a tunnel ``Session`` raises at its caller (the peer's mistakes are FrameErrors)."""

from __future__ import annotations


class SessionError(Exception):
    """The application asked for something the session's state does not allow."""
