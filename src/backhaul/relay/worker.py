"""One relay worker process: the listen port (tunnels + control API), the edges, routing.

Workers share nothing but the store. Each holds its own tunnels (the connector makes
sure every worker gets some, see docs/architecture.md) and its own edges (TCP apps,
UDP apps, the HTTP edge: relay.opening.Edge) on SO_REUSEPORT sockets, and follows
configuration changes by polling the store's version once a second: every edge is
given all of the store's apps and keeps its own kind. With several nodes it also holds
relay-to-relay links (relay.peering): each poll tells them which nodes hold which groups'
tunnels, and the listen port accepts links other nodes dial.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import logging
import signal
import time
from pathlib import Path
from typing import Callable

import uvloop
from aiohttp import web

from backhaul import __version__, tls_kernel, tlsconfig
from backhaul.config import (
    AdminCenterSettings, ClusterSettings, FloodLimits, FlowControl, LogFiles, HttpLimits, Keepalive, ListenLimits, MemoryTrim, OidcSettings,
    PeeringLimits, TlsSettings, UdpLimits,
)
from backhaul.control.api import build_app
from backhaul.control.context import ControlContext, ControlSettings
from backhaul.control.validate import Invalid, text
from backhaul.errors import BackhaulError
from backhaul.memory import QuietTrim
from backhaul.protocol import mux
from backhaul.protocol.constants import ALPN_HTTP, ALPN_PEER, ALPN_TUNNEL, ErrorCode
from backhaul.relay.accept import Slot, TlsListener, send_alpn_alert
from backhaul.relay.admission import Admission, raise_open_file_limit
from backhaul.relay.control_guard import ControlGuard
from backhaul.relay.http.edge import HttpEdge
from backhaul.relay.membership import Membership
from backhaul.relay.metrics import SPECS, RelayMetrics, node_traffic
from backhaul.relay.opening import Edge, StreamOpener
from backhaul.relay.peering import PeerLinks
from backhaul.relay.preauth.oidc import OidcGate
from backhaul.relay.routing import TunnelRecord, TunnelRegistry
from backhaul.relay.settings import SettingsFile, apply_log_level, split_changes
from backhaul.relay.tcp_edge import TcpEdge
from backhaul.relay.udp_edge import UdpEdge
from backhaul.relayfile import write_relay_file
from backhaul.reporter import Reporter
from backhaul.store import POSTGRES_SCHEMES, Node, open_store
from backhaul.transport import rotation
from backhaul.transport.sockets import parse_hostport, reuseport_socket
from backhaul.transport.tunnel import Tunnel

log = logging.getLogger("backhaul.relay")


@dataclasses.dataclass(frozen=True)
class RelaySettings:
    """What one relay worker needs to run."""

    data_dir: Path
    listen: str = "127.0.0.1:8443"
    http: str | None = None
    #: HTTPS edge: where users reach published HTTP apps over TLS, with the operator's certificate.
    https: str | None = None
    https_cert: Path | None = None
    https_key: Path | None = None
    http_limits: HttpLimits = HttpLimits()
    #: The listen port's timeouts and caps, and the worker's descriptor reserve.
    listen_limits: ListenLimits = ListenLimits()
    worker: int = 0
    workers: int = 1
    flow: FlowControl = FlowControl()
    keepalive: Keepalive = Keepalive()
    udp: UdpLimits = UdpLimits()
    #: How often the store's config version is checked.
    poll_interval: float = 1.0
    #: How long a draining relay lets streams finish.
    drain_timeout: float = 10.0
    #: Lifetime of the connector certificates this relay signs, seconds (None: the control plane's default).
    cert_validity: float | None = None
    #: Inactive connectors: removal period, status grace and housekeeping interval, seconds
    #: (None: the control plane's defaults, control.context.ControlSettings).
    remove_inactive_after: float | None = None
    inactive_grace: float | None = None
    housekeeping_interval: float | None = None
    #: The run dir the supervisor prepared for figures; None: no metrics.
    run_dir: Path | None = None
    #: The metrics listening socket the supervisor made, served by worker 0.
    metrics_fd: int | None = None
    #: Seconds between two publications of this worker's figures.
    stats_interval: float = 1.0
    #: The OpenID Connect issuer of ``--preauth oidc`` apps (None: such apps are refused).
    oidc: OidcSettings | None = None
    #: The admin center at /admin/ (its OIDC sign-in uses ``oidc``).
    admin_center: AdminCenterSettings = AdminCenterSettings()
    #: Relay-to-relay links: dial timeout, redial backoff, links accepted at most.
    peering: PeeringLimits = PeeringLimits()
    #: This relay node's id (service.json's; "": read it from the data dir).
    node_id: str = ""
    #: The store: a postgresql:// URL (several nodes) or None, the data dir's SQLite.
    store: str | None = None
    #: HOST:PORT connectors dial to reach this node ("": --listen).
    advertise: str = ""
    #: HOST:PORT other nodes dial for relay-to-relay links ("": the advertise address).
    peer_advertise: str = ""
    #: Several nodes: heartbeats, freshness of the nodes table, how many nodes at most.
    cluster: ClusterSettings = ClusterSettings()
    #: When the worker gives the memory of a finished burst back to the system.
    memory: MemoryTrim = MemoryTrim()
    #: Tunnel TLS: suites and their order, kernel TLS, key rotation (``--tls NAME=VALUE``).
    tls: TlsSettings = TlsSettings()
    #: What a connector may make the relay do for nothing, per tunnel (``[floods]``).
    floods: FloodLimits = FloodLimits()
    #: The relay's admin log (``--log-dir``; None directory: stderr only).
    log_files: LogFiles = LogFiles()
    #: The command line and the settings file under it, read again on SIGHUP (relay/settings.py);
    #: ``given`` is what they said when these settings were built.
    settings_file: SettingsFile | None = None
    given: argparse.Namespace | None = None
    #: Builds checked settings from such arguments (relay.service.build_settings, passed in).
    rebuild: Callable[[argparse.Namespace], "RelaySettings"] | None = None


def node_record(settings: RelaySettings, node_id: str) -> Node:
    """This node as it registers in the store (the times are the store's)."""
    advertise = settings.advertise or settings.listen
    return Node(node_id, advertise, settings.peer_advertise or advertise, __version__, 0.0, 0.0)


def _node_id(settings: RelaySettings) -> str:
    if settings.node_id:
        return settings.node_id
    from backhaul.control.init import ensure_node_id

    return ensure_node_id(settings.data_dir)


def register_node(settings: RelaySettings) -> None:
    """Register the node from the supervisor, before it forks workers (its store is closed again)."""
    store = open_store(settings.store or settings.data_dir, cluster=settings.cluster)
    try:
        store.register_node(node_record(settings, _node_id(settings)))
    finally:
        store.close()


class RelayWorker:
    """The relay's data plane and control API inside one process."""

    def __init__(self, settings: RelaySettings) -> None:
        self.settings = settings
        self.node_id = _node_id(settings)
        self.store = open_store(settings.store or settings.data_dir, cluster=settings.cluster)
        #: set when the store's configuration may have changed (the listener below; the poll
        #: runs at least every poll_interval anyway)
        self._wake = asyncio.Event()
        self._changes = None
        if isinstance(settings.store, str) and settings.store.startswith(POSTGRES_SCHEMES):
            from backhaul.store.notify import ChangeListener

            self._changes = ChangeListener(settings.store, self._wake.set, check_interval=settings.cluster.heartbeat_interval)
        self.registry = TunnelRegistry()
        #: every figure of the worker: streams, tunnels, UDP datagrams, and its events by name
        self.metrics = RelayMetrics()
        #: how every edge opens streams to connectors
        self.opener = StreamOpener(self.registry, self.metrics, limits=settings.peering)
        self._reporter: Reporter | None = None
        self._app_names: list[str] = []
        #: the read buffer every user socket of this process is read into (see transport.pipe)
        self.read_buffer = memoryview(bytearray(settings.flow.read_size))
        self.config_version = -1
        #: pre-authentication of oidc apps (preauth.contract.Gate); None refuses them
        self.gate = None
        self._host, self._port = parse_hostport(settings.listen, "--listen")
        #: UDP apps, and where the connectors' datagrams go (from the first tunnel on)
        self.udp_edge = UdpEdge(self.opener, self._host, settings.udp, self.metrics)
        self.http_edge: HttpEdge | None = None
        #: where users come in, reconciled with the store one way (the TCP and HTTP edges
        #: are made in start(): they need the connection budget)
        self.edges: list[Edge] = []
        self._http_server = None
        self._runner = None
        self._servers: list[asyncio.AbstractServer] = []
        #: the connection budget of this process, shared by every listener (made in start())
        self.admission: Admission | None = None
        self._listener: TlsListener | None = None
        #: links to the other relay nodes (made in start(); None: the certificate names no node)
        self.peers: PeerLinks | None = None
        #: this worker as a node of the service in the store: registration, heartbeat, tunnel
        #: rows, the store away (relay.membership)
        self.membership = Membership(self.store, node_record(settings, self.node_id), settings.worker, self.registry, settings.cluster)
        #: the up nodes of the service ({"id", "listen"}), as connectors are told in the hello
        #: and whenever the set changes (CONTROL ``nodes``)
        self.nodes: list[dict] = []
        self._stopping = asyncio.Event()
        #: gives the memory of a finished burst back (backhaul.memory)
        self.memory = QuietTrim(settings.memory, worker=settings.worker)
        #: whether kernel TLS could apply here, looked at once (each tunnel's "tunnel up" says)
        self.ktls = tls_kernel.detect(bool(settings.tls.ktls))
        #: tunnels whose TLS keys are due, draining until their streams end (transport/rotation.py)
        self.rotations = rotation.Rotations(settings.tls)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.membership.start()
        if self._changes is not None:
            self._changes.start()
        reserved = {self._port}
        if self.settings.http:
            reserved.add(parse_hostport(self.settings.http, "--http")[1])
        if self.settings.https:
            reserved.add(parse_hostport(self.settings.https, "--https")[1])
        given = {
            name: getattr(self.settings, name)
            for name in ("cert_validity", "remove_inactive_after", "inactive_grace", "housekeeping_interval")
            if getattr(self.settings, name) is not None
        }
        control_settings = ControlSettings(reserved_ports=frozenset(reserved), **given)
        control = ControlContext.load(
            self.settings.data_dir, worker=self.settings.worker, store=self.store, settings=control_settings
        )
        run_dir = self.settings.run_dir
        app = build_app(
            control, update_reports=self.metrics.update_reports, admin_center=self.settings.admin_center, oidc=self.settings.oidc,
            traffic=functools.partial(node_traffic, run_dir) if run_dir is not None else None,
            admin_log_dir=self.settings.log_files.directory,
        )
        limits = self.settings.listen_limits
        # aiohttp's keep-alive timeout closes a control connection idle between requests;
        # ControlGuard adds the idle-before-the-first-request, head and body timers aiohttp
        # lacks. aiohttp's timer also runs from the connection's start, so it gets a second
        # more than the guard's: the guard, which logs, fires first.
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, keepalive_timeout=limits.idle_timeout + 1.0
        )
        await self._runner.setup()
        self._http_server = self._runner.server
        self.admission = Admission.for_process(limits, self.metrics)
        self.peers = PeerLinks.for_worker(
            self.settings.data_dir, self.opener, flow=self.settings.flow, keepalive=self.settings.keepalive,
            limits=self.settings.peering, metrics=self.metrics, deliver=self.udp_edge.deliver,
            worker=self.settings.worker, max_nodes=self.settings.cluster.max_nodes,
        )
        self.opener.peers = self.peers
        ssl_context = tlsconfig.server_context(
            self.settings.data_dir, on_alpn_refused=send_alpn_alert, tls=self.settings.tls
        )
        self._listener = TlsListener(
            "listen", ssl_context, self.admission, self._tls_ready, max_per_address=limits.max_per_address
        )
        sock = reuseport_socket(self._host, self._port)
        server = await loop.create_server(self._listener, sock=sock, backlog=4096)
        self._servers.append(server)
        if self.settings.oidc is not None:
            self.gate = OidcGate.create(self.settings.data_dir, self.settings.oidc)
            self.gate.warm_up()
        listeners = []
        if self.settings.http:
            listeners.append((*parse_hostport(self.settings.http, "--http"), None))
        if self.settings.https:
            edge_tls = tlsconfig.edge_context(self.settings.https_cert, self.settings.https_key)
            listeners.append((*parse_hostport(self.settings.https, "--https"), edge_tls))
        tcp_edge = TcpEdge(
            self.opener, self._host, self.settings.flow, self.read_buffer, self.metrics, admission=self.admission
        )
        self.http_edge = HttpEdge(
            self.opener, self.settings.flow, self.settings.http_limits,
            gate=self.gate, metrics=self.metrics, admission=self.admission, listeners=listeners,
        )
        self.edges = [tcp_edge, self.udp_edge, self.http_edge]
        for edge in self.edges:
            await edge.start()
        await self.reload()
        self.memory.start()
        if self.settings.run_dir is not None:
            self._reporter = Reporter(self.settings.run_dir, SPECS, self._snapshot, self.settings.stats_interval)
            await self._reporter.start(self.settings.metrics_fd if self.settings.worker == 0 else None)
        if self.settings.worker == 0:
            # The listen port is bound: tell the admin CLI on this host where (backhaul/relayfile.py).
            write_relay_file(self.settings.data_dir, self._host, self._port, self.settings.listen, self.settings.advertise)
        log.info(
            "relay worker ready",
            extra={
                "worker": self.settings.worker,
                "listen": self.settings.listen,
                "version": __version__,
                "connection_budget": self.admission.budget,
            },
        )

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT, then drain."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop_requested)
        await self.start()
        loop.add_signal_handler(signal.SIGHUP, self.reload_settings)
        while not self._stopping.is_set():
            try:
                # Woken by a change notification (PostgreSQL) or a stop; else poll every poll_interval.
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            if not self._stopping.is_set():
                self.rotate_keys()
                await self._poll()
        await self.stop()

    def reload_settings(self) -> None:
        """SIGHUP: read the settings file again and apply what can change live; keys that need
        a restart are refused (logged, the running values kept), and so is a bad file whole."""
        source, given, rebuild = self.settings.settings_file, self.settings.given, self.settings.rebuild
        if source is None or given is None or rebuild is None or self._stopping.is_set():
            return
        try:
            new_given = source.merged()
            new = rebuild(new_given)
        except BackhaulError as exc:
            log.error(
                "settings file refused; the relay keeps its running settings",
                extra={"worker": self.settings.worker, "file": str(source.config), "error": str(exc)},
            )
            return
        live, restart = split_changes(given, new_given)
        self.settings = dataclasses.replace(
            self.settings, given=new_given, http_limits=new.http_limits, listen_limits=new.listen_limits,
            floods=new.floods, keepalive=new.keepalive, cluster=new.cluster,
        )
        if restart:
            # What is running keeps those keys; given keeps the old values, so the next
            # reload says so again until the restart.
            kept = {key: getattr(given, key, None) for key in restart}
            self.settings = dataclasses.replace(self.settings, given=argparse.Namespace(**{**vars(new_given), **kept}))
            log.warning(
                "settings need a restart; the running values are kept",
                extra={"worker": self.settings.worker, "file": str(source.config), "keys": restart, "needs": "a restart"},
            )
        if "log_level" in live:
            apply_log_level(new_given.log_level or "info")
        if self.http_edge is not None:
            self.http_edge.limits = self.settings.http_limits
        if self.admission is not None:
            self.admission.limits = self.settings.listen_limits
        if self._listener is not None:
            self._listener.max_per_address = self.settings.listen_limits.max_per_address
            self._listener.address_share = self.settings.listen_limits.address_share
        log.info(
            "settings reloaded",
            extra={"worker": self.settings.worker, "file": str(source.config), "applied": sorted(live), "need_restart": restart},
        )

    def _stop_requested(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def stop(self) -> None:
        self.memory.stop()
        for server in self._servers:
            server.close()
        grace = self.settings.cluster.drain_grace if len(self.nodes) > 1 and self._stopping.is_set() else 0.0
        if grace:
            # The listen port is closed (a balancer's check of it fails, connectors dial other
            # nodes); the user ports stay open until the balancer has moved users away, else a
            # connection it sent meanwhile would be reset in a closing port's accept queue.
            log.info(
                "relay node draining: listen port closed, user ports close after the grace",
                extra={"worker": self.settings.worker, "grace": grace},
            )
            await asyncio.sleep(grace)
        for edge in self.edges:
            await edge.stop()
        for tunnel in self.registry.tunnels():
            tunnel.goaway(ErrorCode.NO_ERROR, "relay shutting down")
        if self.peers is not None:
            self.peers.drain()
        deadline = time.monotonic() + self.settings.drain_timeout
        while self._in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for tunnel in self.registry.tunnels():
            tunnel.close(ErrorCode.NO_ERROR, "relay shutting down")
        if self.peers is not None:
            self.peers.close()
        if self._changes is not None:
            await self._changes.close()
        self.membership.stop()
        if self._reporter is not None:
            await self._reporter.stop()
        if self.gate is not None:
            await self.gate.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.admission is not None:
            self.admission.close()
        log.info("relay worker stopped", extra={"worker": self.settings.worker, **self.metrics.events})

    def _in_flight(self) -> bool:
        """Streams still open on a connector tunnel or a peer link (a drain waits for them)."""
        return any(t.load for t in self.registry.tunnels()) or (self.peers is not None and self.peers.load > 0)

    async def _poll(self) -> None:
        polled = await self.membership.poll()
        if polled is None:
            return  # the store is away (logged once): relaying goes on with what the worker knows
        version, group_nodes, listed = polled
        self._apply_nodes(group_nodes, listed)
        if version != self.config_version:
            await self.reload()

    def _apply_nodes(self, group_nodes: dict[str, list[str]], listed: list) -> None:
        """Give the links the nodes' routes and the nodes they may accept links from (every
        node listed, up or down: a removed node's certificate opens no link); tell connectors
        when the up nodes changed, so they re-home onto a new node or off a gone one without
        waiting for their next config pull."""
        up = [n for n in listed if n.status == "up"]
        if self.peers is not None:
            self.peers.update(group_nodes, {n.id: n.peer or n.listen for n in up}, registered={n.id for n in listed})
        nodes = [{"id": n.id, "listen": n.listen} for n in up]
        if nodes == self.nodes:
            return
        self.nodes = nodes
        for tunnel in self.registry.tunnels():
            tunnel.control({"type": "nodes", "nodes": nodes})

    def refresh_peers(self) -> None:
        """Read and apply the nodes now (at a reload); a store that cannot answer leaves the
        links and connectors what they knew."""
        try:
            nodes = self.membership.read_nodes()
        except Exception:
            log.exception("cannot read the relay nodes from the store; peer links keep what they knew")
            return
        self._apply_nodes(*nodes)

    async def reload(self) -> None:
        """Bring listeners and tunnel groups in line with the store."""
        self.config_version = self.store.config_version()
        apps = self.store.list_apps()
        self._app_names = [app.name for app in apps]
        for edge in self.edges:
            await edge.set_apps(apps)
        if self.peers is not None:
            self.peers.set_apps(apps)
        self.refresh_peers()
        # After the edges: the streams of a removed app have ended by now (its UDP flows with
        # its socket), so its figures go in this reload.
        self.metrics.prune(set(self._app_names), self._connector_exists)
        for connector_id in self.registry.connectors():
            record = self.membership.connector(connector_id)  # the store's, remembered for an outage
            if record is None or record.revoked:
                for tunnel in self.registry.tunnels(connector_id):
                    tunnel.close(ErrorCode.NO_ERROR, "connector deleted or revoked")
                continue
            self.registry.set_group(connector_id, record.group)
        for tunnel in self.registry.tunnels():
            tunnel.control({"type": "config_changed", "version": self.config_version})
        if self.admission is not None:
            self.admission.recount()  # app listeners came or went: they are descriptors too

    def rotate_keys(self, now: float | None = None) -> None:
        """Rotate the tunnels whose TLS keys are due (GOAWAY "key rotation": routing skips them,
        the connector dials successors) and close the rotated ones once their streams ended
        (transport/rotation.py). At each store poll, never per frame."""
        now = time.monotonic() if now is None else now
        for tunnel in self.registry.tunnels():
            if tunnel.closed or (tunnel not in self.rotations and not tunnel.usable):
                continue
            verdict = self.rotations.decide(tunnel, now)
            if verdict == rotation.ROTATE:
                self._rotating(tunnel, now)
                tunnel.goaway(ErrorCode.NO_ERROR, rotation.ROTATION_REASON)
            elif verdict == rotation.CLOSE:
                tunnel.close(ErrorCode.NO_ERROR, rotation.ROTATION_REASON)

    def _rotating(self, tunnel: Tunnel, now: float, by: str = "relay") -> None:
        if tunnel in self.rotations:
            return
        self.rotations.started(tunnel, now)
        self.metrics.count("tunnels_rotated")
        self.membership.uncount(tunnel)
        log.info(
            "tunnel rotated: its TLS keys are due",
            extra={
                "connector": tunnel.info.connector_id, "tunnel": tunnel.name, "by": by,
                "records": self.rotations.records(tunnel), "streams": tunnel.load,
            },
        )

    def _connector_exists(self, connector_id: str) -> bool:
        record = self.membership.connector(connector_id)
        return record is not None and not record.revoked

    def _snapshot(self) -> dict:
        return self.metrics.snapshot(
            self.registry.tunnels(), self._app_names, self.config_version, self.settings.worker
        )

    # ------------------------------------------------------------------ listen port

    def _tls_ready(self, transport: asyncio.Transport, slot: Slot) -> asyncio.BaseProtocol | None:
        """The ALPN split of the listen port: what a connection becomes once its handshake is done.

        ``backhaul/1`` is a tunnel (a connector's certificate only); ``backhaul-peer/1`` a
        relay-to-relay link (a node's certificate only, relay.peering); ``http/1.1`` or no
        ALPN (aiohttp's client offers none) is the control API. A client offering only other
        protocols never gets here: the handshake refuses it (tlsconfig.server_context). None
        closes the connection.
        """
        ssl_object = transport.get_extra_info("ssl_object")
        alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        if alpn == ALPN_TUNNEL:
            return self.accept_tunnel(transport, ssl_object, slot)
        if alpn == ALPN_PEER:
            if self.peers is None:
                log.warning(
                    "peer link refused: this relay's certificate names no node (an old data dir)",
                    extra={"peer": str(transport.get_extra_info("peername"))},
                )
                return None
            return self.peers.accept(transport, ssl_object, slot)
        if alpn in (ALPN_HTTP, None):
            return self.http_protocol(slot)
        log.warning("connection with unknown ALPN closed", extra={"alpn": alpn})
        return None

    def http_protocol(self, slot: Slot | None = None) -> asyncio.Protocol:
        """aiohttp's protocol for one control API connection, behind the listen port's timers."""
        return ControlGuard(
            self._http_server(), self.settings.listen_limits, slot.release if slot is not None else None, self.metrics
        )

    def accept_tunnel(self, transport: asyncio.Transport, ssl_object, slot: Slot | None = None) -> Tunnel | None:
        """The tunnel protocol of an authenticated connector's connection, or None (refused, logged)."""
        peer = transport.get_extra_info("peername")
        connector_id = tlsconfig.peer_connector_id(ssl_object)
        if connector_id is None:
            log.warning("tunnel without a connector certificate refused", extra={"peer": str(peer)})
            return None
        record = self.membership.connector(connector_id)
        if record is None or not record.accepts_serial(tlsconfig.peer_cert_serial(ssl_object), time.time()):
            log.warning(
                "tunnel refused: connector unknown, revoked or certificate replaced",
                extra={"connector": connector_id, "peer": str(peer)},
            )
            return None
        session = mux.Session(mux.Role.RELAY, self.settings.flow, self.settings.keepalive, floods=self.settings.floods)
        tunnel = Tunnel(session, self, name=f"{connector_id}@{self.settings.worker}", flow=self.settings.flow)
        # The slot is released in tunnel_down, which every tunnel reaches once.
        tunnel.peer_id = connector_id
        tunnel.info = TunnelRecord(connector_id, record.group, slot)
        return tunnel

    # ------------------------------------------------------------------ TunnelOwner

    def tunnel_up(self, tunnel: Tunnel) -> None:
        record: TunnelRecord = tunnel.info
        connector_id = record.connector_id
        self.registry.add(tunnel)
        self.metrics.tunnel_opened(connector_id)
        self.membership.count(tunnel)
        tunnel.control(
            {
                "type": "hello",
                "worker": self.settings.worker,
                "workers": self.settings.workers,
                "connector_id": connector_id,
                "config_version": self.config_version,
                "version": __version__,
                # The node that answered and the up nodes (connector/nodes.py); none on a
                # one-node service, whose connectors then dial their enrolled address only.
                "node": self.node_id,
                "nodes": self.nodes,
            }
        )
        ktls, ktls_reason = tls_kernel.for_transport(self.ktls, tunnel.transport.get_extra_info("ssl_object"))
        log.info(
            "tunnel up",
            extra={
                "connector": connector_id, "peer": tunnel.peer, "worker": self.settings.worker,
                "ktls": ktls, "ktls_reason": ktls_reason,
            },
        )

    def tunnel_down(self, tunnel: Tunnel, code: int, reason: str) -> None:
        record: TunnelRecord = tunnel.info
        self.registry.remove(tunnel)
        self.rotations.forget(tunnel)
        slot, record.listen_slot = record.listen_slot, None
        if slot is not None:
            slot.release()
        if tunnel.streams_lost:
            # Streams not yet accepted were retried on another connector; the others were cut.
            self.metrics.count("streams_lost", tunnel.streams_lost)
            log.warning(
                "connector tunnel ended with streams on it",
                extra={
                    "connector": record.connector_id,
                    "tunnel": tunnel.name,
                    "streams": tunnel.streams_lost,
                    "code": code,
                    "reason": reason,
                },
            )
        self.metrics.tunnel_closed(tunnel)
        self.membership.uncount(tunnel)

    def stream_opened(self, tunnel: Tunnel, stream_id: int, meta: dict) -> None:
        tunnel.reject(stream_id, ErrorCode.PROTOCOL_ERROR, "the relay does not accept streams from connectors")

    def control_received(self, tunnel: Tunnel, message: dict) -> None:
        if message.get("type") == "health":
            self._health_received(tunnel, message)
            return
        if message.get("type") != "hello":
            log.debug("control message from connector ignored", extra={"tunnel": tunnel.name, "message": message})
            return
        boot = message.get("boot")
        tunnel.info.boot = boot
        connector_id = tunnel.info.connector_id
        for other in self.registry.tunnels(connector_id):
            if other.info.boot not in (None, boot):
                # The connector restarted: its old tunnels are dead even if no FIN reached us.
                other.close(ErrorCode.GOING_AWAY, "replaced by the connector's new instance")
        self._record_version(connector_id, message.get("version"))

    def _record_version(self, connector_id: str, version) -> None:
        """The connector's hello names the version it runs: recorded at once, so `connector list`
        shows a new version as soon as the connector's tunnels are up, not at its next heartbeat."""
        try:
            version = text(version, "version")
        except Invalid:
            log.warning("connector hello with a malformed version ignored", extra={"connector": connector_id})
            return
        if not version or not self.membership.up:
            return  # a connector that does not say, or no store to say it to (the heartbeat will)
        try:
            if self.store.set_connector_version(connector_id, version):
                log.info("connector version recorded from its hello", extra={"connector": connector_id, "version": version})
        except Exception:
            log.exception("cannot record the connector's version in the store; its next heartbeat will")

    def _health_received(self, tunnel: Tunnel, message: dict) -> None:
        """The connector says which apps' origins it can reach; routing follows at once."""
        apps = message.get("apps")
        if not isinstance(apps, dict):
            log.warning("health message without an apps object ignored", extra={"tunnel": tunnel.name})
            return
        ignored = self.registry.report_health(tunnel, apps)
        if ignored:
            log.warning("health report entries ignored", extra={"tunnel": tunnel.name, "ignored": ignored})
        log.debug("origin health reported", extra={"tunnel": tunnel.name, "apps": apps})

    def goaway_received(self, tunnel: Tunnel, code: int, reason: str) -> None:
        # Tunnel.usable is already False (the session is draining): routing skips it from now on.
        log.info("connector draining its tunnel", extra={"tunnel": tunnel.name, "reason": reason})
        self.membership.uncount(tunnel)
        if reason == rotation.ROTATION_REASON:
            self._rotating(tunnel, time.monotonic(), by="connector")  # closed here too once its streams end

    def datagram_received(self, tunnel: Tunnel, flow_id: int, data: bytes) -> None:
        self.udp_edge.deliver(tunnel, flow_id, data)


def run_worker(settings: RelaySettings) -> None:
    """Process entry point of one relay worker."""
    # Every tunnel and user connection holds a descriptor; Admission keeps a reserve below this.
    soft, hard = raise_open_file_limit()
    log.debug("open-file limit", extra={"soft": soft, "hard": hard})
    uvloop.run(RelayWorker(settings).run())
