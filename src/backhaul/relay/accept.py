"""A TLS listener that decides about a connection at accept, before its handshake.

With ``loop.create_server(ssl=...)`` the protocol factory is called at accept but with no
address, and the protocol hears nothing of a handshake that fails or times out; so it
can neither refuse a connection before the handshake's CPU is spent nor count
handshakes in progress. Here the listener accepts plain TCP: at accept it checks the
worker's descriptor budget (``Admission``), the connections of the client's address
(at most ``max_per_address``, and at most ``address_share`` of the budget) and the
handshakes in progress, and closes the connection at once when one is over its limit;
otherwise it runs the handshake with the loop's own TLS protocol (uvloop's
``SSLProtocol``, set up as ``loop.start_tls`` does, so the TLS transport is the one
``create_server(ssl=...)`` makes) and hands the TLS transport to ``on_tls``, which
returns the connection's protocol (or None to close it).

Whoever takes the connection owns its ``Slot`` and releases it when the connection
closes, which counts it out of the budget and of its address.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Callable

from backhaul.relay.admission import Admission

log = logging.getLogger("backhaul.relay.accept")

#: A plaintext TLS alert record (RFC 8446 section 5.1, 6): fatal(2), no_application_protocol(120).
NO_APPLICATION_PROTOCOL_ALERT = bytes([21, 3, 3, 0, 2, 2, 120])

#: The attribute of a handshaking connection's SSLObject that names its socket's transport.
_RAW = "backhaul_raw_transport"


def send_alpn_alert(ssl_object: ssl.SSLObject) -> None:
    """Send no_application_protocol to the client of ``ssl_object`` (the handshake is being refused).

    OpenSSL writes that alert for the TLS protocol to send, but a failed handshake makes
    uvloop (and asyncio) close the socket without sending it: so it is written here,
    from inside the handshake (the ALPN callback, tlsconfig.server_context).
    """
    transport = getattr(ssl_object, _RAW, None)
    if transport is not None and not transport.is_closing():
        transport.write(NO_APPLICATION_PROTOCOL_ALERT)


class Slot:
    """One accepted connection's place in the counts; ``release()`` once it closes (idempotent)."""

    __slots__ = ("listener", "ip", "held")

    def __init__(self, listener: "TlsListener", ip: str) -> None:
        self.listener = listener
        self.ip = ip
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.listener._release(self.ip)


OnTls = Callable[[asyncio.Transport, Slot], "asyncio.BaseProtocol | None"]


class TlsListener:
    """The protocol factory of one TLS listening socket (``loop.create_server(listener, sock=...)``)."""

    def __init__(
        self,
        name: str,
        ssl_context: ssl.SSLContext,
        admission: Admission,
        on_tls: OnTls,
        max_per_address: int | None = None,
    ) -> None:
        # Failed handshakes are counted where the admission counts refusals (the worker's metrics).
        self.name = name
        self.ssl_context = ssl_context
        self.admission = admission
        self.on_tls = on_tls
        self.max_per_address = max_per_address
        self.handshake_timeout = admission.limits.handshake_timeout
        self.max_handshakes = admission.limits.max_handshakes
        self.address_share = admission.limits.address_share
        self.metrics = admission.metrics
        #: connections open per client address (only with max_per_address)
        self.per_address: dict[str, int] = {}
        self.handshakes = 0
        # The TLS protocol makes the connection's SSLObject (wrap_bio) in its connection_made;
        # it is told its socket's transport there, for send_alpn_alert.
        self._accepting: asyncio.Transport | None = None
        self._made: ssl.SSLObject | None = None
        self._context_wrap_bio = ssl_context.wrap_bio
        ssl_context.wrap_bio = self._wrap_bio

    def _wrap_bio(self, *args, **kwargs) -> ssl.SSLObject:
        ssl_object = self._context_wrap_bio(*args, **kwargs)
        if self._accepting is not None:
            setattr(ssl_object, _RAW, self._accepting)
            self._made = ssl_object
        return ssl_object

    def __call__(self) -> asyncio.Protocol:
        return _Accepted(self)

    def accept(self, transport: asyncio.Transport) -> None:
        peer = transport.get_extra_info("peername")
        ip = peer[0] if peer else "?"
        if self.handshakes >= self.max_handshakes:
            self.admission.refuse("too many TLS handshakes in progress", self.name, ip)
            transport.abort()
            return
        if self.max_per_address is not None and self.per_address.get(ip, 0) >= min(
            self.max_per_address, max(1, int(self.admission.budget * self.address_share))
        ):
            self.admission.refuse("too many connections from one address", self.name, ip)
            transport.abort()
            return
        if not self.admission.admit(self.name):
            transport.abort()
            return
        if self.max_per_address is not None:
            self.per_address[ip] = self.per_address.get(ip, 0) + 1
        self.handshakes += 1
        # What loop.start_tls does, but now: start_tls runs in a task, and by the time it
        # has put the TLS protocol in place uvloop may have passed the ClientHello to this
        # connection's first protocol already (it starts reading right after connection_made).
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        pending = _Pending()
        tls_protocol = _ssl_protocol_class(loop)(
            loop, pending, self.ssl_context, waiter, server_side=True, call_connection_made=False,
            ssl_handshake_timeout=self.handshake_timeout,
        )
        transport.set_protocol(tls_protocol)
        self._accepting = transport  # named on the SSLObject that connection_made makes (_wrap_bio)
        try:
            tls_protocol.connection_made(transport)
        finally:
            self._accepting = None
        ssl_object, self._made = self._made, None
        tls = tls_protocol._get_app_transport()  # made once: uvloop refuses a second call
        slot = Slot(self, ip)
        waiter.add_done_callback(lambda done: self._handshake_done(done, transport, tls, ssl_object, pending, slot, peer))

    def _handshake_done(
        self, waiter: asyncio.Future, raw: asyncio.Transport, tls: asyncio.Transport, ssl_object, pending, slot: Slot, peer
    ) -> None:
        self.handshakes -= 1
        if ssl_object is not None:
            ssl_object.__dict__.pop(_RAW, None)
        exc = None if waiter.cancelled() else waiter.exception()
        if waiter.cancelled() or exc is not None:
            raw.abort()
            slot.release()
            if exc is not None:
                self._failed(exc, peer)
            return
        if pending.lost or tls.is_closing():
            tls.abort()
            slot.release()
            return
        try:
            protocol = self.on_tls(tls, slot)
        except Exception:
            log.exception("accepting a TLS connection failed", extra={"listener": self.name, "peer": str(peer)})
            protocol = None
        if protocol is None:
            tls.close()
            slot.release()
            return
        try:
            pending.hand_off(tls, protocol)
        except Exception:
            # The protocol has the transport now: its connection_lost releases the slot.
            log.exception("handing a TLS connection on failed", extra={"listener": self.name, "peer": str(peer)})
            tls.abort()

    def _failed(self, exc: Exception, peer) -> None:
        ip = peer[0] if peer else "?"
        if isinstance(exc, ssl.SSLError) and exc.reason == "NO_APPLICATION_PROTOCOL":
            self.admission.refuse("unknown ALPN", self.name, ip)
            return
        self.metrics.count(f"{self.name}_handshakes_failed")
        log.debug("TLS handshake failed", extra={"listener": self.name, "peer": str(peer), "error": repr(exc)})

    def _release(self, ip: str) -> None:
        self.admission.release()
        if self.max_per_address is not None:
            count = self.per_address.get(ip, 0) - 1
            if count > 0:
                self.per_address[ip] = count
            else:
                self.per_address.pop(ip, None)



def _ssl_protocol_class(loop: asyncio.AbstractEventLoop):
    """The TLS protocol class of ``loop``: uvloop's own, or asyncio's (same constructor)."""
    try:
        import uvloop.loop

        if isinstance(loop, uvloop.loop.Loop):
            return uvloop.loop.SSLProtocol
    except ImportError:  # pragma: no cover - uvloop is a dependency
        pass
    from asyncio.sslproto import SSLProtocol

    return SSLProtocol


class _Accepted(asyncio.Protocol):
    """The raw TCP connection's first protocol: replaced by the TLS protocol in connection_made."""

    __slots__ = ("listener",)

    def __init__(self, listener: TlsListener) -> None:
        self.listener = listener

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.listener.accept(transport)

    def data_received(self, data: bytes) -> None:  # pragma: no cover - replaced before anything is read
        raise AssertionError("a TLS connection was read before its handshake started")


class _Pending(asyncio.Protocol):
    """The TLS connection's protocol from the end of the handshake until it is handed on.

    The TLS layer may pass on application data in the same step that completes the
    handshake (a connector sends its first frames with its Finished): it is held here,
    at most what one read of the socket decrypted, and given to the next protocol.
    """

    __slots__ = ("held", "eof", "lost")

    def __init__(self) -> None:
        self.held: list[bytes] = []
        self.eof = False
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.held.append(data)

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    def hand_off(self, transport: asyncio.Transport, protocol: asyncio.BaseProtocol) -> None:
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        for data in self.held:
            if transport.is_closing():
                return
            _deliver(protocol, data)
        self.held.clear()
        if self.eof and not transport.is_closing() and not protocol.eof_received():
            transport.close()


def _deliver(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    if isinstance(protocol, asyncio.BufferedProtocol):
        view = memoryview(data)
        while view:
            buffer = protocol.get_buffer(len(view))
            n = min(len(buffer), len(view))
            buffer[:n] = view[:n]
            protocol.buffer_updated(n)
            view = view[n:]
    else:
        protocol.data_received(data)
