"""The HTTP edge's connection state machine: the Cython build when available, else the pure-Python twin.

Both are compiled from one source (``_exchange_py.py``; its docstring says how the machine
works) and behave identically; :mod:`backhaul.twins` picks one as it does for the frame
codec (BACKHAUL_PURE=1: the twin; BACKHAUL_REQUIRE_EXT=1: the compiled build or an
ImportError). ``IMPLEMENTATION`` says which ("cython" or "python").
"""

from __future__ import annotations

from backhaul import twins

_impl, IMPLEMENTATION = twins.load("backhaul.relay.http", "exchange", "HTTP exchange machine")

ExchangeMachine = _impl.ExchangeMachine

__all__ = ["IMPLEMENTATION", "ExchangeMachine"]
