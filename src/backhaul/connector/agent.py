"""One connector worker process: its life (start, drain, SIGHUP reload) and its tunnels' events.

The parts it delegates to, one concept each: the tunnels and the relay nodes they go to
(connector.homes, with connector.slots per address and connector.nodes deciding), the
control API's config, heartbeat and renewal (connector.upkeep), the allow-list
(connector.admission), the streams to private targets (connector.streams), UDP flows
(connector.udp_flows), origin health (connector.health) and the figures and session
log (connector.observer). The agent is the ``TunnelOwner`` of every tunnel: it hands
each event to the part it concerns.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time
from typing import Callable

import uvloop

from backhaul import __version__, tls_kernel
from backhaul.connector import admission, health, udp_flows
from backhaul.connector.http_target import BackendTls
from backhaul.connector.metrics import ConnectorMetrics, WorkerNow
from backhaul.connector.observer import Observer
from backhaul.connector.settings import ConnectorSettings, apply_log_level, split_changes
from backhaul.connector.homes import TunnelHomes
from backhaul.connector.state import ConnectorState
from backhaul.connector.streams import TargetStreams, open_failure
from backhaul.connector.upkeep import Upkeep
from backhaul.errors import BackhaulError
from backhaul.logs import add_admin_log
from backhaul.memory import QuietTrim
from backhaul.protocol.constants import ErrorCode
from backhaul.supervisor import EXIT_NO_RESTART
from backhaul.transport import rotation
from backhaul.transport.tunnel import Tunnel

log = logging.getLogger("backhaul.connector")


class ConnectorAgent:
    """Life and tunnel events of one connector worker (see the module docstring)."""

    def __init__(self, settings: ConnectorSettings, reload: Callable[[], ConnectorSettings] | None = None) -> None:
        self.settings = settings
        #: builds the settings anew from their file and flags (SIGHUP)
        self._load_settings = reload
        self.state = ConnectorState.load(settings.state_dir)
        #: the apps of the pulled configuration, by name
        self.apps: dict[str, dict] = {}
        self._serving = False
        self._stopping = asyncio.Event()
        self._draining = False
        #: the relay answered that this connector is deleted: stop, and do not come back
        self.deleted = False
        #: every count of this worker (what /metrics and the drain's log line show)
        self.metrics = ConnectorMetrics()
        self.observer = Observer(settings, self.state.connector_id, self.metrics, self._now)
        #: TLS contexts for the https backends of http apps
        self.backend_tls = BackendTls()
        self.origins = health.HealthMonitor(settings.health, self._origins_changed, self.backend_tls)
        self.homes = TunnelHomes(self._current, self.state, self, self._stopping)
        self.upkeep = Upkeep(
            self._current,
            self.state,
            self._stopping,
            self._apply_config,
            self._renewed,
            self._deleted,
            self._load,
            nodes=self.homes.learn,
            fallbacks=self.homes.fallback_urls,
        )
        self.streams = TargetStreams(self._current, self.metrics, self.observer.session_log, self.origins, self.backend_tls)
        self.udp = udp_flows.UdpFlows(settings.udp, self.metrics.events, open_failure)
        #: gives the memory of a finished burst back (backhaul.memory)
        self.memory = QuietTrim(settings.memory, worker=settings.worker)
        #: whether kernel TLS could apply here, looked at once (each tunnel's "tunnel up" says)
        self.ktls = tls_kernel.detect(bool(settings.tls.ktls))
        #: tunnels whose TLS keys are due, draining while their successors are dialed
        self.rotations = rotation.Rotations(settings.tls)

    def _current(self) -> ConnectorSettings:
        return self.settings

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT, then drain."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self.homes.use_credentials(self.state)
        self.upkeep.open()
        try:
            await self.observer.start()
            await self.upkeep.pull(initial=True)
            if self._stopping.is_set():
                return
            self.homes.start()
            self._serving = True
            self.udp.start()
            self.upkeep.start()
            self.memory.start()
            checker = asyncio.create_task(self.origins.run())
            rotator = asyncio.create_task(self._rotate_keys_loop())
            await self._stopping.wait()
            self.upkeep.stop()
            checker.cancel()
            rotator.cancel()
            await self.drain()
        finally:
            self.memory.stop()
            await self.observer.stop()
            await self.upkeep.close()

    async def drain(self) -> None:
        """GOAWAY on every tunnel, let streams finish until the drain deadline, reset the rest, close.

        The relay takes GOAWAY as "no new streams on this tunnel" at once; an OPEN that
        crossed it is refused with REFUSED_STREAM, which the relay retries elsewhere.
        """
        self._draining = True
        started = time.monotonic()
        deadline = self.settings.drain_timeout
        for tunnel in list(self.homes.tunnels):
            tunnel.goaway(ErrorCode.NO_ERROR, "connector draining")
        # After the GOAWAYs, so the relay moves these flows to other connectors, not to our other tunnels.
        self.udp.stop()
        self.udp.close_all(ErrorCode.GOING_AWAY, "connector draining")
        in_flight = self.homes.streams_open()
        log.info("draining", extra={"worker": self.settings.worker, "streams": in_flight, "deadline": deadline})
        while self.homes.streams_open() and time.monotonic() < started + deadline:
            await asyncio.sleep(0.05)
        cut = self.homes.streams_open()
        self.streams.cut("the connector's drain deadline passed")
        self.homes.close()
        tunnels = list(self.homes.tunnels)
        for tunnel in tunnels:
            # also resets streams whose target was still connecting
            tunnel.close(ErrorCode.GOING_AWAY if cut else ErrorCode.NO_ERROR, "connector stopped")
        # Let the GOAWAY and resets leave before the process exits; bounded, a dead peer must not hold us.
        close_by = time.monotonic() + 1.0
        while any(not t.lost for t in tunnels) and time.monotonic() < close_by:
            await asyncio.sleep(0.01)
        log.info(
            "connector worker drained",
            extra={
                "worker": self.settings.worker,
                "streams_in_flight": in_flight,
                "streams_ended": in_flight - cut,
                "streams_cut": cut,
                "seconds": round(time.monotonic() - started, 3),
                **self.metrics.totals(),
            },
        )

    def _deleted(self, exc: Exception) -> None:
        """The relay says this connector is unknown or revoked: drain and stop for good.

        Only that explicit answer gets here (see control_client.DELETED_CODES); the one
        error line telling the operator to re-register is the supervisor's, once for all
        workers.
        """
        if not self.deleted:
            log.info("the relay refused this connector as deleted; stopping", extra={"worker": self.settings.worker, "error": str(exc)})
        self.deleted = True
        self._stopping.set()

    # ------------------------------------------------------------------ SIGHUP

    def reload(self) -> None:
        """Read the settings and the state dir's credentials again; apply what can change live."""
        if self._load_settings is None or self._draining or not self.upkeep.opened:
            return  # nothing to reload, or not started yet, or stopping anyway
        try:
            new = self._load_settings()
        except BackhaulError as exc:
            log.error("settings not reloaded; keeping the current ones", extra={"error": str(exc)})
            return
        live, restart = split_changes(self.settings, new)
        self.settings = dataclasses.replace(self.settings, **live)
        if "log_level" in live:
            apply_log_level(self.settings.log_level)
        if self._serving and ("tunnels" in live or "max_slots" in live):
            self.homes.resize()
        if self._serving and "relay_nodes" in live:
            self.homes.replan()
        if self._serving and "heartbeat_interval" in live:
            self.upkeep.restart_heartbeat()
        self._reload_credentials()
        log.info(
            "settings reloaded",
            extra={
                "worker": self.settings.worker,
                "applied": {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v) for k, v in live.items()},
                "need_restart": restart,
            },
        )
        if restart:
            log.warning("some changed settings apply only after a restart", extra={"keys": restart})

    def _reload_credentials(self) -> None:
        try:
            state = ConnectorState.load(self.settings.state_dir)
        except BackhaulError as exc:
            log.error("credentials not reloaded; keeping the current ones", extra={"error": str(exc)})
            return
        if state.connector_id != self.state.connector_id:
            log.warning(
                "the state dir now holds another connector; restart to use it",
                extra={"running": self.state.connector_id, "on_disk": state.connector_id},
            )
            return
        self.upkeep.use_credentials(state, "credentials reloaded")

    # ------------------------------------------------------------------ what the parts ask

    def _renewed(self, state: ConnectorState) -> None:
        """New credentials (renewed, or reloaded): new tunnels present them."""
        self.state = state
        self.homes.use_credentials(state)

    def _apply_config(self, apps: dict[str, dict]) -> None:
        """A new configuration: health checks follow it, what it no longer allows ends."""
        self.apps = apps
        self.origins.set_apps(apps)
        self.backend_tls.clear()
        self.streams.apply_config(apps)
        self.udp.apply_config(apps)

    def _load(self) -> dict:
        """The heartbeat's figures of this worker."""
        tunnels = self.homes.tunnels
        return {
            "streams": sum(t.load for t in tunnels),
            "bytes_in": sum(t.bytes_in for t in tunnels),
            "bytes_out": sum(t.bytes_out for t in tunnels),
            "apps": health.heartbeat_report(self.origins.snapshot()),
        }

    def _now(self) -> WorkerNow:
        """What the figures read each tick."""
        return WorkerNow(self.state, list(self.homes.tunnels), len(self.homes.answered()), self.upkeep.config_version)

    def _origins_changed(self, changes: dict[str, bool | None]) -> None:
        """Tell the relay at once, over every tunnel, which apps this worker can reach now."""
        messages = health.control_messages(changes)
        for tunnel in self.homes.tunnels:
            for message in messages:
                tunnel.control(message)

    # ------------------------------------------------------------------ key rotation

    async def _rotate_keys_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.tls.rotate_check_interval)
            self.rotate_keys()

    def rotate_keys(self, now: float | None = None) -> None:
        """Rotate the tunnels whose TLS keys are due, close the rotated ones that are done
        (transport/rotation.py); from the periodic loop, never per frame."""
        now = time.monotonic() if now is None else now
        for tunnel in list(self.homes.tunnels):
            if tunnel.closed or (tunnel not in self.rotations and not (tunnel.info.serving and tunnel.usable)):
                continue
            verdict = self.rotations.decide(tunnel, now)
            if verdict == rotation.ROTATE:
                self._rotating(tunnel, now, send=True)
            elif verdict == rotation.CLOSE:
                tunnel.close(ErrorCode.NO_ERROR, rotation.ROTATION_REASON)

    def _rotating(self, tunnel: Tunnel, now: float, send: bool) -> None:
        if tunnel in self.rotations:
            return
        self.rotations.started(tunnel, now)
        self.metrics.count("tunnels_rotated")
        log.info(
            "tunnel rotated: its TLS keys are due",
            extra={
                "tunnel": tunnel.name, "by": "connector" if send else "relay",
                "records": self.rotations.records(tunnel), "streams": tunnel.load,
            },
        )
        self.homes.rotate(tunnel, send)

    # ------------------------------------------------------------------ TunnelOwner

    def tunnel_up(self, tunnel: Tunnel) -> None:
        self.homes.up(tunnel)
        self.metrics.tunnels_opened += 1
        tunnel.control(
            {
                "type": "hello",
                "boot": self.settings.boot_id,
                "worker": self.settings.worker,
                "version": __version__,
            }
        )
        for message in health.control_messages(self.origins.snapshot()):
            tunnel.control(message)

    def tunnel_down(self, tunnel: Tunnel, code: int, reason: str) -> None:
        answered = tunnel.info.hello
        self.rotations.forget(tunnel)
        self.homes.down(tunnel)
        self.metrics.tunnel_closed(tunnel)
        log.info("tunnel down", extra={"tunnel": tunnel.name, "reason": reason})
        if not answered:
            # Closed before the relay's hello: the relay refused the tunnel (the connector
            # deleted or revoked, its certificate replaced) or is going away. The config
            # pull says which at once (a deleted connector then stops) instead of at the
            # next heartbeat; pulls run one at a time, so a burst of refusals is one pull.
            self.upkeep.changed.set()

    def control_received(self, tunnel: Tunnel, message: dict) -> None:
        kind = message.get("type")
        if kind == "hello":
            ssl_object = tunnel.transport.get_extra_info("ssl_object") if tunnel.transport is not None else None
            ktls, ktls_reason = tls_kernel.for_transport(self.ktls, ssl_object)
            log.info(
                "tunnel up",
                extra={
                    "tunnel": tunnel.name, "relay_worker": message.get("worker"), "relay_node": message.get("node"),
                    "ktls": ktls, "ktls_reason": ktls_reason,
                    # which TLS implementation carries it ([tls] transport): uvloop's or aiofastnet's
                    "tls_transport": type(tunnel.transport).__module__.partition(".")[0],
                },
            )
            self.homes.hello(tunnel, message)
            self.upkeep.version_seen(message.get("config_version"))
        elif kind == "config_changed":
            self.upkeep.version_seen(message.get("version"))
        elif kind == "nodes":
            self.homes.learn(message.get("nodes"), "relay")
        else:
            log.debug("unknown control message ignored", extra={"message": message})

    def goaway_received(self, tunnel: Tunnel, code: int, reason: str) -> None:
        log.info("relay draining a tunnel", extra={"tunnel": tunnel.name, "reason": reason})
        if reason == rotation.ROTATION_REASON:
            # Not its node draining: this tunnel's keys are due; dial its successor now.
            self._rotating(tunnel, time.monotonic(), send=False)
            return
        self.homes.goaway(tunnel)

    def datagram_received(self, tunnel: Tunnel, flow_id: int, data: bytes) -> None:
        self.udp.from_tunnel(tunnel, flow_id, data)

    def stream_opened(self, tunnel: Tunnel, stream_id: int, meta: dict) -> None:
        """An OPEN: refused unless the allow-list lets it through, else a UDP flow or a dialed stream."""
        self.metrics.streams_opened += 1
        refused = admission.admit(self.apps, meta, self._draining)
        if refused is not None:
            self.streams.refuse(tunnel, stream_id, meta, *refused)
        elif meta.get("proto") == "udp":
            self.udp.open(tunnel, stream_id, meta, self.settings.target_timeout)
        else:
            self.streams.open(tunnel, stream_id, meta, self.apps[meta["app"]])


def run_agent(settings: ConnectorSettings, reload: Callable[[], ConnectorSettings] | None = None) -> None:
    """Process entry point of one connector worker; ``reload`` builds fresh settings on SIGHUP."""
    add_admin_log(settings.log_files)
    agent = ConnectorAgent(settings, reload)
    uvloop.run(agent.run())
    if agent.deleted:
        raise SystemExit(EXIT_NO_RESTART)
