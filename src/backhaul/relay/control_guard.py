"""The timers aiohttp's server lacks, around one control API connection on the listen port.

aiohttp's ``RequestHandler`` closes a connection idle between requests (its keep-alive
timeout, which the worker sets to ``ListenLimits.idle_timeout``) but a request head
trickled a byte at a time, or a body that never comes, holds the connection forever.
``ControlGuard`` sits between the TLS transport and the handler: it forwards every
callback unchanged, follows where each request's head and body end with httptools (the
llhttp parser; control calls are small, so parsing them twice costs nothing that
matters), and closes the connection when

- nothing at all arrives within ``idle_timeout`` of the handshake,
- a head is not whole ``header_timeout`` after its first byte (slowloris): 408 first
  when it is the connection's first request (a later one may be behind an answer
  aiohttp is still writing, which a 408 would cut into),
- a body is not whole ``body_timeout`` after its head.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import httptools

from backhaul.config import ListenLimits
from backhaul.relay.metrics import RelayMetrics

log = logging.getLogger("backhaul.relay.control")

_IDLE, _HEAD, _BODY, _UNPARSED, _NONE = "idle", "head", "body", "unparsed", None

_PAGE = b"the request head came too slowly\n"
REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Type: text/plain\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_PAGE), _PAGE)
)


class ControlGuard(asyncio.Protocol):
    """Forwards to ``inner`` (aiohttp's protocol) and runs the head, body and idle timers."""

    def __init__(
        self,
        inner: asyncio.Protocol,
        limits: ListenLimits,
        on_close: Callable[[], None] | None = None,
        metrics: RelayMetrics | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.inner = inner
        self.limits = limits
        self.on_close = on_close
        #: where its timeouts are counted (``control_<what>_timeouts``): the worker's, or one of its own
        self.metrics = metrics if metrics is not None else RelayMetrics()
        self.loop = loop or asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        #: requests whose head has begun on this connection
        self.requests = 0
        self.timer: asyncio.TimerHandle | None = None
        self.waiting_for = _NONE
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)

    # ------------------------------------------------------------------ transport callbacks

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = f"{peer[0]}:{peer[1]}"
        self._arm(self.limits.idle_timeout, _IDLE)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is not None:
            try:
                parser.feed_data(data)
            except httptools.HttpParserError:
                # aiohttp answers what it cannot parse (400, then close) or switches protocols
                # (no route of the control API does); from here only a last deadline runs.
                self._parser = None
                self._arm(self.limits.body_timeout, _UNPARSED)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        self._parser = None
        try:
            self.inner.connection_lost(exc)
        finally:
            if self.on_close is not None:
                self.on_close()
                self.on_close = None

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    # ------------------------------------------------------------------ httptools callbacks

    def on_message_begin(self) -> None:
        self.requests += 1
        self._arm(self.limits.header_timeout, _HEAD)

    def on_headers_complete(self) -> None:
        self._arm(self.limits.body_timeout, _BODY)

    def on_message_complete(self) -> None:
        # The answer is aiohttp's business; its keep-alive timeout runs after it.
        self._cancel()

    # ------------------------------------------------------------------ timers

    def _arm(self, seconds: float, what: str) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.waiting_for = what
        self.timer = self.loop.call_later(seconds, self._expired)

    def _cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.waiting_for = _NONE

    def _expired(self) -> None:
        what, self.waiting_for, self.timer = self.waiting_for, _NONE, None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.metrics.count(f"control_{what}_timeouts")
        if what == _IDLE:
            log.info("control connection closed: nothing sent", extra={"peer": self.peer, "seconds": self.limits.idle_timeout})
            transport.close()
            return
        seconds = self.limits.header_timeout if what == _HEAD else self.limits.body_timeout
        log.warning(
            "control connection closed: unparsed request not done in time"
            if what == _UNPARSED
            else f"control connection closed: request {what} not received in time",
            extra={"peer": self.peer, "seconds": seconds, "requests": self.requests},
        )
        self._parser = None
        if what == _HEAD and self.requests == 1:
            transport.write(REQUEST_TIMEOUT)
        transport.close()
