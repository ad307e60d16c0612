"""transport/rotation.py: the record bound, checked against a real TLS 1.3 connection's records,
and the decisions of a rotation; the connector's slot records of a rotating tunnel."""

from __future__ import annotations

import os
import random
import ssl

import pytest

from backhaul import pki
from backhaul.config import AES_GCM_RECORD_LIMIT, TlsSettings
from backhaul.connector.slots import TunnelRecord, needs_another, to_retire
from backhaul.transport import rotation

pytestmark = pytest.mark.codec_independent


def _pair(tmp_path):
    """A finished TLS 1.3 handshake between two in-memory SSLObjects (uvloop drives OpenSSL
    the same way); returns (client, its outgoing BIO, server, its incoming BIO)."""
    ca = pki.make_ca()
    key, cert = pki.make_service_cert(ca, ["relay.test"])
    (tmp_path / "s.pem").write_bytes(pki.cert_to_pem(cert))
    (tmp_path / "s.key").write_bytes(pki.key_to_pem(key))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "s.pem", tmp_path / "s.key")
    client_ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="relay.test")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = set()
    for _ in range(10):
        for obj, out, peer_in in ((client, c_out, s_in), (server, s_out, c_in)):
            if obj not in done:
                try:
                    obj.do_handshake()
                    done.add(obj)
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
    assert len(done) == 2
    return client, c_out, server, s_in


def _records(wire: bytes) -> int:
    """TLS records in ``wire`` (5-byte headers: type, version, length)."""
    count = i = 0
    while i < len(wire):
        i += 5 + int.from_bytes(wire[i + 3 : i + 5], "big")
        count += 1
    assert i == len(wire)
    return count


def test_the_bound_is_never_below_the_records_openssl_makes(tmp_path):
    client, out, server, server_in = _pair(tmp_path)
    rng = random.Random(14)
    # Writes as a tunnel makes them: small frames, batches, and 256 KiB DATA bursts.
    sizes = [rng.choice([9, 60, 1500, 16383, 16384, 16385, 40000, 262144 + 9]) for _ in range(300)]
    nbytes = 0
    records = 0
    for size in sizes:
        data = os.urandom(size)
        assert client.write(data) == size
        nbytes += size
        wire = out.read()
        records += _records(wire)
        server_in.write(wire)
        got = b""
        while len(got) < size:
            got += server.read(size)
        assert got == data
    bound = rotation.records_bound(nbytes, len(sizes))
    assert records <= bound
    # And not wildly above it: at most one record per write more than the bytes need.
    assert bound - records <= len(sizes)


def test_the_decisions():
    limit, deadline = 1000, 60.0
    assert rotation.action(999, limit, None, 0.0, 5, deadline) == rotation.KEEP
    assert rotation.action(1000, limit, None, 0.0, 5, deadline) == rotation.ROTATE
    # Rotating: kept while streams finish, closed once they have, at AES-GCM's limit or the deadline.
    assert rotation.action(1500, limit, 10.0, 20.0, 5, deadline) == rotation.KEEP
    assert rotation.action(1500, limit, 10.0, 20.0, 0, deadline) == rotation.CLOSE
    assert rotation.action(AES_GCM_RECORD_LIMIT - 1, limit, 10.0, 20.0, 5, deadline) == rotation.KEEP
    assert rotation.action(AES_GCM_RECORD_LIMIT, limit, 10.0, 20.0, 5, deadline) == rotation.CLOSE
    assert rotation.action(1500, limit, 10.0, 70.0, 5, deadline) == rotation.CLOSE
    # Either direction counts: it is the larger bound.
    assert rotation.tunnel_records(16384 * 10, 3, 0, 0) == 13
    assert rotation.tunnel_records(0, 1, 16384 * 100, 2) == 102
    # The default leaves most of RFC 8446's limit to the streams of a draining tunnel.
    assert 2 * TlsSettings().rotate_records < AES_GCM_RECORD_LIMIT


def test_the_table_of_rotations_forgets_what_went_down():
    table = rotation.Rotations(TlsSettings(rotate_records=10))
    table.started("t1", 1.0)
    table.started("t1", 5.0)  # the first time counts
    assert "t1" in table and len(table) == 1 and table._since["t1"] == 1.0
    table.forget("t1")
    table.forget("t1")
    assert len(table) == 0


def test_a_rotating_tunnel_no_longer_covers_its_relay_worker():
    a, b = TunnelRecord(0, closed=None), TunnelRecord(1, closed=None)
    for record in (a, b):
        record.hello, record.relay_worker = True, 0
    assert a.serving
    a.rotating = True
    assert not a.serving
    # Its slot's records leave it out (TunnelSlots._by_slot): with one slot to retire, the one
    # whose successor is still connecting goes, and b, the last to cover relay worker 0, stays.
    assert to_retire([0, 1], 1, {1: b}) == [0]
    b.rotating = True
    # Nothing serves relay worker 0 now and nothing is connecting: dial another.
    assert needs_another([a, b], live_slots=0, relay_workers=1)
