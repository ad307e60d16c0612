"""One connector worker process: holds tunnels to the relay and dials private targets.

Every tunnel is dialed out (the connector never listens). A tunnel slot reconnects
forever with exponential backoff and full jitter. The relay's ``hello`` names the
relay worker that holds the tunnel; the agent adds slots until every relay worker
holds at least one of its tunnels, so that any relay worker can route to it.

A stream is only dialed when the pulled configuration has the app it names with the
very target it names; anything else is refused with TARGET_NOT_ALLOWED or UNKNOWN_APP.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import errno
import logging
import random
import resource
import signal
import socket
import ssl
import time
from typing import Callable

from backhaul import __version__, tlsconfig
from backhaul.connector import health, udp_flows
from backhaul.connector.http_target import BackendTls, HttpTargetPipe
from backhaul.connector.settings import ConnectorSettings, apply_log_level, split_changes
from backhaul.protocol import mux
from backhaul.protocol.constants import ALPN_TUNNEL, ErrorCode
from backhaul.errors import ProxyError
from backhaul.transport import proxy_connect
from backhaul.transport.pipe import Pipe
from backhaul.transport.sockets import parse_hostport
from backhaul.transport.tunnel import Tunnel

log = logging.getLogger("backhaul.connector")
#: per-stream lines: stderr and the session log, not the admin log
stream_log = logging.getLogger("backhaul.stream.connector")


def _open_failure(exc: BaseException) -> tuple[int, str]:
    """Map a failed target connect to the wire error code and a reason."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return ErrorCode.CONNECT_TIMEOUT, "the target did not answer in time"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ErrorCode.CONNECT_REFUSED, f"the target's TLS certificate was not accepted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return ErrorCode.CONNECT_REFUSED, f"TLS with the target failed: {exc.reason or exc}"
    if isinstance(exc, ConnectionRefusedError):
        return ErrorCode.CONNECT_REFUSED, "the target refused the connection"
    if isinstance(exc, socket.gaierror):
        return ErrorCode.HOST_UNREACHABLE, f"the target's name did not resolve: {exc}"
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return ErrorCode.HOST_UNREACHABLE, f"no route to the target: {exc.strerror}"
    return ErrorCode.CONNECT_REFUSED, f"cannot connect to the target: {exc}"


class ConnectorAgent:
    """Tunnels, configuration and streams of one connector worker."""

    def __init__(self, settings: ConnectorSettings, reload: Callable[[], ConnectorSettings] | None = None) -> None:
        from backhaul.connector.state import ConnectorState

        self.settings = settings
        #: builds the settings anew from their file and flags (SIGHUP)
        self._load_settings = reload
        self.state = ConnectorState.load(settings.state_dir)
        self.host, self.port = self.state.host, self.state.port
        self.apps: dict[str, dict] = {}
        self.config_version: int | None = None
        self.etag: str | None = None
        self.tunnels: set[Tunnel] = set()
        self.pipes: set[Pipe] = set()
        self.relay_workers: int = 1
        #: the read buffer every target socket of this process is read into (see transport.pipe)
        self.read_buffer = memoryview(bytearray(settings.flow.read_size))
        #: TLS contexts for the https backends of http apps
        self.backend_tls = BackendTls()
        self.stats = {"streams_opened": 0, "streams_refused": 0, "tunnels_opened": 0}
        self.udp = udp_flows.UdpFlows(settings.udp, self.stats, _open_failure)
        #: tunnel slots by index; a retired slot stops redialing once its tunnel has closed
        self._slots: dict[int, asyncio.Task] = {}
        self._retired: set[int] = set()
        self._next_slot = 0
        self._serving = False
        self._upkeep: asyncio.Task | None = None
        self._stopping = asyncio.Event()
        self._config_changed = asyncio.Event()
        self._draining = False
        #: the relay answered that this connector is deleted: stop, and do not come back
        self.deleted = False
        self._ssl: ssl.SSLContext | None = None
        self._http = None
        self._last_usage: tuple[float, float] | None = None  # (monotonic, CPU seconds) at the last heartbeat
        self.refresh_interval = 120.0
        self.origins = health.HealthMonitor(settings.health, self._origins_changed, self.backend_tls)
        from backhaul.connector.observer import Observer

        self.observer = Observer(self)

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT, then drain."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self._ssl = tlsconfig.connector_context(self.state, ALPN_TUNNEL)
        from backhaul.connector import control_client

        self._http = control_client.connector_session(self.state, proxy=self.settings.proxy)
        try:
            await self.observer.start()
            await self._refresh_config(initial=True)
            if self._stopping.is_set():
                return
            for _ in range(self.settings.slots):
                self._add_slot()
            self._serving = True
            self.udp.start()
            refresher = asyncio.create_task(self._config_loop())
            self._upkeep = asyncio.create_task(self._upkeep_loop())
            checker = asyncio.create_task(self.origins.run())
            await self._stopping.wait()
            refresher.cancel()
            self._upkeep.cancel()
            checker.cancel()
            await self.drain()
        finally:
            await self.observer.stop()
            await self._http.close()

    def _streams_open(self) -> int:
        return sum(t.load for t in self.tunnels if not t.closed)

    async def drain(self) -> None:
        """GOAWAY on every tunnel, let streams finish until the drain deadline, reset the rest, close.

        The relay takes GOAWAY as "no new streams on this tunnel" at once; an OPEN that
        crossed it is refused with REFUSED_STREAM, which the relay retries elsewhere.
        """
        self._draining = True
        started = time.monotonic()
        deadline = self.settings.drain_timeout
        for tunnel in list(self.tunnels):
            tunnel.goaway(ErrorCode.NO_ERROR, "connector draining")
        # After the GOAWAYs, so the relay moves these flows to other connectors, not to our other tunnels.
        self.udp.stop()
        self.udp.close_all(ErrorCode.GOING_AWAY, "connector draining")
        in_flight = self._streams_open()
        log.info("draining", extra={"worker": self.settings.worker, "streams": in_flight, "deadline": deadline})
        while self._streams_open() and time.monotonic() < started + deadline:
            await asyncio.sleep(0.05)
        cut = self._streams_open()
        for pipe in list(self.pipes):
            if not pipe.tunnel.closed:
                pipe.tunnel.reset(pipe.stream_id, ErrorCode.GOING_AWAY, "the connector's drain deadline passed")
            pipe.finish("cut: the connector's drain deadline passed", abort=True)
        for task in list(self._slots.values()):
            task.cancel()
        tunnels = list(self.tunnels)
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
                **self.stats,
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
        from backhaul.errors import BackhaulError

        if self._load_settings is None or self._draining or self._http is None:
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
            self._resize()
        if self._serving and "heartbeat_interval" in live and self._upkeep is not None:
            self._upkeep.cancel()
            self._upkeep = asyncio.get_running_loop().create_task(self._upkeep_loop())
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
        from backhaul.connector.state import ConnectorState
        from backhaul.errors import BackhaulError

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
        self._use_credentials(state, "credentials reloaded")

    # ------------------------------------------------------------------ configuration

    async def _refresh_config(self, initial: bool = False) -> None:
        from backhaul.connector import control_client

        attempt = 0
        while not self._stopping.is_set():
            try:
                etag, config = await control_client.pull_config(self.state, self._http, self.etag)
            except control_client.ConnectorDeleted as exc:
                self._deleted(exc)
                return
            except Exception as exc:
                if not initial:
                    log.warning("config pull failed; keeping the current config", extra={"error": str(exc)})
                    return
                delay = self._backoff(attempt)
                attempt += 1
                log.warning("config pull failed; retrying", extra={"error": str(exc), "retry_in": round(delay, 2)})
                try:
                    await asyncio.wait_for(self._stopping.wait(), delay)
                except asyncio.TimeoutError:
                    pass
                continue
            if config is not None:
                self._apply_config(etag, config)
            return

    def _apply_config(self, etag: str, config: dict) -> None:
        apps = {app["name"]: app for app in config.get("apps", [])}
        self.etag = etag
        self.config_version = config.get("version")
        self.refresh_interval = float(config.get("refresh_interval", 120))
        self.apps = apps
        self.origins.set_apps(apps)
        self.backend_tls.clear()
        for pipe in list(self.pipes):
            app = apps.get(pipe.labels.get("app"))
            if app is None or app.get("target") != pipe.labels.get("target"):
                pipe.tunnel.reset(pipe.stream_id, ErrorCode.TARGET_NOT_ALLOWED, "the app was removed or changed")
                pipe.finish("reset: no longer allowed by the configuration", abort=True, code=ErrorCode.TARGET_NOT_ALLOWED)
        self.udp.apply_config(apps)
        log.info("config applied", extra={"version": self.config_version, "apps": sorted(apps)})

    async def _config_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._config_changed.wait(), self.refresh_interval)
            except asyncio.TimeoutError:
                pass
            self._config_changed.clear()
            await self._refresh_config()

    # ------------------------------------------------------------------ heartbeat and renewal

    def _usage(self) -> dict:
        """This worker's numbers for the heartbeat."""
        now = time.monotonic()
        cpu_seconds = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
        last_wall, last_cpu = self._last_usage or (now, cpu_seconds)
        self._last_usage = (now, cpu_seconds)
        cpu = 100.0 * (cpu_seconds - last_cpu) / (now - last_wall) if now > last_wall else 0.0
        rss = 0
        with open("/proc/self/statm") as statm:
            rss = int(statm.read().split()[1]) * resource.getpagesize()
        return {
            "version": __version__,
            "cpu": round(cpu, 1),
            "memory": rss,
            "streams": sum(t.load for t in self.tunnels),
            "bytes_in": sum(t.bytes_in for t in self.tunnels),
            "bytes_out": sum(t.bytes_out for t in self.tunnels),
            "apps": health.heartbeat_report(self.origins.snapshot()),
        }

    async def _upkeep_loop(self) -> None:
        from backhaul.connector import control_client

        self._usage()
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            try:
                answer = await control_client.heartbeat(self.state, self._http, self._usage())
                if answer.get("config_version") not in (None, self.config_version):
                    self._config_changed.set()
            except control_client.ConnectorDeleted as exc:
                self._deleted(exc)
                return
            except Exception as exc:
                log.warning("heartbeat failed; will retry", extra={"error": str(exc)})
            try:
                state = await control_client.renew_if_due(self.state, self._http)
            except control_client.ConnectorDeleted as exc:
                self._deleted(exc)
                return
            except Exception as exc:
                log.warning(
                    "certificate renewal failed; will retry",
                    extra={"error": str(exc), "seconds_left": round(self.state.seconds_left())},
                )
                continue
            if state.cert_serial != self.state.cert_serial:
                self._use_credentials(state)

    def _use_credentials(self, state, why: str = "certificate renewed") -> None:
        """New tunnels and API calls use the renewed certificate; open tunnels carry on."""
        from backhaul.connector import control_client

        self.state = state
        self._ssl = tlsconfig.connector_context(state, ALPN_TUNNEL)
        old, self._http = self._http, control_client.connector_session(state, proxy=self.settings.proxy)
        asyncio.get_running_loop().create_task(old.close())
        log.info(
            why,
            extra={"serial": format(state.cert_serial, "x"), "expires": state.cert_not_after.isoformat()},
        )

    # ------------------------------------------------------------------ tunnels

    def _backoff(self, attempt: int) -> float:
        b = self.settings.backoff
        return random.uniform(0, min(b.maximum, b.initial * b.factor**attempt))

    def _live_slots(self) -> list[int]:
        return [index for index in self._slots if index not in self._retired]

    def _add_slot(self) -> None:
        if len(self._live_slots()) < self.settings.max_slots:
            index = self._next_slot
            self._next_slot += 1
            self._slots[index] = asyncio.create_task(self._slot(index))

    def _resize(self) -> None:
        """Dial or retire tunnel slots to match ``settings.slots``, never leaving a relay worker uncovered."""
        live = self._live_slots()
        want = min(self.settings.slots, self.settings.max_slots)
        for _ in range(want - len(live)):
            self._add_slot()
        if len(live) <= want:
            return
        by_slot = {t.info.get("slot"): t for t in self.tunnels}
        serving = collections.Counter(
            t.info.get("relay_worker") for t in self.tunnels if t.info.get("hello") and not t.info.get("retiring")
        )
        extra = len(live) - want
        for index in sorted(live, reverse=True):
            if extra == 0:
                break
            tunnel = by_slot.get(index)
            if tunnel is not None and tunnel.info.get("hello"):
                relay_worker = tunnel.info.get("relay_worker")
                if serving[relay_worker] <= 1:
                    continue
                serving[relay_worker] -= 1
            extra -= 1
            self._retired.add(index)
            if tunnel is None:
                self._slots[index].cancel()
            else:
                self._retire(tunnel)

    def _retire(self, tunnel: Tunnel) -> None:
        """No new streams on ``tunnel``; close it once its streams end or the drain deadline passes."""
        tunnel.info["retiring"] = True
        tunnel.goaway(ErrorCode.NO_ERROR, "the connector needs fewer tunnels")
        log.info("tunnel retired", extra={"tunnel": tunnel.name, "streams": tunnel.load})

        async def close_when_idle() -> None:
            end = time.monotonic() + self.settings.drain_timeout
            while tunnel.load and not tunnel.closed and time.monotonic() < end:
                await asyncio.sleep(0.1)
            tunnel.close(ErrorCode.NO_ERROR, "tunnel retired")

        asyncio.get_running_loop().create_task(close_when_idle())

    async def _slot(self, index: int) -> None:
        try:
            await self._dial_forever(index)
        finally:
            self._slots.pop(index, None)
            self._retired.discard(index)

    async def _dial_forever(self, index: int) -> None:
        attempt = 0
        while not self._stopping.is_set() and not self._draining and index not in self._retired:
            name = f"{self.state.connector_id}/{self.settings.worker}.{index}"
            try:
                session = mux.Session(mux.Role.CONNECTOR, self.settings.flow, self.settings.keepalive)
                _, tunnel = await asyncio.wait_for(self._dial(session, name), self.settings.connect_timeout)
            except (OSError, ssl.SSLError, asyncio.TimeoutError, ProxyError) as exc:
                delay = self._backoff(attempt)
                attempt += 1
                log.warning(
                    "tunnel connect failed; retrying",
                    extra={"tunnel": name, "error": str(exc) or type(exc).__name__, "retry_in": round(delay, 2)},
                )
                await asyncio.sleep(delay)
                continue
            tunnel.info["slot"] = index
            await tunnel.info["closed"]
            if index in self._retired:
                return
            if tunnel.info.get("hello"):
                attempt = 0
            delay = self._backoff(attempt)
            attempt += 1
            await asyncio.sleep(delay)

    async def _dial(self, session: mux.Session, name: str) -> tuple[asyncio.BaseTransport, Tunnel]:
        """Connect a tunnel to the relay, through the proxy when there is one."""

        def factory() -> Tunnel:
            tunnel = Tunnel(session, self, name=name, flow=self.settings.flow)
            tunnel.info = {}  # the owner sets Tunnel.info (the connector's slot record replaces this dict)
            return tunnel

        if self.settings.proxy is not None:
            return await proxy_connect.open_tunnel(
                factory, self.settings.proxy, self.host, self.port, ssl_context=self._ssl, server_hostname=self.host
            )
        return await asyncio.get_running_loop().create_connection(
            factory, self.host, self.port, ssl=self._ssl, server_hostname=self.host
        )

    def tunnel_up(self, tunnel: Tunnel) -> None:
        self.tunnels.add(tunnel)
        tunnel.info["closed"] = asyncio.get_running_loop().create_future()
        self.stats["tunnels_opened"] += 1
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

    def _origins_changed(self, changes: dict[str, bool | None]) -> None:
        """Tell the relay at once, over every tunnel, which apps this worker can reach now."""
        messages = health.control_messages(changes)
        for tunnel in self.tunnels:
            for message in messages:
                tunnel.control(message)

    def tunnel_down(self, tunnel: Tunnel, code: int, reason: str) -> None:
        self.tunnels.discard(tunnel)
        self.observer.metrics.tunnel_closed(tunnel)
        closed = tunnel.info.get("closed")
        if closed is not None and not closed.done():
            closed.set_result(None)
        log.info("tunnel down", extra={"tunnel": tunnel.name, "reason": reason})

    def control_received(self, tunnel: Tunnel, message: dict) -> None:
        kind = message.get("type")
        if kind == "hello":
            tunnel.info.update(hello=True, relay_worker=message.get("worker"))
            self.relay_workers = max(1, int(message.get("workers", 1)))
            log.info("tunnel up", extra={"tunnel": tunnel.name, "relay_worker": message.get("worker")})
            self._cover_relay_workers()
            if message.get("config_version") != self.config_version:
                self._config_changed.set()
        elif kind == "config_changed":
            if message.get("version") != self.config_version:
                self._config_changed.set()
        else:
            log.debug("unknown control message ignored", extra={"message": message})

    def _cover_relay_workers(self) -> None:
        """Dial one more tunnel when some relay worker holds none of ours."""
        serving = [t for t in self.tunnels if t.info.get("hello") and not t.info.get("retiring")]
        covered = {t.info.get("relay_worker") for t in serving}
        connecting = len(self._live_slots()) - len(serving)
        if len(covered) < self.relay_workers and connecting <= 0:
            self._add_slot()

    def goaway_received(self, tunnel: Tunnel, code: int, reason: str) -> None:
        log.info("relay draining a tunnel", extra={"tunnel": tunnel.name, "reason": reason})

    def datagram_received(self, tunnel: Tunnel, flow_id: int, data: bytes) -> None:
        self.udp.from_tunnel(tunnel, flow_id, data)

    # ------------------------------------------------------------------ streams

    def stream_opened(self, tunnel: Tunnel, stream_id: int, meta: dict) -> None:
        self.observer.metrics.streams_opened += 1
        name, target = meta.get("app"), meta.get("target")
        app = self.apps.get(name) if isinstance(name, str) else None
        if app is None:
            self._refuse(tunnel, stream_id, meta, ErrorCode.UNKNOWN_APP, f"this connector has no app {name!r}")
            return
        if meta.get("proto") == "udp":
            self._open_flow(tunnel, stream_id, meta, app)
            return
        if app.get("proto") not in ("tcp", "http") or meta.get("proto") != app.get("proto") or app.get("target") != target:
            self._refuse(
                tunnel, stream_id, meta, ErrorCode.TARGET_NOT_ALLOWED, f"target {target!r} is not allowed for app {name!r}"
            )
            return
        if self._draining:
            self._refuse(tunnel, stream_id, meta, ErrorCode.REFUSED_STREAM, "the connector is draining")
            return
        try:
            host, port = parse_hostport(target, "target")
        except Exception as exc:
            self._refuse(tunnel, stream_id, meta, ErrorCode.TARGET_NOT_ALLOWED, str(exc))
            return
        try:
            tls = self.backend_tls.options(app) if app.get("proto") == "http" else {}
        except (ssl.SSLError, ValueError) as exc:
            self._refuse(tunnel, stream_id, meta, ErrorCode.CONNECT_REFUSED, f"the app's backend CA bundle is unusable: {exc}")
            return
        self.stats["streams_opened"] += 1
        asyncio.get_running_loop().create_task(self._connect(tunnel, stream_id, meta, host, port, app, tls))

    def _open_flow(self, tunnel: Tunnel, stream_id: int, meta: dict, app: dict) -> None:
        refused = udp_flows.refusal(meta, app)
        if refused is None and self._draining:
            refused = ErrorCode.REFUSED_STREAM, "the connector is draining"
        if refused is not None:
            self._refuse(tunnel, stream_id, meta, *refused)
            return
        self.udp.open(tunnel, stream_id, meta, self.settings.target_timeout)

    def _refuse(self, tunnel: Tunnel, stream_id: int, meta: dict, code: int, reason: str) -> None:
        self.stats["streams_refused"] += 1
        stream_log.warning("stream refused", extra={"app": meta.get("app"), "target": meta.get("target"), "id": meta.get("id"), "reason": reason})
        tunnel.reject(stream_id, code, reason)
        self._stream_failed(meta, stream_id, time.monotonic(), code, reason)

    def _stream_failed(self, meta: dict, stream_id: int, started: float, code: int, reason: str) -> None:
        """A stream that never reached its target: count it and write its session line."""
        self.observer.metrics.stream_failed(code)
        self.observer.session_log.write(meta, stream=stream_id, started=started, to_app=0, to_client=0, code=code, reason=reason)

    def _stream_done(self, pipe: Pipe) -> None:
        """A stream that had a target socket ended (any way): count it and write its session line."""
        self.pipes.discard(pipe)
        if pipe.code != ErrorCode.NO_ERROR:
            self.observer.metrics.stream_failed(pipe.code)
        self.observer.session_log.write(
            pipe.labels, stream=pipe.stream_id, started=pipe.started,
            to_app=pipe.bytes_down, to_client=pipe.bytes_up, code=pipe.code, reason=pipe.result or "",
        )

    async def _connect(
        self, tunnel: Tunnel, stream_id: int, meta: dict, host: str, port: int, app: dict, tls: dict
    ) -> None:
        labels = {"app": meta.get("app"), "target": meta.get("target"), "client": meta.get("client"), "id": meta.get("id")}
        if meta.get("user") is not None:
            labels["user"] = meta["user"]
        if app.get("proto") == "http":
            pipe = HttpTargetPipe(self.settings.flow, labels, self.read_buffer, on_done=self._stream_done)
        else:
            pipe = Pipe(self.settings.flow, labels, self.read_buffer, on_done=self._stream_done)
        pipe.tunnel = tunnel
        pipe.stream_id = stream_id
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.create_connection(lambda: pipe, host, port, **tls), self.settings.target_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            code, reason = _open_failure(exc)
            stream_log.warning("target connect failed", extra={**labels, "reason": reason})
            self.origins.recheck(labels["app"])
            if not tunnel.closed and tunnel.session.has_stream(stream_id):
                tunnel.reject(stream_id, code, reason)
            self._stream_failed(labels, stream_id, pipe.started, code, reason)
            return
        if tunnel.closed or not tunnel.session.has_stream(stream_id):
            pipe.finish("cancelled by the relay before the target connected", abort=True, code=ErrorCode.CANCEL)
            return
        self.observer.metrics.open_latency.observe(time.monotonic() - pipe.started)
        self.pipes.add(pipe)
        tunnel.accept(stream_id, pipe)
        pipe.start()


def run_agent(settings: ConnectorSettings, reload: Callable[[], ConnectorSettings] | None = None) -> None:
    """Process entry point of one connector worker; ``reload`` builds fresh settings on SIGHUP."""
    import uvloop

    from backhaul.logs import add_admin_log

    from backhaul.supervisor import EXIT_NO_RESTART

    add_admin_log(settings.log_files)
    agent = ConnectorAgent(settings, reload)
    uvloop.run(agent.run())
    if agent.deleted:
        raise SystemExit(EXIT_NO_RESTART)
