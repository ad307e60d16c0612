"""The connector's UDP flows: one connected UDP socket to the target per flow the relay opens.

A flow is allowed exactly like a TCP stream (connector.admission): the pulled
configuration must hold the app it names, as a udp app, with the very target it names.
The socket is connected, so the kernel passes on only datagrams from that target. A
flow ends when the relay resets it, when its tunnel dies, when the configuration stops
allowing it, or after ``UdpLimits.connector_idle_timeout`` seconds without a datagram
either way (a safety net: the relay, which sees the user, normally ends flows first).

Bounds: at most ``max_flows`` flows per worker (more are refused with REFUSED_STREAM,
so the relay tries another connector), ``pending_bytes`` per flow while its socket
connects, ``socket_write_high`` in a socket's write buffer, and the tunnel's TLS
write buffer for datagrams going back. Drops are counted in the worker's metrics
(``ConnectorMetrics.events``, handed in as ``counts``), so they reach /metrics.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Callable

from backhaul.config import UdpLimits
from backhaul.connector import admission
from backhaul.protocol.constants import ErrorCode
from backhaul.transport.flow_table import FlowLimitReached, FlowTable
from backhaul.transport.sockets import parse_hostport
from backhaul.transport.tunnel import Tunnel

log = logging.getLogger("backhaul.connector.udp")


def count(counts: dict[str, int], key: str, n: int = 1) -> None:
    counts[key] = counts.get(key, 0) + n


class TargetFlow(asyncio.DatagramProtocol):
    """One flow: a connected UDP socket to the target, and the tunnel stream it belongs to."""

    def __init__(self, flows: "UdpFlows", tunnel: Tunnel, flow_id: int, labels: dict) -> None:
        self.flows = flows
        self.tunnel = tunnel
        self.flow_id = flow_id
        self.labels = labels
        self.key = (tunnel, flow_id)
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: collections.deque = collections.deque()
        self.pending_size = 0
        self.started = time.monotonic()
        self.datagrams_up = 0  # target -> tunnel
        self.datagrams_down = 0  # tunnel -> target
        self.target_errors = 0
        self.result: str | None = None

    # ------------------------------------------------------------------ tunnel -> target

    def send(self, data: bytes) -> None:
        flows = self.flows
        transport = self.transport
        if transport is None:
            if self.pending_size + len(data) > flows.limits.pending_bytes:
                count(flows.counts, "udp_dropped_queue_full")
                return
            self.pending.append(data)
            self.pending_size += len(data)
            return
        if transport.get_write_buffer_size() > flows.limits.socket_write_high:
            count(flows.counts, "udp_dropped_socket_busy")
            return
        if not data:
            # asyncio's UDP transports (before Python 3.13, uvloop too) silently skip empty sends.
            count(flows.counts, "udp_dropped_empty")
            return
        transport.sendto(data)
        self.datagrams_down += 1

    def flush_pending(self) -> None:
        pending, self.pending, self.pending_size = self.pending, collections.deque(), 0
        for data in pending:
            self.send(data)

    # ------------------------------------------------------------------ asyncio (target socket)

    def connection_made(self, transport: asyncio.DatagramTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        flows = self.flows
        flows.table.touch(self.key)
        if self.tunnel.datagram(self.flow_id, data):
            self.datagrams_up += 1
        else:
            count(flows.counts, "udp_dropped_tunnel_busy")

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and friends: the target is not listening (yet). UDP carries
        # on regardless; the flow ends when idle. Logged once per flow, counted always.
        count(self.flows.counts, "udp_target_errors")
        if not self.target_errors:
            log.warning("udp target error", extra={**self.labels, "error": str(exc)})
        self.target_errors += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if self.result is None:
            self.close(ErrorCode.INTERNAL_ERROR, f"the target socket closed: {exc}" if exc else "the target socket closed")

    # ------------------------------------------------------------------ StreamEndpoint

    def on_accepted(self) -> None:
        """Only the relay opens flows; a connector never waits for OPEN_OK."""

    def on_rejected(self, code: int, reason: str) -> None:
        """Only the relay opens flows; a connector is never refused one."""

    def on_data(self, data: bytes, end: bool) -> None:
        self.tunnel.consumed(self.flow_id, len(data))
        self.close(ErrorCode.PROTOCOL_ERROR, "DATA on a UDP flow (flows carry DATAGRAM frames only)")

    def on_end(self) -> None:
        self.close(ErrorCode.PROTOCOL_ERROR, "FIN on a UDP flow (flows end with RST)")

    def on_reset(self, code: int, reason: str) -> None:
        self.tunnel = None
        self.finish(f"reset by the relay: {reason}")

    def on_write_resumed(self) -> None:
        """Flows send no DATA, so no write of theirs ever waits for credit."""

    # ------------------------------------------------------------------ ending

    def close(self, code: int, reason: str) -> None:
        """End the flow from this side: RST to the relay, socket closed."""
        tunnel, self.tunnel = self.tunnel, None
        if tunnel is not None and not tunnel.closed and tunnel.session.has_stream(self.flow_id):
            tunnel.reset(self.flow_id, code, reason)
        self.finish(reason)

    def finish(self, result: str) -> None:
        """Record how the flow ended (once), close its socket, leave the table."""
        if self.result is not None:
            return
        self.result = result
        if self.transport is not None:
            self.transport.close()
        self.flows.forget(self)
        log.info(
            "udp flow ended",
            extra={
                **self.labels,
                "datagrams_up": self.datagrams_up,
                "datagrams_down": self.datagrams_down,
                "target_errors": self.target_errors,
                "seconds": round(time.monotonic() - self.started, 3),
                "result": result,
            },
        )


class UdpFlows:
    """Every UDP flow of one connector worker, by (tunnel, flow id)."""

    def __init__(
        self,
        limits: UdpLimits,
        counts: dict[str, int],
        open_failure: Callable[[BaseException], tuple[int, str]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        #: the worker's counts by name (``ConnectorMetrics.events``): opened, refused, idle flows, drops
        self.counts = counts
        #: maps a failed socket setup to the OPEN_FAIL code and reason, as for TCP targets
        self.open_failure = open_failure
        self.table: FlowTable[tuple, TargetFlow] = FlowTable(limits.max_flows, limits.connector_idle_timeout, clock)
        self._sweeper: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self.table)

    def start(self) -> None:
        """Begin looking for idle flows (call from inside the event loop)."""
        self._sweeper = asyncio.get_running_loop().call_later(self.table.sweep_interval, self._tick)

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def open(self, tunnel: Tunnel, flow_id: int, meta: dict, connect_timeout: float) -> None:
        """Open a flow the allow-list let through (connector.admission): a socket to its target, then OPEN_OK."""
        labels = {"app": meta.get("app"), "target": meta.get("target"), "client": meta.get("client"), "id": meta.get("id")}
        flow = TargetFlow(self, tunnel, flow_id, labels)
        try:
            self.table.add(flow.key, flow)
        except FlowLimitReached as exc:
            count(self.counts, "udp_flows_refused")
            log.warning("udp flow refused: flow limit", extra={**labels, "reason": str(exc)})
            tunnel.reject(flow_id, ErrorCode.REFUSED_STREAM, f"the connector holds {exc} UDP flows; try another")
            return
        count(self.counts, "udp_flows_opened")
        asyncio.get_running_loop().create_task(self._connect(flow, connect_timeout))

    async def _connect(self, flow: TargetFlow, timeout: float) -> None:
        host, port = parse_hostport(flow.labels["target"], "target")
        tunnel = flow.tunnel
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.create_datagram_endpoint(lambda: flow, remote_addr=(host, port)), timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            code, reason = self.open_failure(exc)
            count(self.counts, "udp_flows_failed")
            if tunnel is not None and not tunnel.closed and tunnel.session.has_stream(flow.flow_id):
                tunnel.reject(flow.flow_id, code, reason)
            flow.tunnel = None
            flow.finish(f"target socket failed: {reason}")
            return
        if flow.result is not None or tunnel.closed or not tunnel.session.has_stream(flow.flow_id):
            flow.tunnel = None
            flow.transport.close()
            flow.finish("cancelled before the target socket was ready")
            return
        tunnel.accept(flow.flow_id, flow)
        flow.flush_pending()

    def from_tunnel(self, tunnel: Tunnel, flow_id: int, data: bytes) -> None:
        """A DATAGRAM from the relay: to its flow's target, or dropped if the flow is gone."""
        key = (tunnel, flow_id)
        flow = self.table.get(key)
        if flow is None:
            count(self.counts, "udp_dropped_no_flow")
            return
        self.table.touch(key)
        flow.send(data)

    def forget(self, flow: TargetFlow) -> None:
        if self.table.get(flow.key) is flow:
            self.table.remove(flow.key)

    def apply_config(self, apps: dict[str, dict]) -> None:
        """End flows the new configuration no longer allows."""
        for flow in self.table:
            if admission.refusal(apps, flow.labels["app"], flow.labels["target"], "udp") is not None:
                flow.close(ErrorCode.TARGET_NOT_ALLOWED, "the app was removed or changed")

    def close_all(self, code: int, reason: str) -> None:
        for flow in self.table.clear():
            flow.close(code, reason)

    def sweep(self) -> int:
        """End every flow idle for the timeout (RST IDLE_TIMEOUT to the relay); returns how many."""
        idle = self.table.pop_idle()
        for flow in idle:
            count(self.counts, "udp_flows_idle")
            flow.close(ErrorCode.IDLE_TIMEOUT, f"no datagram either way for {self.table.idle_timeout:g} s")
        return len(idle)

    def _tick(self) -> None:
        self.sweep()
        self._sweeper = asyncio.get_running_loop().call_later(self.table.sweep_interval, self._tick)