"""The frame codec: the Cython build when available, else the pure-Python twin.

Both are compiled from one source (``_framing_py.py``) and behave identically.
BACKHAUL_PURE=1 selects the twin on purpose; BACKHAUL_REQUIRE_EXT=1 refuses to run
without the Cython build instead of falling back to it (CI and production use this).
"""

from __future__ import annotations

from backhaul import twins

_impl, IMPLEMENTATION = twins.load("backhaul.protocol", "framing", "frame codec")

Frame = _impl.Frame
FrameDecoder = _impl.FrameDecoder
FrameEncoder = _impl.FrameEncoder
FrameError = _impl.FrameError
parse_error_payload = _impl.parse_error_payload
parse_window = _impl.parse_window
parse_goaway = _impl.parse_goaway

__all__ = [
    "IMPLEMENTATION",
    "Frame",
    "FrameDecoder",
    "FrameEncoder",
    "FrameError",
    "parse_error_payload",
    "parse_window",
    "parse_goaway",
]
