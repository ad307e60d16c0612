"""Kernel TLS (kTLS): whether this host could use it, and why a tunnel does not.

kTLS moves the record layer into the kernel after OpenSSL's handshake, so data can go
from socket to socket (or file to socket) without being copied through user space. It
needs three things:

- the kernel's ``tls`` upper-layer protocol: listed in ``/proc/sys/net/ipv4/tcp_available_ulp``
  once the ``tls`` module is loaded (``modprobe tls``; these project machines list only
  ``mptcp``);
- OpenSSL 3.0 or later built with kTLS, told ``SSL_OP_ENABLE_KTLS``
  (openssl_ctx.enable_ktls; the ssl module names it only from Python 3.12);
- a transport that gives OpenSSL the socket itself. uvloop's TLS (the tunnels' transport)
  drives OpenSSL through a memory BIO: OpenSSL never sees the socket, so kTLS never
  applies to it, whatever the kernel and the setting say.

``detect`` looks once per process (at a worker's start); ``for_transport`` says, for one
tunnel, what its "tunnel up" log line reports: ``ktls`` (a bool) and ``ktls_reason``.
"""

from __future__ import annotations

import dataclasses
import ssl
from pathlib import Path

#: Where the kernel lists the TCP upper-layer protocols it has now.
AVAILABLE_ULP = Path("/proc/sys/net/ipv4/tcp_available_ulp")

NO_KERNEL_MODULE = "kernel has no tls module (tcp_available_ulp lacks tls; modprobe tls)"
OLD_OPENSSL = "OpenSSL older than 3.0 has no kernel TLS"
NOT_ASKED = "off in the settings (tls ktls=0)"
MEMORY_BIO = "memory-BIO transport (uvloop's TLS never gives OpenSSL the socket)"
NOT_VERIFIED = "not verified: the transport does not say whether OpenSSL switched to kTLS"


@dataclasses.dataclass(frozen=True)
class KernelTls:
    """What this process found: ``possible`` when the kernel and OpenSSL both could do kTLS,
    ``reason`` saying why not otherwise; ``wanted`` is the setting."""

    possible: bool
    reason: str
    wanted: bool = False


def kernel_ulps(path: Path = AVAILABLE_ULP) -> frozenset[str]:
    """The ULP names the kernel lists (none when the file cannot be read: no such kernel)."""
    try:
        return frozenset(path.read_text().split())
    except OSError:
        return frozenset()


def detect(wanted: bool, path: Path = AVAILABLE_ULP, openssl_version: tuple = ssl.OPENSSL_VERSION_INFO) -> KernelTls:
    """Whether kTLS could be used here (read once per process; not per tunnel)."""
    if "tls" not in kernel_ulps(path):
        return KernelTls(False, NO_KERNEL_MODULE, wanted)
    if tuple(openssl_version[:2]) < (3, 0):
        return KernelTls(False, OLD_OPENSSL, wanted)
    return KernelTls(True, "", wanted)


def for_transport(found: KernelTls, ssl_object: object) -> tuple[bool, str]:
    """(kTLS in use, why not) for one tunnel's connection, from its ``ssl_object`` extra info:
    an ``ssl.SSLObject`` is a memory BIO (uvloop's and asyncio's TLS)."""
    if not found.possible:
        return False, found.reason
    if not found.wanted:
        return False, NOT_ASKED
    if isinstance(ssl_object, ssl.SSLObject):
        return False, MEMORY_BIO
    # A transport that owns its socket (aiofastnet's, an ssl.SSLSocket): whether OpenSSL
    # switched to kTLS is not visible from Python 3.11 (BIO_get_ktls_send), so it is not claimed.
    return False, NOT_VERIFIED
