"""Relay "nodes" for the peering tests: each is the part of a relay worker that links and
opens streams (a TunnelRegistry, a StreamOpener, PeerLinks) with its own data dir and node
certificate from one service CA, its listen port a real TlsListener on 127.0.0.1.

Connector tunnels are real Tunnel objects on one end of a socketpair, the connector a bare
mux Session the test drives (test_udp_flows.FarEnd), so a test decides every answer.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from backhaul import pki, tlsconfig
from backhaul.config import FlowControl, Keepalive, ListenLimits, PeeringLimits
from backhaul.protocol import mux
from backhaul.protocol.constants import ALPN_PEER, ErrorCode
from backhaul.relay.accept import TlsListener
from backhaul.relay.admission import Admission
from backhaul.relay.bridge import Side
from backhaul.relay.metrics import RelayMetrics
from backhaul.relay.opening import StreamOpener
from backhaul.relay.peering import PeerLinks
from backhaul.relay.routing import TunnelRecord, TunnelRegistry
from backhaul.store.base import App

from .test_udp_flows import FarEnd, tunnel_pair

APP = App(name="web", group="g", proto="tcp", port=1, target="10.0.0.1:80")
FLOW_APP = App(name="dns", group="g", proto="udp", port=2, target="10.0.0.1:53")


def node_dirs(root: Path, count: int, ca: pki.CertificateAuthority | None = None) -> list[Path]:
    """``count`` data dirs of one service: the CA's certificate, and each its node certificate."""
    ca = ca or pki.make_ca()
    dirs = []
    for i in range(count):
        data_dir = root / f"node{i}"
        data_dir.mkdir()
        key, cert = pki.make_service_cert(ca, ["127.0.0.1", "localhost"], node_id=pki.new_node_id())
        pki.write_file(data_dir / "ca.pem", ca.cert_pem)
        pki.write_private(data_dir / "service.key", pki.key_to_pem(key))
        pki.write_file(data_dir / "service.pem", pki.cert_to_pem(cert))
        dirs.append(data_dir)
    return dirs


class ConnectorWiring:
    """The TunnelOwner of a node's connector tunnels: filed in the node's registry."""

    def __init__(self, node: "Node", connector_id: str) -> None:
        self.node = node
        self.connector_id = connector_id

    def tunnel_up(self, tunnel):
        tunnel.info = TunnelRecord(self.connector_id, "g")
        self.node.registry.add(tunnel)

    def tunnel_down(self, tunnel, code, reason):
        self.node.registry.remove(tunnel)

    def stream_opened(self, tunnel, stream_id, meta):
        tunnel.reject(stream_id, ErrorCode.PROTOCOL_ERROR, "connectors open no streams")

    def control_received(self, tunnel, message):
        pass

    def goaway_received(self, tunnel, code, reason):
        pass

    def datagram_received(self, tunnel, flow_id, data):
        self.node.deliver(tunnel, flow_id, data)


class Node:
    """One relay node's linking part, listening on 127.0.0.1 (see the module docstring)."""

    def __init__(
        self, data_dir: Path, flow: FlowControl = FlowControl(), limits: PeeringLimits = PeeringLimits(),
        keepalive: Keepalive = Keepalive(),
    ) -> None:
        self.data_dir = data_dir
        self.flow = flow
        self.metrics = RelayMetrics()
        self.registry = TunnelRegistry()
        self.opener = StreamOpener(self.registry, self.metrics)
        self.user_datagrams: list = []
        self.links = PeerLinks.for_worker(
            data_dir, self.opener, flow=flow, keepalive=keepalive, limits=limits, metrics=self.metrics,
            deliver=self.deliver,
        )
        self.opener.peers = self.links
        self.links.set_apps([APP, FLOW_APP])
        self.node_id = self.links.node_id
        self.address = ""
        self.server: asyncio.AbstractServer | None = None
        self.connectors: list[tuple] = []

    def deliver(self, tunnel, flow_id, data):
        """What the worker's UdpEdge.deliver does with a DATAGRAM from a connector or a link:
        a bridge's side passes it across; the others are a user's flow's (noted here)."""
        endpoint = tunnel.endpoints.get(flow_id)
        if isinstance(endpoint, Side):
            endpoint.deliver(data)
        else:
            self.user_datagrams.append((flow_id, data))

    async def listen(self) -> "Node":
        listener = TlsListener(
            "listen", tlsconfig.server_context(self.data_dir), Admission(ListenLimits(), 1000, self.metrics), self._ready
        )
        self.server = await asyncio.get_running_loop().create_server(listener, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    def _ready(self, transport, slot):
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object.selected_alpn_protocol() == ALPN_PEER:
            return self.links.accept(transport, ssl_object, slot)
        return None

    async def connector(self, connector_id: str = "c-1") -> FarEnd:
        """A connector tunnel of group "g" on this node; the returned FarEnd is the connector."""
        tunnel, far = await tunnel_pair(ConnectorWiring(self, connector_id), mux.Role.RELAY, self.flow)
        far.session = mux.Session(mux.Role.CONNECTOR, self.flow)  # (nothing read or sent yet) the node's windows
        self.connectors.append((tunnel, far))
        return far

    def knows(self, *nodes: "Node", group: str = "g") -> None:
        """Fill the directory by hand, as the worker does from the store: ``nodes`` hold ``group``."""
        self.links.update({group: [n.node_id for n in nodes]}, {n.node_id: n.address for n in nodes})

    async def stop(self) -> None:
        self.links.close()
        for tunnel, far in self.connectors:
            tunnel.close()
            far.sock.close()
        if self.server is not None:
            self.server.close()
        await asyncio.sleep(0)
