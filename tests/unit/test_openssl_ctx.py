"""openssl_ctx: the ALPN callback installed on a real SSL_CTX, driven by in-memory handshakes."""

from __future__ import annotations

import ssl

import pytest

from backhaul import openssl_ctx, pki

pytestmark = pytest.mark.codec_independent


@pytest.fixture(scope="module")
def server_files(tmp_path_factory):
    path = tmp_path_factory.mktemp("tls")
    ca = pki.make_ca()
    key, cert = pki.make_service_cert(ca, ["relay.test"])
    (path / "ca.pem").write_bytes(ca.cert_pem)
    (path / "service.pem").write_bytes(pki.cert_to_pem(cert))
    (path / "service.key").write_bytes(pki.key_to_pem(key))
    return path


def _server(files, refused: list) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(files / "service.pem", files / "service.key")
    ctx.set_alpn_protocols(["backhaul/1", "http/1.1"])
    assert openssl_ctx.refuse_unknown_alpn(ctx, ["backhaul/1", "http/1.1"], refused.append)
    return ctx


def _handshake(server_ctx: ssl.SSLContext, files, offered: list[str] | None):
    """Run a TLS handshake between two in-memory SSLObjects; returns (server, client)."""
    client_ctx = ssl.create_default_context(cafile=str(files / "ca.pem"))
    if offered is not None:
        client_ctx.set_alpn_protocols(offered)
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="relay.test")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {client: False, server: False}
    for _ in range(10):
        for obj, out, peer_in in ((client, c_out, s_in), (server, s_out, c_in)):
            if not done[obj]:
                try:
                    obj.do_handshake()
                    done[obj] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if all(done.values()):
            return server, client
    raise AssertionError("the handshake did not finish")


def test_ours_are_chosen_in_our_order_and_no_alpn_is_left_alone(server_files):
    refused: list = []
    ctx = _server(server_files, refused)
    for offered, chosen in (
        (["http/1.1"], "http/1.1"),
        (["h2", "http/1.1"], "http/1.1"),
        (["http/1.1", "backhaul/1"], "backhaul/1"),  # the server's preference wins
        (None, None),
    ):
        server, client = _handshake(ctx, server_files, offered)
        assert server.selected_alpn_protocol() == chosen == client.selected_alpn_protocol()
    assert refused == []


def test_only_unknown_protocols_fail_the_handshake_and_the_owner_is_told(server_files):
    refused: list = []
    ctx = _server(server_files, refused)
    with pytest.raises(ssl.SSLError) as failed:
        _handshake(ctx, server_files, ["h2", "foo/1"])
    assert "NO_APPLICATION_PROTOCOL" in str(failed.value) or "no application protocol" in str(failed.value)
    assert len(refused) == 1 and isinstance(refused[0], ssl.SSLObject) and refused[0].server_side


def test_a_malformed_list_is_refused():
    assert openssl_ctx._parse_protocols(b"\x02h2\x08http/1.1") == {b"h2": 1, b"http/1.1": 4}
    assert openssl_ctx._parse_protocols(b"\x05h2") is None
    assert openssl_ctx._parse_protocols(b"\x00") is None


def test_the_pointer_is_checked_against_what_the_ssl_module_reports():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert openssl_ctx.ssl_ctx_pointer(ctx) is not None
    other = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    other.options |= ssl.OP_NO_TICKET
    # Each context's pointer is its own: the check compares options, which differ here.
    assert openssl_ctx.ssl_ctx_pointer(other) != openssl_ctx.ssl_ctx_pointer(ctx)
