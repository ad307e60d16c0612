"""The connector's optional TLS transport: aiofastnet (aio-libs' Cython transports over OpenSSL).

uvloop's TLS (the default) drives OpenSSL through a memory BIO from Python-level glue;
aiofastnet calls OpenSSL on the socket from Cython, measured ~15% less CPU per byte and
~20% more bulk throughput on a project machine (docs/operations.md, "TLS of the tunnels").
It speaks the same asyncio Transport/Protocol API (BufferedProtocol included), uses the
same ``ssl.SSLContext`` (so tlsconfig's suites, ALPN and certificates apply), and its
``ssl_object`` answers ``selected_alpn_protocol``, ``cipher`` and ``getpeercert``.

Chosen with ``TlsSettings.transport = "aiofastnet"`` (``[tls]`` in the connector's
settings file) for the connector's direct dials; dials through an HTTP CONNECT proxy and
the relay's listen port (relay.accept, built on uvloop's SSLProtocol) keep uvloop's TLS.
aiofastnet is an optional dependency: ``require`` says how to get it.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Callable

from backhaul.errors import ConfigError

UVLOOP = "uvloop"
AIOFASTNET = "aiofastnet"


def require(transport: str) -> None:
    """ConfigError, at start, when ``transport`` names a package that is not installed."""
    if transport != AIOFASTNET:
        return
    try:
        import aiofastnet  # noqa: F401
    except ImportError:
        raise ConfigError(
            'tls transport "aiofastnet" needs the aiofastnet package: pip install aiofastnet, '
            'or set transport = "uvloop" in [tls]'
        ) from None


async def create_connection(
    transport: str,
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
    server_hostname: str | None,
) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
    """``loop.create_connection`` with TLS by ``transport`` (UVLOOP: the loop's own)."""
    loop = asyncio.get_running_loop()
    if transport == AIOFASTNET:
        import aiofastnet

        return await aiofastnet.create_connection(
            loop, protocol_factory, host, port, ssl=ssl_context, server_hostname=server_hostname
        )
    return await loop.create_connection(protocol_factory, host, port, ssl=ssl_context, server_hostname=server_hostname)
