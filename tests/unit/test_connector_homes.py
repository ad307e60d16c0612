"""A worker's tunnel groups over several relay nodes (connector.homes) when no node answers:
real sockets on 127.0.0.x ports nobody listens on. The groups, their slots, the nodes
avoided and the groups on their way out all stay within their bounds, and every node
that fails is counted as lost once."""

from __future__ import annotations

import asyncio
import socket
import ssl
import types

import pytest

from backhaul.config import Backoff
from backhaul.connector.homes import TunnelHomes
from backhaul.connector.settings import ConnectorSettings

pytestmark = pytest.mark.codec_independent


def closed_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def test_groups_and_slots_stay_bounded_while_every_node_fails(tmp_path):
    settings = ConnectorSettings(
        state_dir=tmp_path, tunnels=2, max_slots=5, relay_nodes=3,
        backoff=Backoff(initial=0.01, maximum=0.02), connect_timeout=1.0,
    )
    nodes = [{"id": f"n-{c * 12}", "listen": f"127.0.0.{i + 2}:{closed_port(f'127.0.0.{i + 2}')}"} for i, c in enumerate("abcdef")]
    state = types.SimpleNamespace(connector_id="c-0123456789ab", host="127.0.0.1", port=closed_port("127.0.0.1"))

    async def main():
        stopping = asyncio.Event()
        homes = TunnelHomes(lambda: settings, state, owner=None, stopping=stopping)
        homes._ssl = ssl.create_default_context()  # never used: nothing answers
        homes.learn(nodes, "config")
        homes.start()
        most_slots = most_groups = 0
        try:
            for _ in range(100):
                await asyncio.sleep(0.01)
                most_slots = max(most_slots, sum(g.live() for g in homes._all()))
                most_groups = max(most_groups, len(homes.groups))
                assert len(homes._leaving) <= len(nodes)
        finally:
            homes.close()
            await asyncio.sleep(0)
        return homes, most_slots, most_groups

    homes, most_slots, most_groups = asyncio.run(main())
    assert most_slots == settings.max_slots  # dialing to the cap, never past it
    assert most_groups <= settings.relay_nodes + 1  # the nodes chosen and the enrolled address
    assert 3 <= len(homes._strikes) <= len(nodes)  # the nodes tried were counted lost
    assert homes.enrolled.address in homes.groups  # nothing serves: the enrolled address is kept
