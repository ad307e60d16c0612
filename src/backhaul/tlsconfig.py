"""``ssl.SSLContext`` factories: relay server, connector client, relay-to-relay client,
enrollment and admin clients.

Every context speaks TLS 1.3 only. The relay's listen port carries tunnels, the control API
and relay-to-relay links, told apart by ALPN (see docs/architecture.md).

Tunnel TLS (``config.TlsSettings``, docs/security.md "Tunnel TLS"): the listen port picks the
TLS 1.3 suite by its own order (AES-128-GCM first, server preference) and issues no session
tickets: tunnels and peer links are long-lived and mutually authenticated, nothing of ours
resumes a session (neither aiohttp nor urllib keep one), and each ticket is an encryption
and a few hundred bytes after every handshake. A client context cannot refuse tickets (the
server decides in TLS 1.3); the connector's offers the same suite order, so a relay without
server preference still meets it on AES-128-GCM.
"""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path
from typing import Callable, Protocol

from cryptography import x509

from backhaul import openssl_ctx, pki
from backhaul.config import TlsSettings
from backhaul.errors import ConfigError
from backhaul.protocol.constants import ALPN_HTTP, ALPN_PEER, ALPN_TUNNEL

__all__ = [
    "ALPN_HTTP",
    "ALPN_PEER",
    "ALPN_TUNNEL",
    "admin_context",
    "connector_context",
    "edge_context",
    "enroll_context",
    "peer_cert_serial",
    "peer_client_context",
    "peer_connector_id",
    "peer_node_id",
    "pinning_probe_context",
    "server_context",
]

log = logging.getLogger("backhaul.tls")


class ClientCredentials(Protocol):
    """What a connector client context needs: the paths of its state dir."""

    ca_path: Path
    cert_path: Path
    key_path: Path


def _tls13_only(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def _tunnel_suites(ctx: ssl.SSLContext, tls: TlsSettings, server: bool) -> ssl.SSLContext:
    """The TLS 1.3 suites of ``tls`` in their order, chosen by the server's preference; a
    server issues no session tickets (see the module docstring)."""
    if server:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
        ctx.num_tickets = 0
    try:
        applied = openssl_ctx.set_ciphersuites(ctx, tls.ciphersuites)
    except ValueError as exc:
        raise ConfigError(f"tls ciphersuites: {exc}; pass TLS 1.3 suite names this OpenSSL knows") from None
    if not applied:
        log.warning(
            "cannot set the TLS 1.3 cipher suites in OpenSSL: tunnels use OpenSSL's default order",
            extra={"openssl": ssl.OPENSSL_VERSION, "ciphersuites": tls.ciphersuites},
        )
    if tls.ktls and not openssl_ctx.enable_ktls(ctx):
        log.warning("cannot enable kernel TLS in OpenSSL (3.0 or later needed)", extra={"openssl": ssl.OPENSSL_VERSION})
    return ctx


def _require(path: Path, what: str) -> str:
    if not path.is_file():
        raise ConfigError(f"{what} {path} is missing; run `backhaul service init` for this data dir")
    return str(path)


#: What the listen port serves, in the server's order of preference (a client offers one).
LISTEN_ALPN = [ALPN_TUNNEL, ALPN_HTTP, ALPN_PEER]


def server_context(
    data_dir: str | os.PathLike,
    on_alpn_refused: Callable[[ssl.SSLObject], None] | None = None,
    tls: TlsSettings = TlsSettings(),
) -> ssl.SSLContext:
    """The relay's server context: service certificate, client certificates optional.

    A client certificate is requested and, when sent, must chain to the service CA.
    Tunnels (a connector's) and relay-to-relay links (a node's) require one; the ALPN
    dispatcher enforces that after the handshake. A client offering ALPN but none of ours
    fails the handshake (no_application_protocol,
    docs/protocol.md); one offering none is the control API's (aiohttp offers none).
    ``on_alpn_refused`` is called with the connection's SSLObject when that happens
    (openssl_ctx.refuse_unknown_alpn). ``tls`` sets the suites, their order and kernel TLS.
    """
    data_dir = Path(data_dir)
    ctx = _tls13_only(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    try:
        ctx.load_cert_chain(_require(data_dir / "service.pem", "service certificate"), _require(data_dir / "service.key", "service key"))
        ctx.load_verify_locations(cafile=_require(data_dir / "ca.pem", "CA certificate"))
    except ssl.SSLError as exc:
        raise ConfigError(f"cannot load the service certificate or CA from {data_dir}: {exc.reason}") from exc
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.set_alpn_protocols(LISTEN_ALPN)
    if not openssl_ctx.refuse_unknown_alpn(ctx, LISTEN_ALPN, on_alpn_refused):
        log.warning(
            "cannot install the ALPN check in OpenSSL: a client offering only unknown ALPN protocols "
            "completes the handshake with none and is served as the control API",
            extra={"openssl": ssl.OPENSSL_VERSION},
        )
    return _tunnel_suites(ctx, tls, server=True)


def edge_context(cert: str | os.PathLike, key: str | os.PathLike) -> ssl.SSLContext:
    """The HTTPS edge's server context: the operator's certificate for the published host names.

    Browsers reach it, so TLS 1.2 is accepted as well as 1.3.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except FileNotFoundError as exc:
        raise ConfigError(f"HTTPS edge certificate or key {exc.filename} is missing; pass --https-cert and --https-key") from exc
    except ssl.SSLError as exc:
        raise ConfigError(f"cannot load the HTTPS edge certificate {cert} with key {key}: {exc.reason}") from exc
    ctx.set_alpn_protocols([ALPN_HTTP])
    return ctx


def connector_context(state: ClientCredentials, alpn: str, tls: TlsSettings = TlsSettings()) -> ssl.SSLContext:
    """A connector's client context: its certificate, the service CA only, one ALPN id,
    the suites of ``tls`` offered in its order.

    ``state`` is what holds the paths (a loaded connector.state.ConnectorState): this layer
    does not know a connector's state dir.
    """
    ctx = _tls13_only(ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(state.ca_path)))
    try:
        ctx.load_cert_chain(str(state.cert_path), str(state.key_path))
    except ssl.SSLError as exc:
        raise ConfigError(f"cannot load {state.cert_path} / {state.key_path}: {exc.reason}; re-register the connector") from exc
    ctx.check_hostname = True
    ctx.set_alpn_protocols([alpn])
    return _tunnel_suites(ctx, tls, server=False)


def peer_client_context(data_dir: str | os.PathLike) -> ssl.SSLContext:
    """The client context of a relay-to-relay link: this node's own certificate (a node
    certificate, pki.make_service_cert with a node id) and the service CA as the only trust
    anchor, the peer's host name checked, ALPN ``backhaul-peer/1``."""
    data_dir = Path(data_dir)
    ctx = _tls13_only(
        ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=_require(data_dir / "ca.pem", "CA certificate"))
    )
    try:
        ctx.load_cert_chain(_require(data_dir / "service.pem", "service certificate"), _require(data_dir / "service.key", "service key"))
    except ssl.SSLError as exc:
        raise ConfigError(f"cannot load the service certificate of {data_dir}: {exc.reason}") from exc
    ctx.check_hostname = True
    ctx.set_alpn_protocols([ALPN_PEER])
    return ctx


def _pinned_ca_context(ca: bytes | str | os.PathLike) -> ssl.SSLContext:
    if isinstance(ca, bytes):
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca.decode("ascii"))
    else:
        path = Path(ca)
        if not path.is_file():
            raise ConfigError(f"CA certificate {path} is missing; pass the service's ca.pem")
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(path))
    _tls13_only(ctx)
    ctx.check_hostname = True
    ctx.set_alpn_protocols([ALPN_HTTP])
    return ctx


def enroll_context(ca_pem: bytes) -> ssl.SSLContext:
    """A client context trusting only the pinned service CA (PEM bytes), for enrollment."""
    return _pinned_ca_context(ca_pem)


def admin_context(ca: bytes | str | os.PathLike) -> ssl.SSLContext:
    """A client context for `backhaul admin`: the service CA (PEM bytes or a file path) only."""
    return _pinned_ca_context(ca)


def pinning_probe_context() -> ssl.SSLContext:
    """An unverified client context, used once to fetch the CA whose fingerprint is pinned.

    Nothing secret is sent over it; the CA it returns is checked against the pin and
    then used as the only trust anchor of the real connection.
    """
    ctx = _tls13_only(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols([ALPN_HTTP])
    return ctx


def _peer_cert(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> x509.Certificate | None:
    # With CERT_OPTIONAL a certificate that fails verification fails the handshake,
    # so any certificate present here has been verified against the service CA.
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    return x509.load_der_x509_certificate(der)


def peer_connector_id(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The connector id named by the peer's verified certificate, or None."""
    cert = _peer_cert(ssl_object)
    return pki.connector_id_of(cert) if cert is not None else None


def peer_node_id(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The relay node id named by the peer's verified certificate, or None (no certificate,
    or a certificate that is not a node's: a connector's, say)."""
    cert = _peer_cert(ssl_object)
    return pki.node_id_of(cert) if cert is not None else None


def peer_cert_serial(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> int | None:
    """The serial number of the peer's verified certificate, or None."""
    cert = _peer_cert(ssl_object)
    return cert.serial_number if cert is not None else None
