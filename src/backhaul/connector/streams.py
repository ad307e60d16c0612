"""A connector worker's streams to private targets: dial the target, pipe it, end it.

The allow-list (connector.admission) has let the stream through; here its target socket
is connected (TLS for an https backend), a failure becomes OPEN_FAIL with the code the
relay acts on (``open_failure``), and every stream that ends, any way, is counted and
gets its session-log line. All the target sockets of the worker are read into one
shared buffer (see transport.pipe).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
import time
from typing import Callable, Mapping

from backhaul.connector import admission
from backhaul.connector.health import HealthMonitor
from backhaul.connector.http_target import BackendTls, HttpTargetPipe
from backhaul.connector.metrics import ConnectorMetrics
from backhaul.connector.session_log import SessionLog
from backhaul.connector.settings import ConnectorSettings
from backhaul.protocol.constants import ErrorCode
from backhaul.transport.pipe import Pipe
from backhaul.transport.sockets import parse_hostport
from backhaul.transport.tunnel import Tunnel

#: per-stream lines: stderr and the session log, not the admin log
stream_log = logging.getLogger("backhaul.stream.connector")


def open_failure(exc: BaseException) -> tuple[int, str]:
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


class TargetStreams:
    """The tcp and http streams of one connector worker (see the module docstring).

    ``settings`` is called for the current settings (SIGHUP may change ``target_timeout``)."""

    def __init__(
        self,
        settings: Callable[[], ConnectorSettings],
        metrics: ConnectorMetrics,
        session_log: SessionLog,
        origins: HealthMonitor,
        backend_tls: BackendTls,
    ) -> None:
        self._settings = settings
        self.metrics = metrics
        self.session_log = session_log
        self.origins = origins
        self.backend_tls = backend_tls
        #: streams whose target is connected, until they end
        self.pipes: set[Pipe] = set()
        #: the read buffer every target socket of this process is read into (see transport.pipe)
        self.read_buffer = memoryview(bytearray(settings().flow.read_size))

    def open(self, tunnel: Tunnel, stream_id: int, meta: dict, app: dict) -> None:
        """Dial the target of a stream the allow-list let through; OPEN_OK once it is connected."""
        host, port = parse_hostport(meta["target"], "target")
        try:
            tls = self.backend_tls.options(app) if app.get("proto") == "http" else {}
        except (ssl.SSLError, ValueError) as exc:
            self.refuse(tunnel, stream_id, meta, ErrorCode.CONNECT_REFUSED, f"the app's backend CA bundle is unusable: {exc}")
            return
        self.metrics.count("streams_dialed")
        asyncio.get_running_loop().create_task(self._connect(tunnel, stream_id, meta, host, port, app, tls))

    def refuse(self, tunnel: Tunnel, stream_id: int, meta: dict, code: int, reason: str) -> None:
        """OPEN_FAIL before any dial, counted and logged (a UDP flow's too)."""
        self.metrics.count("streams_refused")
        stream_log.warning("stream refused", extra={"app": meta.get("app"), "target": meta.get("target"), "id": meta.get("id"), "reason": reason})
        tunnel.reject(stream_id, code, reason)
        self._failed(meta, stream_id, time.monotonic(), code, reason)

    def apply_config(self, apps: Mapping[str, dict]) -> None:
        """Reset the streams the new configuration no longer allows."""
        for pipe in list(self.pipes):
            proto = "http" if isinstance(pipe, HttpTargetPipe) else "tcp"
            if admission.refusal(apps, pipe.labels.get("app"), pipe.labels.get("target"), proto) is not None:
                pipe.tunnel.reset(pipe.stream_id, ErrorCode.TARGET_NOT_ALLOWED, "the app was removed or changed")
                pipe.finish("reset: no longer allowed by the configuration", abort=True, code=ErrorCode.TARGET_NOT_ALLOWED)

    def cut(self, reason: str) -> None:
        """Reset every stream still open (the drain deadline passed)."""
        for pipe in list(self.pipes):
            if not pipe.tunnel.closed:
                pipe.tunnel.reset(pipe.stream_id, ErrorCode.GOING_AWAY, reason)
            pipe.finish(f"cut: {reason}", abort=True)

    # ------------------------------------------------------------------ a stream's life

    def _failed(self, meta: dict, stream_id: int, started: float, code: int, reason: str) -> None:
        """A stream that never reached its target: count it and write its session line."""
        self.metrics.stream_failed(code)
        self.session_log.write(meta, stream=stream_id, started=started, to_app=0, to_client=0, code=code, reason=reason)

    def _done(self, pipe: Pipe) -> None:
        """A stream that had a target socket ended (any way): count it and write its session line."""
        self.pipes.discard(pipe)
        if pipe.code != ErrorCode.NO_ERROR:
            self.metrics.stream_failed(pipe.code)
        self.session_log.write(
            pipe.labels, stream=pipe.stream_id, started=pipe.started,
            to_app=pipe.bytes_down, to_client=pipe.bytes_up, code=pipe.code, reason=pipe.result or "",
        )

    async def _connect(
        self, tunnel: Tunnel, stream_id: int, meta: dict, host: str, port: int, app: dict, tls: dict
    ) -> None:
        settings = self._settings()
        labels = {"app": meta.get("app"), "target": meta.get("target"), "client": meta.get("client"), "id": meta.get("id")}
        if meta.get("user") is not None:
            labels["user"] = meta["user"]
        if app.get("proto") == "http":
            pipe = HttpTargetPipe(settings.flow, labels, self.read_buffer, on_done=self._done)
        else:
            pipe = Pipe(settings.flow, labels, self.read_buffer, on_done=self._done)
        pipe.tunnel = tunnel
        pipe.stream_id = stream_id
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.create_connection(lambda: pipe, host, port, **tls), settings.target_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            code, reason = open_failure(exc)
            stream_log.warning("target connect failed", extra={**labels, "reason": reason})
            self.origins.recheck(labels["app"])
            if not tunnel.closed and tunnel.session.has_stream(stream_id):
                tunnel.reject(stream_id, code, reason)
            self._failed(labels, stream_id, pipe.started, code, reason)
            return
        if tunnel.closed or not tunnel.session.has_stream(stream_id):
            pipe.finish("cancelled by the relay before the target connected", abort=True, code=ErrorCode.CANCEL)
            return
        self.metrics.open_latency.observe(time.monotonic() - pipe.started)
        self.pipes.add(pipe)
        tunnel.accept(stream_id, pipe)
        pipe.start()
