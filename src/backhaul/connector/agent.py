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
import dataclasses
import errno
import logging
import random
import resource
import signal
import socket
import ssl
import time
from pathlib import Path

from backhaul import __version__, tlsconfig
from backhaul.config import Backoff, FlowControl, Keepalive
from backhaul.connector.http_target import BackendTls, HttpTargetPipe
from backhaul.protocol import mux
from backhaul.protocol.constants import ALPN_TUNNEL, ErrorCode
from backhaul.transport.pipe import Pipe
from backhaul.transport.sockets import parse_hostport
from backhaul.transport.tunnel import Tunnel

log = logging.getLogger("backhaul.connector")


@dataclasses.dataclass(frozen=True)
class ConnectorSettings:
    """What one connector worker needs to run."""

    state_dir: Path
    worker: int = 0
    workers: int = 1
    #: Tunnels this connector holds in all (spread over its workers), at least one per relay worker.
    tunnels: int = 4
    #: Same for every worker of one `connector run`; lets the relay replace stale tunnels at once.
    boot_id: str = ""
    flow: FlowControl = FlowControl()
    keepalive: Keepalive = Keepalive()
    backoff: Backoff = Backoff()
    connect_timeout: float = 10.0
    target_timeout: float = 10.0
    #: Hard cap on tunnel slots of one worker, whatever the relay asks for.
    max_slots: int = 64
    #: Seconds between heartbeats (which also check whether the certificate is due for renewal).
    heartbeat_interval: float = 30.0

    @property
    def slots(self) -> int:
        return max(1, -(-self.tunnels // self.workers))


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

    def __init__(self, settings: ConnectorSettings) -> None:
        from backhaul.connector.state import ConnectorState

        self.settings = settings
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
        self._slots: list[asyncio.Task] = []
        self._stopping = asyncio.Event()
        self._config_changed = asyncio.Event()
        self._draining = False
        self._ssl: ssl.SSLContext | None = None
        self._http = None
        self._last_usage: tuple[float, float] | None = None  # (monotonic, CPU seconds) at the last heartbeat
        self.refresh_interval = 120.0

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT, then drain."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        self._ssl = tlsconfig.connector_context(self.state, ALPN_TUNNEL)
        from backhaul.connector import control_client

        self._http = control_client.connector_session(self.state)
        try:
            await self._refresh_config(initial=True)
            if self._stopping.is_set():
                return
            for _ in range(self.settings.slots):
                self._add_slot()
            refresher = asyncio.create_task(self._config_loop())
            upkeep = asyncio.create_task(self._upkeep_loop())
            await self._stopping.wait()
            refresher.cancel()
            upkeep.cancel()
            await self.drain()
        finally:
            await self._http.close()

    async def drain(self, deadline: float = 30.0) -> None:
        """GOAWAY on every tunnel, let streams finish, then close."""
        self._draining = True
        for tunnel in list(self.tunnels):
            tunnel.goaway(ErrorCode.NO_ERROR, "connector draining")
        end = time.monotonic() + deadline
        while self.pipes and time.monotonic() < end:
            await asyncio.sleep(0.05)
        for task in self._slots:
            task.cancel()
        for tunnel in list(self.tunnels):
            tunnel.close(ErrorCode.NO_ERROR, "connector stopped")
        log.info("connector worker stopped", extra={"worker": self.settings.worker, **self.stats})

    # ------------------------------------------------------------------ configuration

    async def _refresh_config(self, initial: bool = False) -> None:
        from backhaul.connector import control_client

        attempt = 0
        while not self._stopping.is_set():
            try:
                etag, config = await control_client.pull_config(self.state, self._http, self.etag)
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
        self.backend_tls.clear()
        for pipe in list(self.pipes):
            app = apps.get(pipe.labels.get("app"))
            if app is None or app.get("target") != pipe.labels.get("target"):
                pipe.tunnel.reset(pipe.stream_id, ErrorCode.TARGET_NOT_ALLOWED, "the app was removed or changed")
                pipe.finish("reset: no longer allowed by the configuration", abort=True)
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
            except Exception as exc:
                log.warning("heartbeat failed; will retry", extra={"error": str(exc)})
            try:
                state = await control_client.renew_if_due(self.state, self._http)
            except Exception as exc:
                log.warning(
                    "certificate renewal failed; will retry",
                    extra={"error": str(exc), "seconds_left": round(self.state.seconds_left())},
                )
                continue
            if state.cert_serial != self.state.cert_serial:
                self._use_credentials(state)

    def _use_credentials(self, state) -> None:
        """New tunnels and API calls use the renewed certificate; open tunnels carry on."""
        from backhaul.connector import control_client

        self.state = state
        self._ssl = tlsconfig.connector_context(state, ALPN_TUNNEL)
        old, self._http = self._http, control_client.connector_session(state)
        asyncio.get_running_loop().create_task(old.close())
        log.info(
            "certificate renewed",
            extra={"serial": format(state.cert_serial, "x"), "expires": state.cert_not_after.isoformat()},
        )

    # ------------------------------------------------------------------ tunnels

    def _backoff(self, attempt: int) -> float:
        b = self.settings.backoff
        return random.uniform(0, min(b.maximum, b.initial * b.factor**attempt))

    def _add_slot(self) -> None:
        if len(self._slots) < self.settings.max_slots:
            self._slots.append(asyncio.create_task(self._slot(len(self._slots))))

    async def _slot(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        while not self._stopping.is_set() and not self._draining:
            name = f"{self.state.connector_id}/{self.settings.worker}.{index}"
            try:
                session = mux.Session(mux.Role.CONNECTOR, self.settings.flow, self.settings.keepalive)
                _, tunnel = await asyncio.wait_for(
                    loop.create_connection(
                        lambda: Tunnel(session, self, name=name, flow=self.settings.flow),
                        self.host,
                        self.port,
                        ssl=self._ssl,
                        server_hostname=self.host,
                    ),
                    self.settings.connect_timeout,
                )
            except (OSError, ssl.SSLError, asyncio.TimeoutError) as exc:
                delay = self._backoff(attempt)
                attempt += 1
                log.warning(
                    "tunnel connect failed; retrying",
                    extra={"tunnel": name, "error": str(exc) or type(exc).__name__, "retry_in": round(delay, 2)},
                )
                await asyncio.sleep(delay)
                continue
            await tunnel.info["closed"]
            if tunnel.info.get("hello"):
                attempt = 0
            delay = self._backoff(attempt)
            attempt += 1
            await asyncio.sleep(delay)

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

    def tunnel_down(self, tunnel: Tunnel, code: int, reason: str) -> None:
        self.tunnels.discard(tunnel)
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
        covered = {t.info.get("relay_worker") for t in self.tunnels if t.info.get("hello")}
        connecting = len(self._slots) - len([t for t in self.tunnels if t.info.get("hello")])
        if len(covered) < self.relay_workers and connecting <= 0:
            self._add_slot()

    def goaway_received(self, tunnel: Tunnel, code: int, reason: str) -> None:
        log.info("relay draining a tunnel", extra={"tunnel": tunnel.name, "reason": reason})

    def datagram_received(self, tunnel: Tunnel, flow_id: int, data: bytes) -> None:
        self.stats["datagrams_dropped"] = self.stats.get("datagrams_dropped", 0) + 1

    # ------------------------------------------------------------------ streams

    def stream_opened(self, tunnel: Tunnel, stream_id: int, meta: dict) -> None:
        name, target = meta.get("app"), meta.get("target")
        app = self.apps.get(name) if isinstance(name, str) else None
        if app is None:
            self._refuse(tunnel, stream_id, meta, ErrorCode.UNKNOWN_APP, f"this connector has no app {name!r}")
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

    def _refuse(self, tunnel: Tunnel, stream_id: int, meta: dict, code: int, reason: str) -> None:
        self.stats["streams_refused"] += 1
        log.warning("stream refused", extra={"app": meta.get("app"), "target": meta.get("target"), "id": meta.get("id"), "reason": reason})
        tunnel.reject(stream_id, code, reason)

    async def _connect(
        self, tunnel: Tunnel, stream_id: int, meta: dict, host: str, port: int, app: dict, tls: dict
    ) -> None:
        labels = {"app": meta.get("app"), "target": meta.get("target"), "client": meta.get("client"), "id": meta.get("id")}
        if app.get("proto") == "http":
            if meta.get("user") is not None:
                labels["user"] = meta.get("user")
            pipe = HttpTargetPipe(self.settings.flow, labels, self.read_buffer, on_done=self.pipes.discard)
        else:
            pipe = Pipe(self.settings.flow, labels, self.read_buffer, on_done=self.pipes.discard)
        pipe.tunnel = tunnel
        pipe.stream_id = stream_id
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.create_connection(lambda: pipe, host, port, **tls), self.settings.target_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            code, reason = _open_failure(exc)
            log.warning("target connect failed", extra={**labels, "reason": reason})
            if not tunnel.closed and tunnel.session.has_stream(stream_id):
                tunnel.reject(stream_id, code, reason)
            return
        if tunnel.closed or not tunnel.session.has_stream(stream_id):
            pipe.finish("cancelled by the relay before the target connected", abort=True)
            return
        self.pipes.add(pipe)
        tunnel.accept(stream_id, pipe)
        pipe.start()


def run_agent(settings: ConnectorSettings) -> None:
    """Process entry point of one connector worker."""
    import uvloop

    uvloop.run(ConnectorAgent(settings).run())
