"""The connector's side of HTTP apps: the connection to the backend, over TLS for an https internal URL.

The relay speaks HTTP; the connector only carries bytes. What it adds for an http app
is the TLS to an https backend, verified by default against the system's CAs, or against
the app's own CA bundle (``backend_ca``, PEM, pulled with the configuration), or not at
all when the app was published with ``--backend-insecure``.
"""

from __future__ import annotations

import ssl

import yarl

from backhaul.transport.pipe import Pipe


class BackendTls:
    """Client TLS contexts for https backends, one per distinct set of app options.

    Building a context loads a CA store, so they are kept; the cache is rebuilt with
    every configuration, so it never holds more than the apps of one configuration.
    """

    def __init__(self) -> None:
        self._contexts: dict[tuple[str | None, bool], ssl.SSLContext] = {}

    def clear(self) -> None:
        self._contexts.clear()

    def options(self, app: dict) -> dict:
        """``create_connection`` keyword arguments for the backend of ``app`` ({} for plain HTTP)."""
        url = yarl.URL(app.get("internal_url") or "")
        if url.scheme != "https":
            return {}
        key = (app.get("backend_ca"), bool(app.get("backend_insecure")))
        ctx = self._contexts.get(key)
        if ctx is None:
            ctx = self._contexts[key] = _context(*key)
        return {"ssl": ctx, "server_hostname": url.host}


def _context(ca_pem: str | None, insecure: bool) -> ssl.SSLContext:
    if insecure:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif ca_pem:
        ctx = ssl.create_default_context(cadata=ca_pem)
    else:
        ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class HttpTargetPipe(Pipe):
    """A pipe to an HTTP backend.

    The relay ends an http stream only when it is done with the backend connection.
    Over TLS there is no half-close, so the connection is closed then (its pending
    writes are still flushed) instead of waiting for the backend to close first.
    """

    __slots__ = ()

    def on_end(self) -> None:
        if self.transport.can_write_eof():
            super().on_end()
            return
        self._stream_eof = True
        if self.result is None:
            self.tunnel.end(self.stream_id)
            self.finish("completed")
            self.transport.close()
