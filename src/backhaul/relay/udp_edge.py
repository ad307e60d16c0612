"""The relay's UDP edge: published UDP apps' ports, where each user address becomes a flow.

A flow is a tunnel stream opened with ``"proto": "udp"`` through relay.opening (the
least-loaded connector of the app's group, the same retries as every edge); its
datagrams travel as DATAGRAM frames. It stays on that tunnel for its whole life (a
connector keeps one socket per flow, so the private app sees one source address per
user), until it is idle for ``UdpLimits.idle_timeout``.
If its tunnel dies or the connector drains it (GOING_AWAY), the flow is opened again
on another connector of the group and the user's datagrams carry on from there.

Nothing is queued without a bound: a flow holds at most ``pending_bytes`` while its
stream opens, the tunnel's TLS write buffer is capped by its high mark, and the user
socket's write buffer by ``socket_write_high``. What does not fit is dropped and
counted by reason in the app's metrics (``udp_dropped_total``), as a router would drop it.
A flow is a stream in the metrics too: opened, active, failed by code, bytes each way.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import socket
import time
from typing import Callable

from backhaul.config import UdpLimits
from backhaul.protocol.constants import MAX_DATAGRAM, ErrorCode, error_name
from backhaul.relay.bridge import Side
from backhaul.relay.metrics import RelayMetrics
from backhaul.relay.opening import CannotOpen, Opening, StreamOpener, reconcile_listeners
from backhaul.transport.flow_table import FlowLimitReached, FlowTable
from backhaul.transport.sockets import reuseport_socket
from backhaul.transport.tunnel import Tunnel

log = logging.getLogger("backhaul.relay.udp")

#: Reset codes after which a flow moves to another connector instead of ending.
FAILOVER_CODES = frozenset({ErrorCode.GOING_AWAY, ErrorCode.PEER_DEAD, ErrorCode.REFUSED_STREAM})


class UserFlow:
    """One user address of a UDP app: its tunnel stream, and what it holds while that opens.

    It is the ``StreamEndpoint`` of its stream, so the tunnel hands it OPEN_OK, OPEN_FAIL
    and RST; datagrams from the connector reach it through ``deliver``.
    """

    __slots__ = (
        "edge",
        "client",
        "labels",
        "opening",
        "tunnel",
        "flow_id",
        "accepted",
        "pending",
        "pending_size",
        "started",
        "datagrams_up",
        "datagrams_down",
        "bytes_up",
        "bytes_down",
        "code",
        "failovers",
    )

    def __init__(self, edge: "UdpApp", client: tuple) -> None:
        self.edge = edge
        self.client = client
        self.labels = {
            "app": edge.app.name,
            "target": edge.app.target,
            "client": f"[{client[0]}]:{client[1]}" if ":" in client[0] else f"{client[0]}:{client[1]}",
            "id": secrets.token_hex(8),
        }
        self.opening: Opening | None = None  # made by start(), once the flow has its place in the table
        self.tunnel: Tunnel | None = None  # the tunnel of the open under way or accepted
        self.flow_id = 0
        self.accepted = False
        self.pending: collections.deque = collections.deque()
        self.pending_size = 0
        self.started = time.monotonic()
        self.datagrams_up = 0  # sent up the tunnel
        self.datagrams_down = 0  # sent to the user
        self.bytes_up = 0  # their payload bytes (the stream's bytes in the metrics)
        self.bytes_down = 0
        #: how the flow ended, as a wire ErrorCode (NO_ERROR: idle, its normal end)
        self.code = ErrorCode.NO_ERROR
        self.failovers = 0

    # ------------------------------------------------------------------ opening

    def start(self) -> bool:
        """Count the flow in and open its stream; False if no connector takes it."""
        edge = self.edge
        labels = self.labels
        self.opening = edge.opener.begin(edge.app, "udp", labels["client"], labels["id"], figures=self)
        return self.open()

    def open(self) -> bool:
        """Open the flow's stream on the next tunnel (StreamOpener's choice); False if none takes it."""
        try:
            self.flow_id = self.opening.open(self)
        except CannotOpen:
            self.tunnel = None
            return False
        self.tunnel = self.opening.tunnel
        return True

    def _failover(self, dead: Tunnel, code: int, reason: str) -> None:
        """The flow's tunnel went away: open the flow on another connector, or end it."""
        self.opening.restart([dead])
        self.failovers += 1
        if self.open():
            self.edge.udp.failed_over += 1
            log.info("udp flow moved to another connector", extra={**self.labels, "reason": reason})
        else:
            self.edge.end(self, f"its tunnel went away ({reason}) and no other connector took it", code)

    # ------------------------------------------------------------------ user -> tunnel

    def send(self, data: bytes) -> None:
        if self.accepted:
            if self.tunnel.datagram(self.flow_id, data):
                self.datagrams_up += 1
                self.bytes_up += len(data)
            else:
                self.edge.udp.dropped["tunnel_busy"] += 1
            return
        size = len(data)
        if self.pending_size + size > self.edge.limits.pending_bytes:
            self.edge.udp.dropped["queue_full"] += 1
            return
        self.pending.append(data)
        self.pending_size += size

    # ------------------------------------------------------------------ tunnel -> user

    def deliver(self, data: bytes) -> None:
        self.edge.to_user(self, data)

    def close(self, code: int, reason: str) -> None:
        """End the flow from this side: RST to the connector, out of the table."""
        if self.tunnel is not None and not self.tunnel.closed:
            self.tunnel.reset(self.flow_id, code, reason)
        self.tunnel = None
        self.edge.end(self, reason, ErrorCode.NO_ERROR if code == ErrorCode.IDLE_TIMEOUT else code)

    # ------------------------------------------------------------------ StreamEndpoint

    def on_accepted(self) -> None:
        self.accepted = True
        self.opening.accepted()
        pending, self.pending, self.pending_size = self.pending, collections.deque(), 0
        for data in pending:
            self.send(data)

    def on_rejected(self, code: int, reason: str) -> None:
        self.tunnel = None
        if self.opening.retryable(code) and self.open():
            return
        self.edge.end(self, f"open refused by the connector: {error_name(code)}: {reason}", code)

    def on_reset(self, code: int, reason: str) -> None:
        tunnel, self.tunnel = self.tunnel, None
        accepted, self.accepted = self.accepted, False
        if self.opening.lost_with_tunnel(accepted):
            # Its tunnel died before OPEN_OK: a refusal like any other, offered to the next connector.
            self.on_rejected(ErrorCode.PEER_DEAD, reason)
            return
        # A flow commits nothing its datagrams have not already carried, so even an accepted one
        # moves when its tunnel dies (its streams are reset before it is marked closed; its
        # session knows) or its connector drains it.
        if tunnel is not None and (tunnel.session.closed or code in FAILOVER_CODES):
            self._failover(tunnel, code, reason)
            return
        self.edge.end(self, f"reset by the connector: {error_name(code)}: {reason}", code)

    def on_data(self, data: bytes, end: bool) -> None:
        self.tunnel.consumed(self.flow_id, len(data))
        self.close(ErrorCode.PROTOCOL_ERROR, "DATA on a UDP flow (flows carry DATAGRAM frames only)")

    def on_end(self) -> None:
        self.close(ErrorCode.PROTOCOL_ERROR, "FIN on a UDP flow (flows end with RST)")

    def on_write_resumed(self) -> None:
        """Flows send no DATA, so no write of theirs ever waits for credit."""


class UdpApp(asyncio.DatagramProtocol):
    """One published UDP app's socket in this worker, and its flows by user address."""

    def __init__(
        self,
        app,
        opener: StreamOpener,
        limits: UdpLimits,
        metrics: RelayMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app = app
        self.opener = opener
        self.limits = limits
        self.metrics = metrics
        #: the app's datagram and drop counters, added to directly (an attribute add per datagram)
        self.udp = metrics.udp(app.name)
        self.flows: FlowTable[tuple, UserFlow] = FlowTable(limits.max_flows, limits.idle_timeout, clock)
        self.transport: asyncio.DatagramTransport | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._full = False  # the table is at its limit; logged once per episode, counted always

    @classmethod
    async def start(cls, app, host: str, opener: StreamOpener, limits: UdpLimits, metrics: RelayMetrics) -> "UdpApp":
        loop = asyncio.get_running_loop()
        edge = cls(app, opener, limits, metrics)
        sock = reuseport_socket(host, app.port, socket.SOCK_DGRAM)
        await loop.create_datagram_endpoint(lambda: edge, sock=sock)
        edge._sweeper = loop.call_later(edge.flows.sweep_interval, edge._tick)
        log.info("udp app listening", extra={"app": app.name, "port": app.port, "target": app.target})
        return edge

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for flow in self.flows.clear():
            flow.close(ErrorCode.CANCEL, "the app was removed or changed")
        if self.transport is not None:
            self.transport.close()
        log.info("udp app stopped", extra={"app": self.app.name, "port": self.app.port})

    # ------------------------------------------------------------------ asyncio

    def connection_made(self, transport: asyncio.DatagramTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        udp = self.udp
        udp.up += 1
        if len(data) > MAX_DATAGRAM:
            udp.dropped["too_big"] += 1
            return
        flows = self.flows
        flow = flows.get(addr)
        if flow is not None:
            flows.touch(addr)
            flow.send(data)
            return
        flow = UserFlow(self, addr)
        try:
            flows.add(addr, flow)
        except FlowLimitReached as exc:
            udp.dropped["flow_limit"] += 1
            if not self._full:
                self._full = True
                log.warning("udp app at its flow limit; datagrams of new users dropped", extra={"app": self.app.name, "limit": str(exc)})
            return
        if not flow.start():
            flows.remove(addr)
            udp.dropped["no_route"] += 1
            flow.opening.done(ErrorCode.REFUSED_STREAM)
            return
        flow.send(data)

    def error_received(self, exc: Exception) -> None:
        # An ICMP error for a datagram sent to a user who has gone; the flow ends when idle.
        self.metrics.count("udp_socket_errors")
        log.debug("udp socket error", extra={"app": self.app.name, "error": str(exc)})

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            log.error("udp app socket lost", extra={"app": self.app.name, "error": str(exc)})

    # ------------------------------------------------------------------ flows

    def to_user(self, flow: UserFlow, data: bytes) -> None:
        udp = self.udp
        udp.down += 1
        transport = self.transport
        if transport is None or transport.is_closing():
            udp.dropped["closing"] += 1
            return
        if transport.get_write_buffer_size() > self.limits.socket_write_high:
            udp.dropped["socket_busy"] += 1
            return
        if not data:
            # asyncio's UDP transports (before Python 3.13, uvloop too) silently skip empty sends.
            udp.dropped["empty"] += 1
            return
        self.flows.touch(flow.client)
        transport.sendto(data, flow.client)
        flow.datagrams_down += 1
        flow.bytes_down += len(data)

    def end(self, flow: UserFlow, reason: str, code: int = ErrorCode.NO_ERROR) -> None:
        """The flow is over (whoever ended it): out of the table, datagrams it held dropped,
        counted out of the metrics with ``code`` (NO_ERROR: its normal end)."""
        if self.flows.get(flow.client) is flow:
            self.flows.remove(flow.client)
        if len(self.flows) < self.flows.limit:
            self._full = False
        if flow.pending:
            self.udp.dropped["open_failed"] += len(flow.pending)
            flow.pending.clear()
            flow.pending_size = 0
        flow.opening.done(code)
        log.info(
            "udp flow ended",
            extra={
                **flow.labels,
                "datagrams_up": flow.datagrams_up,
                "datagrams_down": flow.datagrams_down,
                "failovers": flow.failovers,
                "seconds": round(time.monotonic() - flow.started, 3),
                "result": reason,
            },
        )

    def sweep(self) -> int:
        """End every flow idle for the timeout (RST IDLE_TIMEOUT to its connector); returns how many."""
        idle = self.flows.pop_idle()
        for flow in idle:
            self.udp.idle += 1
            flow.close(ErrorCode.IDLE_TIMEOUT, f"no datagram either way for {self.flows.idle_timeout:g} s")
        return len(idle)

    def _tick(self) -> None:
        self.sweep()
        self._sweeper = asyncio.get_running_loop().call_later(self.flows.sweep_interval, self._tick)


class UdpEdge:
    """Every published UDP app's socket of this worker (a relay.opening.Edge), and the way
    connectors' datagrams reach their flows."""

    def __init__(self, opener: StreamOpener, host: str, limits: UdpLimits, metrics: RelayMetrics) -> None:
        self.opener = opener
        self.host = host  # the address every app port is bound on
        self.limits = limits
        self.metrics = metrics
        self.apps: dict[str, UdpApp] = {}

    async def start(self) -> None:
        """Nothing to bind before the apps are known (set_apps binds their ports)."""

    async def set_apps(self, apps: list) -> None:
        """Serve exactly the UDP apps among ``apps``: a changed app's socket (and flows) start again."""
        await reconcile_listeners(
            self.apps, apps, "udp", lambda app: UdpApp.start(app, self.host, self.opener, self.limits, self.metrics)
        )

    async def stop(self) -> None:
        for running in list(self.apps.values()):
            await running.stop()
        self.apps.clear()

    def deliver(self, tunnel: Tunnel, flow_id: int, data: bytes) -> None:
        """A DATAGRAM from a connector or a peer link: to the user of its flow (or across the
        bridge of a forwarded flow), or dropped if the flow is gone."""
        flow = tunnel.endpoints.get(flow_id)
        if isinstance(flow, UserFlow) and flow.accepted:
            flow.deliver(data)
        elif isinstance(flow, Side):
            flow.deliver(data)  # a flow a peer node forwarded through this one (relay.bridge)
        else:
            # no flow, so no app to count it under
            self.metrics.count("udp_dropped_no_flow")
