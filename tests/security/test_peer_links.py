"""The listen port's relay-to-relay ALPN: only a node's certificate opens a link, and a node's
certificate does not open a tunnel.

A real relay process whose data dir carries a node certificate (as `service init` makes for
a node of several); the clients are TLS sockets of this test with the certificates under test.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time

import pytest

from backhaul import pki
from backhaul.store import Node, open_store
from backhaul.protocol import mux
from backhaul.protocol.constants import ALPN_PEER, ALPN_TUNNEL, ErrorCode
from backhaul.protocol.mux import stream_meta

from tests.e2e.harness import System, closed_by_peer, wait_until

pytestmark = pytest.mark.e2e


def _node_relay(tmp_path) -> tuple[System, pki.CertificateAuthority]:
    system = System(tmp_path)
    system.init()
    ca = pki.load_ca(system.data_dir)
    key, cert = pki.make_service_cert(ca, ["127.0.0.1"], node_id=pki.new_node_id())
    pki.write_private(system.data_dir / "service.key", pki.key_to_pem(key))
    (system.data_dir / "service.pem").unlink()
    pki.write_file(system.data_dir / "service.pem", pki.cert_to_pem(cert))
    system.start_relay()
    return system, ca


def _connect(system: System, alpn: str, cert: tuple | None) -> ssl.SSLSocket:
    """A TLS connection to the listen port offering ``alpn``, with ``cert`` (cert, key paths) or none."""
    ctx = ssl.create_default_context(cafile=str(system.data_dir / "ca.pem"))
    ctx.set_alpn_protocols([alpn])
    if cert is not None:
        ctx.load_cert_chain(*cert)
    raw = socket.create_connection(("127.0.0.1", system.port), timeout=5)
    try:
        sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    except BaseException:
        raw.close()
        raise
    assert sock.selected_alpn_protocol() == alpn
    return sock


def _write_cert(path, key, cert) -> tuple[str, str]:
    pki.write_private(path.with_suffix(".key"), pki.key_to_pem(key))
    pki.write_file(path.with_suffix(".pem"), pki.cert_to_pem(cert))
    return str(path.with_suffix(".pem")), str(path.with_suffix(".key"))


def _link_accepted(system: System, cert: tuple) -> bool:
    """Whether a link with ``cert`` stays open (a refused one is closed at once)."""
    with contextlib.closing(_connect(system, ALPN_PEER, cert)) as sock:
        return not closed_by_peer(sock, timeout=0.3)


def test_only_a_node_certificate_opens_a_link_and_it_opens_no_tunnel(tmp_path):
    system, ca = _node_relay(tmp_path)
    try:
        state = system.register("one")
        connector_cert = (str(state / "cert.pem"), str(state / "key.pem"))
        peer_node_id = pki.new_node_id()
        peer_key, peer_cert = pki.make_service_cert(ca, ["127.0.0.9"], node_id=peer_node_id)
        node_cert = _write_cert(tmp_path / "peer-node", peer_key, peer_cert)
        plain_key, plain_cert = pki.make_service_cert(ca, ["127.0.0.9"])  # a service cert naming no node
        plain = _write_cert(tmp_path / "plain", plain_key, plain_cert)

        # a connector's certificate, a certificate naming no node, or none: no link
        for cert in (connector_cert, plain, None):
            with contextlib.closing(_connect(system, ALPN_PEER, cert)) as sock:
                assert closed_by_peer(sock), cert
        refused = system.relay.log_entries("peer link without a node certificate refused")
        assert len(refused) >= 2  # (without a client certificate, servers' TLS may end it sooner)

        # a node's certificate on the tunnel ALPN: no tunnel
        with contextlib.closing(_connect(system, ALPN_TUNNEL, node_cert)) as sock:
            assert closed_by_peer(sock)
        wait_until(
            lambda: system.relay.log_entries("tunnel without a connector certificate refused"), 5, "the refusal's log line"
        )

        # a node's certificate for a node the store does not list (never registered, or
        # removed with `admin node remove`): no link
        with contextlib.closing(_connect(system, ALPN_PEER, node_cert)) as sock:
            assert closed_by_peer(sock)
        assert system.relay.log_entries("peer link refused: its node is not in the service's nodes table "
                                        "(never registered, or removed with `admin node remove`)")

        # registered, it opens a link; readiness: the relay's next poll has read the node
        store = open_store(system.data_dir)
        try:
            store.register_node(Node(peer_node_id, "127.0.0.9:1", "127.0.0.9:1", "test", 0.0, 0.0))
        finally:
            store.close()
        wait_until(lambda: _link_accepted(system, node_cert), 10, "a link from the registered node")

        # a node's certificate on the peer ALPN is a link: it is served as one (an OPEN for an
        # app this node does not have gets its OPEN_FAIL), and the link stays up
        with contextlib.closing(_connect(system, ALPN_PEER, node_cert)) as sock:
            session = mux.Session(mux.Role.RELAY)
            session.open_stream(stream_meta("no-such-app", "10.0.0.1:1", "tcp", "192.0.2.1:1", "s-1"))
            sock.sendall(bytes(session.data_to_send()))
            sock.settimeout(5)
            rejected = []
            deadline = time.monotonic() + 5
            while not rejected and time.monotonic() < deadline:
                data = sock.recv(65536)
                assert data, "the relay closed a node's link"
                session.receive_data(data)
                while (event := session.next_event()) is not None:
                    if isinstance(event, mux.StreamRejected):
                        rejected.append(event)
            assert [e.code for e in rejected] == [ErrorCode.UNKNOWN_APP]
            assert not closed_by_peer(sock, timeout=0.5)
        assert system.relay.alive()
    finally:
        system.stop()
