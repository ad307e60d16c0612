"""The relay's UDP edge: a published UDP app's port, where each user address becomes a flow.

A flow is a tunnel stream opened with ``"proto": "udp"`` on the least-loaded usable
tunnel of the app's group; its datagrams travel as DATAGRAM frames. It stays on that
tunnel for its whole life (a connector keeps one socket per flow, so the private app
sees one source address per user), until it is idle for ``UdpLimits.idle_timeout``.
If its tunnel dies or the connector drains it (GOING_AWAY), the flow is opened again
on another connector of the group and the user's datagrams carry on from there.

Nothing is queued without a bound: a flow holds at most ``pending_bytes`` while its
stream opens, the tunnel's TLS write buffer is capped by its high mark, and the user
socket's write buffer by ``socket_write_high``. What does not fit is dropped and
counted in the worker's stats (``udp_dropped_*``), as a router would drop it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import socket
import time
from typing import Callable, Iterable

from backhaul.config import UdpLimits
from backhaul.errors import ConfigError
from backhaul.protocol.constants import MAX_DATAGRAM, RETRYABLE_OPEN_FAILURES, ErrorCode, error_name
from backhaul.protocol.mux import SessionError, stream_meta
from backhaul.relay.routing import NoRoute, TunnelRegistry
from backhaul.relay.tcp_edge import OPEN_ATTEMPTS
from backhaul.transport.flow_table import FlowLimitReached, FlowTable
from backhaul.transport.sockets import reuseport_socket
from backhaul.transport.tunnel import Tunnel

log = logging.getLogger("backhaul.relay.udp")

#: Reset codes after which a flow moves to another connector instead of ending.
FAILOVER_CODES = frozenset({ErrorCode.GOING_AWAY, ErrorCode.PEER_DEAD, ErrorCode.REFUSED_STREAM})


def count(stats: dict, key: str, n: int = 1) -> None:
    stats[key] = stats.get(key, 0) + n


class UserFlow:
    """One user address of a UDP app: its tunnel stream, and what it holds while that opens.

    It is the ``StreamEndpoint`` of its stream, so the tunnel hands it OPEN_OK, OPEN_FAIL
    and RST; datagrams from the connector reach it through ``deliver``.
    """

    __slots__ = (
        "edge",
        "client",
        "labels",
        "tunnel",
        "flow_id",
        "accepted",
        "pending",
        "pending_size",
        "tried",
        "started",
        "datagrams_up",
        "datagrams_down",
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
        self.tunnel: Tunnel | None = None
        self.flow_id = 0
        self.accepted = False
        self.pending: collections.deque = collections.deque()
        self.pending_size = 0
        self.tried: list[Tunnel] = []
        self.started = time.monotonic()
        self.datagrams_up = 0
        self.datagrams_down = 0
        self.failovers = 0

    # ------------------------------------------------------------------ opening

    def open(self) -> bool:
        """Open the flow's stream on the least-loaded tunnel not tried yet; False if none takes it."""
        edge = self.edge
        while len(self.tried) < OPEN_ATTEMPTS:
            try:
                tunnel = edge.registry.pick(edge.app.group, self.tried)
            except NoRoute:
                return False
            self.tried.append(tunnel)
            labels = self.labels
            meta = stream_meta(edge.app.name, edge.app.target, "udp", labels["client"], labels["id"])
            try:
                self.flow_id = tunnel.open(meta, self)
            except SessionError:
                continue
            self.tunnel = tunnel
            return True
        return False

    def _failover(self, dead: Tunnel, reason: str) -> None:
        """The flow's tunnel went away: open the flow on another connector, or end it."""
        self.tried = [dead]
        self.failovers += 1
        if self.open():
            count(self.edge.stats, "udp_flows_failed_over")
            log.info("udp flow moved to another connector", extra={**self.labels, "reason": reason})
        else:
            self.edge.end(self, f"its tunnel went away ({reason}) and no other connector took it")

    # ------------------------------------------------------------------ user -> tunnel

    def send(self, data: bytes) -> None:
        stats = self.edge.stats
        if self.accepted:
            if self.tunnel.datagram(self.flow_id, data):
                self.datagrams_up += 1
            else:
                count(stats, "udp_dropped_tunnel_busy")
            return
        size = len(data)
        if self.pending_size + size > self.edge.limits.pending_bytes:
            count(stats, "udp_dropped_queue_full")
            return
        self.pending.append(data)
        self.pending_size += size

    # ------------------------------------------------------------------ tunnel -> user

    def deliver(self, data: bytes) -> None:
        self.datagrams_down += 1
        self.edge.to_user(self, data)

    def close(self, code: int, reason: str) -> None:
        """End the flow from this side: RST to the connector, out of the table."""
        if self.tunnel is not None and not self.tunnel.closed:
            self.tunnel.reset(self.flow_id, code, reason)
        self.tunnel = None
        self.edge.end(self, reason)

    # ------------------------------------------------------------------ StreamEndpoint

    def on_accepted(self) -> None:
        self.accepted = True
        pending, self.pending, self.pending_size = self.pending, collections.deque(), 0
        for data in pending:
            self.send(data)

    def on_rejected(self, code: int, reason: str) -> None:
        self.tunnel = None
        if code in RETRYABLE_OPEN_FAILURES and self.open():
            return
        count(self.edge.stats, "udp_flows_failed")
        self.edge.end(self, f"open refused by the connector: {error_name(code)}: {reason}")

    def on_reset(self, code: int, reason: str) -> None:
        tunnel, self.tunnel = self.tunnel, None
        self.accepted = False
        # While a tunnel dies its streams are reset before it is marked closed; its session knows.
        if tunnel is not None and (tunnel.session.closed or code in FAILOVER_CODES):
            self._failover(tunnel, reason)
            return
        self.edge.end(self, f"reset by the connector: {error_name(code)}: {reason}")

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
        registry: TunnelRegistry,
        limits: UdpLimits,
        stats: dict,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app = app
        self.registry = registry
        self.limits = limits
        self.stats = stats
        self.flows: FlowTable[tuple, UserFlow] = FlowTable(limits.max_flows, limits.idle_timeout, clock)
        self.transport: asyncio.DatagramTransport | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._full = False  # the table is at its limit; logged once per episode, counted always

    @classmethod
    async def start(cls, app, host: str, registry: TunnelRegistry, limits: UdpLimits, stats: dict) -> "UdpApp":
        loop = asyncio.get_running_loop()
        edge = cls(app, registry, limits, stats)
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
        stats = self.stats
        count(stats, "udp_datagrams_in")
        if len(data) > MAX_DATAGRAM:
            count(stats, "udp_dropped_too_big")
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
            count(stats, "udp_dropped_flow_limit")
            if not self._full:
                self._full = True
                log.warning("udp app at its flow limit; datagrams of new users dropped", extra={"app": self.app.name, "limit": str(exc)})
            return
        if not flow.open():
            flows.remove(addr)
            count(stats, "udp_dropped_no_route")
            return
        count(stats, "udp_flows_opened")
        flow.send(data)

    def error_received(self, exc: Exception) -> None:
        # An ICMP error for a datagram sent to a user who has gone; the flow ends when idle.
        count(self.stats, "udp_socket_errors")
        log.debug("udp socket error", extra={"app": self.app.name, "error": str(exc)})

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            log.error("udp app socket lost", extra={"app": self.app.name, "error": str(exc)})

    # ------------------------------------------------------------------ flows

    def to_user(self, flow: UserFlow, data: bytes) -> None:
        stats = self.stats
        transport = self.transport
        if transport is None or transport.is_closing():
            count(stats, "udp_dropped_no_flow")
            return
        if transport.get_write_buffer_size() > self.limits.socket_write_high:
            count(stats, "udp_dropped_socket_busy")
            return
        if not data:
            # asyncio's UDP transports (before Python 3.13, uvloop too) silently skip empty sends.
            count(stats, "udp_dropped_empty")
            return
        self.flows.touch(flow.client)
        transport.sendto(data, flow.client)
        count(stats, "udp_datagrams_out")

    def end(self, flow: UserFlow, reason: str) -> None:
        """The flow is over (whoever ended it): out of the table, datagrams it held dropped."""
        if self.flows.get(flow.client) is flow:
            self.flows.remove(flow.client)
        if len(self.flows) < self.flows.limit:
            self._full = False
        if flow.pending:
            count(self.stats, "udp_dropped_open_failed", len(flow.pending))
            flow.pending.clear()
            flow.pending_size = 0
        count(self.stats, "udp_flows_closed")
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
            count(self.stats, "udp_flows_idle")
            flow.close(ErrorCode.IDLE_TIMEOUT, f"no datagram either way for {self.flows.idle_timeout:g} s")
        return len(idle)

    def _tick(self) -> None:
        self.sweep()
        self._sweeper = asyncio.get_running_loop().call_later(self.flows.sweep_interval, self._tick)


def deliver(tunnel: Tunnel, flow_id: int, data: bytes, stats: dict) -> None:
    """A DATAGRAM from a connector: to the user of its flow, or dropped if the flow is gone."""
    flow = tunnel.endpoints.get(flow_id)
    if isinstance(flow, UserFlow) and flow.accepted:
        flow.deliver(data)
    else:
        count(stats, "udp_dropped_no_flow")


async def reconcile(
    running: dict[str, UdpApp], apps: Iterable, host: str, registry: TunnelRegistry, limits: UdpLimits, stats: dict
) -> None:
    """Start, stop and restart UDP app sockets so that ``running`` matches the store's udp apps."""
    wanted = {app.name: app for app in apps if app.proto == "udp"}
    for name, edge in list(running.items()):
        if wanted.get(name) != edge.app:
            await edge.stop()
            del running[name]
    for name, app in wanted.items():
        if name not in running:
            try:
                running[name] = await UdpApp.start(app, host, registry, limits, stats)
            except (ConfigError, OSError) as exc:
                log.error("cannot start udp app", extra={"app": name, "port": app.port, "error": str(exc)})
