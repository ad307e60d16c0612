"""Tunnel TLS: the relay's suite order and ticket policy, through real handshakes.

The relay's listen context (tlsconfig.server_context) and a connector's tunnel context
(tlsconfig.connector_context) with certificates from our own CA, on uvloop sockets on
127.0.0.1, as the relay and connector run them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import ssl
from pathlib import Path

import pytest
import uvloop

from backhaul import openssl_ctx, pki, tlsconfig
from backhaul.config import TlsSettings
from backhaul.errors import ConfigError
from backhaul.protocol.constants import ALPN_TUNNEL
from backhaul.transport import fasttls

pytestmark = pytest.mark.codec_independent


@dataclasses.dataclass
class Credentials:
    ca_path: Path
    cert_path: Path
    key_path: Path


@pytest.fixture(scope="module")
def pki_dirs(tmp_path_factory):
    """(relay data dir, connector credentials), both from one CA."""
    data = tmp_path_factory.mktemp("relay")
    ca = pki.make_ca()
    key, cert = pki.make_service_cert(ca, ["127.0.0.1"])
    (data / "ca.pem").write_bytes(ca.cert_pem)
    (data / "service.pem").write_bytes(pki.cert_to_pem(cert))
    (data / "service.key").write_bytes(pki.key_to_pem(key))
    conn = tmp_path_factory.mktemp("connector")
    ckey = pki.generate_key()
    ccert = pki.sign_csr(ca, pki.make_csr(ckey, "c1"), pki.new_connector_id())
    (conn / "connector.pem").write_bytes(pki.cert_to_pem(ccert))
    (conn / "connector.key").write_bytes(pki.key_to_pem(ckey))
    return data, Credentials(data / "ca.pem", conn / "connector.pem", conn / "connector.key")


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


class Client(asyncio.Protocol):
    def __init__(self) -> None:
        self.got = asyncio.get_running_loop().create_future()

    def data_received(self, data):
        if not self.got.done():
            self.got.set_result(data)


async def _tunnel(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[tuple, ssl.SSLSession, str | None]:
    """One connection: handshake, one echoed round trip (any ticket has arrived by then, TLS 1.3
    servers send them right after the handshake); (cipher, the client's session, ALPN)."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        transport, client = await loop.create_connection(Client, "127.0.0.1", port, ssl=client_ctx, server_hostname="127.0.0.1")
        transport.write(b"hello")
        assert await asyncio.wait_for(client.got, 5) == b"hello"
        ssl_object = transport.get_extra_info("ssl_object")
        result = ssl_object.cipher(), ssl_object.session, ssl_object.selected_alpn_protocol()
        transport.close()
        return result
    finally:
        server.close()
        await server.wait_closed()


def test_the_tunnel_uses_aes_128_gcm_though_the_client_prefers_aes_256_and_gets_no_ticket(pki_dirs):
    data, creds = pki_dirs
    client_ctx = tlsconfig.connector_context(creds, ALPN_TUNNEL)
    # Put AES-256 first on the client: the server's order must still win.
    assert openssl_ctx.set_ciphersuites(client_ctx, "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256")
    assert client_ctx.get_ciphers()[0]["name"] == "TLS_AES_256_GCM_SHA384"
    cipher, session, alpn = uvloop.run(_tunnel(tlsconfig.server_context(data), client_ctx))
    assert alpn == ALPN_TUNNEL
    assert cipher[0] == "TLS_AES_128_GCM_SHA256" and cipher[1] == "TLSv1.3"
    assert not session.has_ticket


def test_without_our_settings_the_client_order_and_tickets_are_what_openssl_does(pki_dirs):
    """The control case: the same handshake on a plain server context negotiates the client's
    AES-256 and issues a ticket, so the test above can fail."""
    data, creds = pki_dirs
    plain = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    plain.load_cert_chain(data / "service.pem", data / "service.key")
    plain.set_alpn_protocols([ALPN_TUNNEL])
    client_ctx = tlsconfig.connector_context(creds, ALPN_TUNNEL)
    openssl_ctx.set_ciphersuites(client_ctx, "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256")
    cipher, session, _ = uvloop.run(_tunnel(plain, client_ctx))
    assert cipher[0] == "TLS_AES_256_GCM_SHA384"
    assert session.has_ticket


def test_the_suites_follow_the_setting_in_order(pki_dirs):
    data, creds = pki_dirs
    tls = TlsSettings(ciphersuites="TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256")
    server_ctx = tlsconfig.server_context(data, tls=tls)
    assert [c["name"] for c in server_ctx.get_ciphers() if c["protocol"] == "TLSv1.3"] == [
        "TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_128_GCM_SHA256",
    ]
    assert server_ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE and server_ctx.num_tickets == 0
    cipher, _, _ = uvloop.run(_tunnel(server_ctx, tlsconfig.connector_context(creds, ALPN_TUNNEL)))
    assert cipher[0] == "TLS_CHACHA20_POLY1305_SHA256"
    # The connector offers the configured order too.
    offered = [c["name"] for c in tlsconfig.connector_context(creds, ALPN_TUNNEL).get_ciphers() if c["protocol"] == "TLSv1.3"]
    assert offered == TlsSettings().ciphersuites.split(":")


def test_unknown_suites_are_refused_with_the_names_it_knows():
    with pytest.raises(ValueError, match="unknown: TLS_AES_512"):
        TlsSettings(ciphersuites="TLS_AES_512:TLS_AES_128_GCM_SHA256")
    with pytest.raises(ValueError, match="expected TLS 1.3 suite names"):
        TlsSettings(ciphersuites="")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(ValueError, match="OpenSSL refuses"):
        openssl_ctx.set_ciphersuites(ctx, "NOT_A_SUITE")
    # The refusal leaves nothing behind: the context still works with its old suites.
    assert any(c["protocol"] == "TLSv1.3" for c in ctx.get_ciphers())


def test_tls_settings_from_flags():
    tls = TlsSettings().replace_from(["rotate_records=1000", "ciphersuites=TLS_AES_256_GCM_SHA384", "ktls=1"])
    assert (tls.rotate_records, tls.ciphersuites, tls.ktls) == (1000, "TLS_AES_256_GCM_SHA384", 1)
    with pytest.raises(ValueError, match="--tls"):
        TlsSettings().replace_from(["nope=1"])
    with pytest.raises(ValueError, match="rotate_records"):
        TlsSettings(rotate_records=2**25)


def test_the_transport_setting_is_checked():
    with pytest.raises(ValueError, match="uvloop"):
        TlsSettings(transport="openssl")
    if importlib.util.find_spec("aiofastnet") is None:
        with pytest.raises(ConfigError, match="pip install aiofastnet"):
            fasttls.require(fasttls.AIOFASTNET)
    fasttls.require(fasttls.UVLOOP)


@pytest.mark.skipif(importlib.util.find_spec("aiofastnet") is None, reason="aiofastnet is not installed (optional)")
def test_an_aiofastnet_dial_meets_the_relay_on_our_suite_alpn_and_certificate(pki_dirs):
    data, creds = pki_dirs

    async def main():
        loop = asyncio.get_running_loop()
        seen = loop.create_future()

        class Server(Echo):
            def connection_made(self, transport):
                super().connection_made(transport)
                so = transport.get_extra_info("ssl_object")
                seen.set_result((so.cipher()[0], so.selected_alpn_protocol(), tlsconfig.peer_connector_id(so)))

        server = await loop.create_server(Server, "127.0.0.1", 0, ssl=tlsconfig.server_context(data))
        try:
            transport, client = await fasttls.create_connection(
                fasttls.AIOFASTNET, Client, "127.0.0.1", server.sockets[0].getsockname()[1],
                tlsconfig.connector_context(creds, ALPN_TUNNEL), "127.0.0.1",
            )
            transport.write(b"hello")
            assert await asyncio.wait_for(client.got, 5) == b"hello"
            client_side = transport.get_extra_info("ssl_object")
            transport.close()
            return await seen, client_side.cipher()[0]
        finally:
            server.close()

    (cipher, alpn, connector), client_cipher = uvloop.run(main())
    assert cipher == client_cipher == "TLS_AES_128_GCM_SHA256" and alpn == ALPN_TUNNEL
    assert connector == pki.connector_id_of(pki.load_cert_file(pki_dirs[1].cert_path))
