"""tls_kernel: kernel TLS detection from the kernel's ULP list (a file given as input), and
what each tunnel's "tunnel up" line says; the kernel's own tls module where it exists."""

from __future__ import annotations

import socket
import ssl

import pytest

from backhaul import openssl_ctx, tls_kernel

pytestmark = pytest.mark.codec_independent

#: TCP_ULP from linux/tcp.h (the socket module names it only from Python 3.12)
TCP_ULP = 31


def _ulp_file(tmp_path, text: str):
    path = tmp_path / "tcp_available_ulp"
    path.write_text(text)
    return path


def test_a_kernel_listing_only_mptcp_has_no_ktls(tmp_path):
    found = tls_kernel.detect(True, _ulp_file(tmp_path, "mptcp\n"))
    assert not found.possible and found.reason == tls_kernel.NO_KERNEL_MODULE
    assert tls_kernel.for_transport(found, None) == (False, tls_kernel.NO_KERNEL_MODULE)


def test_a_kernel_listing_tls_could_but_a_memory_bio_transport_never_does(tmp_path):
    found = tls_kernel.detect(True, _ulp_file(tmp_path, "espintcp mptcp tls\n"))
    assert found.possible and found.wanted
    memory_bio = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="x")
    assert tls_kernel.for_transport(found, memory_bio) == (False, tls_kernel.MEMORY_BIO)
    # Off in the settings: said so, before the transport is looked at.
    off = tls_kernel.detect(False, _ulp_file(tmp_path, "tls\n"))
    assert tls_kernel.for_transport(off, memory_bio) == (False, tls_kernel.NOT_ASKED)


def test_an_old_openssl_or_no_proc_file(tmp_path):
    assert tls_kernel.detect(True, _ulp_file(tmp_path, "tls"), (1, 1, 1, 23, 15)).reason == tls_kernel.OLD_OPENSSL
    assert tls_kernel.detect(True, tmp_path / "missing").reason == tls_kernel.NO_KERNEL_MODULE


def test_the_option_reaches_openssl():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert not ctx.options & openssl_ctx.SSL_OP_ENABLE_KTLS
    assert openssl_ctx.enable_ktls(ctx)
    assert ctx.options & openssl_ctx.SSL_OP_ENABLE_KTLS


@pytest.mark.skipif(
    "tls" not in tls_kernel.kernel_ulps(), reason="the kernel has no tls module (tcp_available_ulp lacks tls)"
)
def test_the_kernel_takes_the_tls_ulp_on_a_real_connection():
    assert tls_kernel.detect(True).possible
    with socket.create_server(("127.0.0.1", 0)) as server:
        with socket.create_connection(server.getsockname()) as client:
            accepted, _ = server.accept()
            with accepted:
                client.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
                assert client.getsockopt(socket.IPPROTO_TCP, TCP_ULP, 16).rstrip(b"\0") == b"tls"
