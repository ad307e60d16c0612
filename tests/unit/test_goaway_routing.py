"""The relay stops routing to a tunnel the moment the connector's GOAWAY is read from it.

Real tunnels over real loopback TCP connections in one event loop: two connector
tunnels, a relay tunnel registry, and a GOAWAY from one connector.
"""

from __future__ import annotations

import asyncio

import pytest

from backhaul.protocol import mux
from backhaul.protocol.constants import ErrorCode
from backhaul.relay.routing import NoRoute, TunnelRecord, TunnelRegistry
from backhaul.transport.tunnel import Tunnel


class RelaySide:
    """Registers each connector tunnel; notes what routing saw when a GOAWAY arrived."""

    def __init__(self) -> None:
        self.registry = TunnelRegistry()
        self.count = 0
        self.at_goaway: list[tuple[bool, Tunnel | None]] = []
        self.goaway = asyncio.Event()

    def tunnel_up(self, tunnel: Tunnel) -> None:
        self.count += 1
        tunnel.info = TunnelRecord(f"c-{self.count}", "g")
        self.registry.add(tunnel)

    def tunnel_down(self, tunnel: Tunnel, code: int, reason: str) -> None:
        self.registry.remove(tunnel)

    def stream_opened(self, tunnel, stream_id, meta) -> None:
        tunnel.reject(stream_id, ErrorCode.PROTOCOL_ERROR, "no streams from connectors")

    def control_received(self, tunnel, message) -> None:
        pass

    def goaway_received(self, tunnel: Tunnel, code: int, reason: str) -> None:
        picks = set()
        for _ in range(20):
            try:
                picks.add(self.registry.pick("g"))
            except NoRoute:
                picks.add(None)
        self.at_goaway.append((tunnel.usable, tunnel in picks))
        self.goaway.set()

    def datagram_received(self, tunnel, flow_id, data) -> None:
        pass


class ConnectorSide(RelaySide):
    def tunnel_up(self, tunnel: Tunnel) -> None:
        pass


@pytest.mark.parametrize("others", [1, 0])
def test_a_tunnel_is_unusable_as_soon_as_its_goaway_is_read(others):
    async def main():
        loop = asyncio.get_running_loop()
        relay = RelaySide()
        server = await loop.create_server(lambda: Tunnel(mux.Session(mux.Role.RELAY), relay, "relay"), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        connectors = []
        for i in range(1 + others):
            _, tunnel = await loop.create_connection(
                lambda: Tunnel(mux.Session(mux.Role.CONNECTOR), ConnectorSide(), f"connector-{i}"), "127.0.0.1", port
            )
            connectors.append(tunnel)
        for _ in range(200):
            if relay.count == len(connectors):
                break
            await asyncio.sleep(0.01)
        assert all(t.usable for t in relay.registry.tunnels())

        connectors[0].goaway(ErrorCode.NO_ERROR, "connector draining")
        await asyncio.wait_for(relay.goaway.wait(), 5)
        [(usable, still_picked)] = relay.at_goaway
        assert not usable and not still_picked
        draining = [t for t in relay.registry.tunnels() if t.session.draining]
        assert len(draining) == 1
        with pytest.raises(mux.SessionError):
            draining[0].open({"app": "a", "target": "127.0.0.1:1", "proto": "tcp", "client": "x", "id": "1"}, None)
        if others:
            assert relay.registry.pick("g") is not draining[0]
        else:
            with pytest.raises(NoRoute):
                relay.registry.pick("g")
        for tunnel in connectors:
            tunnel.close()
        server.close()
        await server.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 30))
