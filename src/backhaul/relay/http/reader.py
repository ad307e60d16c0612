"""The HTTP edge's message readers: the Cython build when available, else the pure-Python twin.

Both are compiled from one source (``_reader_py.py``; its docstring says what the readers
do) and behave identically; :mod:`backhaul.twins` picks one as it does for the frame
codec (BACKHAUL_PURE=1: the twin; BACKHAUL_REQUIRE_EXT=1: the compiled build or an
ImportError). ``IMPLEMENTATION`` says which ("cython" or "python").
"""

from __future__ import annotations

from backhaul import twins
from backhaul.relay.http.errors import HttpError

_impl, IMPLEMENTATION = twins.load("backhaul.relay.http", "reader", "HTTP message reader")

HEAD, BODY, END, UPGRADE = _impl.HEAD, _impl.BODY, _impl.END, _impl.UPGRADE
NO_BODY, LENGTH, CHUNKED, UNTIL_CLOSE = _impl.NO_BODY, _impl.LENGTH, _impl.CHUNKED, _impl.UNTIL_CLOSE
Request = _impl.Request
Response = _impl.Response
RequestReader = _impl.RequestReader
ResponseReader = _impl.ResponseReader

__all__ = [
    "IMPLEMENTATION", "HEAD", "BODY", "END", "UPGRADE", "NO_BODY", "LENGTH", "CHUNKED", "UNTIL_CLOSE",
    "HttpError", "Request", "Response", "RequestReader", "ResponseReader",
]
