"""A pipe: one TCP socket relayed over one tunnel stream, both ways, with half-close.

``Pipe`` is compiled by Cython from ``_pipe_py.py`` (how it works is there) when the
extension is built, and is that pure-Python source otherwise (``backhaul.twins``).
"""

from __future__ import annotations

from backhaul import twins

_impl, IMPLEMENTATION = twins.load("backhaul.transport", "pipe", "socket pipe")

Pipe = _impl.Pipe

__all__ = ["IMPLEMENTATION", "Pipe"]
