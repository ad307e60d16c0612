"""A tunnel forgets a stream's endpoint once the stream is closed both ways, however it closed."""

from __future__ import annotations

import asyncio

import pytest

from backhaul.config import FlowControl
from backhaul.protocol import mux
from backhaul.transport.tunnel import Tunnel


class Owner:
    def __init__(self) -> None:
        self.up = asyncio.get_running_loop().create_future()
        self.opened: list[int] = []

    def tunnel_up(self, tunnel):
        if not self.up.done():
            self.up.set_result(tunnel)

    def tunnel_down(self, tunnel, code, reason):
        pass

    def stream_opened(self, tunnel, stream_id, meta):
        endpoint = Endpoint(tunnel)
        endpoint.stream_id = stream_id
        tunnel.accept(stream_id, endpoint)
        self.opened.append(stream_id)

    def control_received(self, tunnel, message):
        pass

    def goaway_received(self, tunnel, code, reason):
        pass

    def datagram_received(self, tunnel, flow_id, data):
        pass


class Endpoint:
    """Echoes what it gets and ends its side when the peer ends."""

    def __init__(self, tunnel: Tunnel, echo: bool = True) -> None:
        self.tunnel = tunnel
        self.stream_id = 0
        self.echo = echo
        self.received = bytearray()
        self.ended = asyncio.get_running_loop().create_future()
        self.accepted = asyncio.get_running_loop().create_future()

    def on_accepted(self):
        self.accepted.set_result(True)

    def on_rejected(self, code, reason):
        self.accepted.set_exception(AssertionError(reason))

    def on_data(self, data, end):
        self.received += data
        self.tunnel.consumed(self.stream_id, len(data))
        if self.echo and data:
            self.tunnel.send(self.stream_id, data)
        if end:
            self.on_end()

    def on_end(self):
        if self.echo:
            self.tunnel.end(self.stream_id)
        if not self.ended.done():
            self.ended.set_result(True)

    def on_reset(self, code, reason):
        if not self.ended.done():
            self.ended.set_exception(AssertionError(reason))

    def on_write_resumed(self):
        pass


async def _pair():
    loop = asyncio.get_running_loop()
    flow = FlowControl()
    server_owner, client_owner = Owner(), Owner()
    server = await loop.create_server(
        lambda: Tunnel(mux.Session(mux.Role.CONNECTOR, flow), server_owner, "connector", flow), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    await loop.create_connection(lambda: Tunnel(mux.Session(mux.Role.RELAY, flow), client_owner, "relay", flow), "127.0.0.1", port)
    relay = await asyncio.wait_for(client_owner.up, 5)
    connector = await asyncio.wait_for(server_owner.up, 5)
    return server, relay, connector


@pytest.mark.parametrize("size", [10, 20 * 1024 * 1024])
def test_streams_closed_both_ways_leave_no_endpoint_behind(size):
    async def main():
        server, relay, connector = await _pair()
        try:
            endpoints = []
            for _ in range(5):
                endpoint = Endpoint(relay, echo=False)
                endpoint.stream_id = relay.open({"app": "a", "target": "t:1", "proto": "tcp", "client": "c", "id": "i"}, endpoint)
                await asyncio.wait_for(endpoint.accepted, 5)
                # More than the stream window: the END waits in the session's queue for credit.
                relay.send(endpoint.stream_id, b"x" * size, end=True)
                endpoints.append(endpoint)
            for endpoint in endpoints:
                await asyncio.wait_for(endpoint.ended, 20)
                assert len(endpoint.received) == size
            for _ in range(100):
                if not relay.endpoints and not connector.endpoints:
                    break
                await asyncio.sleep(0.02)
            assert relay.endpoints == {} and connector.endpoints == {}
            assert relay.session.active_streams == 0 and connector.session.active_streams == 0
        finally:
            relay.close()
            connector.close()
            server.close()

    asyncio.run(main())
