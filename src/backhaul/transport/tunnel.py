"""The tunnel transport: binds one mux ``Session`` to one TLS connection.

``Tunnel`` is compiled by Cython from ``_tunnel_py.py`` (its theory of operation is there)
when the extension is built, and is that pure-Python source otherwise (``backhaul.twins``).
"""

from __future__ import annotations

from backhaul import twins
from backhaul.transport.endpoints import StreamEndpoint, TunnelOwner

_impl, IMPLEMENTATION = twins.load("backhaul.transport", "tunnel", "tunnel transport")

Tunnel = _impl.Tunnel

__all__ = ["IMPLEMENTATION", "StreamEndpoint", "Tunnel", "TunnelOwner"]
