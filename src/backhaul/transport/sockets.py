"""Socket options and listeners shared by every transport."""

from __future__ import annotations

import asyncio
import socket

from backhaul.errors import ConfigError


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """TCP_NODELAY: a small response must not wait 40 ms for Nagle's delayed ACK."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def parse_hostport(value: str, what: str = "address") -> tuple[str, int]:
    """Split ``HOST:PORT`` or ``[V6]:PORT``; raises ConfigError saying what was expected."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"{what} {value!r} is not HOST:PORT (for example 127.0.0.1:8443)")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    number = int(port)
    if not 0 <= number <= 65535:
        raise ConfigError(f"{what} {value!r}: port must be 0..65535")
    return host, number


def reuseport_socket(host: str, port: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A bound socket with SO_REUSEPORT, so every worker process can bind the same port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}; choose another port") from None
    if kind == socket.SOCK_STREAM:
        sock.listen(4096)
    sock.setblocking(False)
    return sock
