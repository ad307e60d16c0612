"""The frame codec: the Cython build when available, else the pure-Python twin.

Both are compiled from one source (``_framing_py.py``) and behave identically.
BACKHAUL_PURE=1 selects the twin on purpose; BACKHAUL_REQUIRE_EXT=1 refuses to run
without the Cython build instead of falling back to it (CI and production use this).
"""

from __future__ import annotations

import importlib
import os
import warnings

if os.environ.get("BACKHAUL_PURE") == "1":
    from backhaul.protocol import _framing_py as _impl

    IMPLEMENTATION = "python"
else:
    try:
        # import_module, not `from ... import`: it honours a None placeholder in sys.modules.
        _impl = importlib.import_module("backhaul.protocol._framing_c")

        IMPLEMENTATION = "cython"
    except ImportError as exc:
        if os.environ.get("BACKHAUL_REQUIRE_EXT") == "1":
            raise ImportError(
                "the compiled frame codec backhaul.protocol._framing_c is missing or broken "
                f"({exc}) and BACKHAUL_REQUIRE_EXT=1 forbids the slow pure-Python twin; "
                "build it with tools/bootstrap.sh or `pip install -e .` (Cython and a C compiler needed)"
            ) from exc
        warnings.warn(
            f"backhaul: the compiled frame codec could not be imported ({exc}); using the slow "
            "pure-Python twin. Run tools/bootstrap.sh or `pip install -e .` to build it.",
            RuntimeWarning,
            stacklevel=2,
        )
        from backhaul.protocol import _framing_py as _impl

        IMPLEMENTATION = "python"

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
