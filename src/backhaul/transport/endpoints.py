"""What a tunnel hands its events to: the relay or connector that owns it, and its streams' endpoints."""

from __future__ import annotations

from typing import Any, Protocol as TypingProtocol

#: The tunnel that calls (backhaul.transport.tunnel.Tunnel; not imported: it imports this module).
Tunnel = Any


class TunnelOwner(TypingProtocol):
    """What a tunnel tells the relay or connector that owns it."""

    def tunnel_up(self, tunnel: "Tunnel") -> None: ...

    def tunnel_down(self, tunnel: "Tunnel", code: int, reason: str) -> None: ...

    def stream_opened(self, tunnel: "Tunnel", stream_id: int, meta: dict) -> None: ...

    def control_received(self, tunnel: "Tunnel", message: dict) -> None: ...

    def goaway_received(self, tunnel: "Tunnel", code: int, reason: str) -> None: ...

    def datagram_received(self, tunnel: "Tunnel", flow_id: int, data: bytes) -> None: ...


class StreamEndpoint(TypingProtocol):
    """The local end of one stream (a socket pipe); the tunnel delivers its events."""

    def on_accepted(self) -> None: ...

    def on_rejected(self, code: int, reason: str) -> None: ...

    def on_data(self, data: bytes, end: bool) -> None: ...

    def on_end(self) -> None: ...

    def on_reset(self, code: int, reason: str) -> None: ...

    def on_write_resumed(self) -> None: ...
