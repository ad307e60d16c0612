"""TlsListener in one process: counts from accept to close, the handshake cap, early data.

Real TLS (a CA and service certificate made with backhaul.pki) on real sockets on
127.0.0.1, on uvloop as the relay runs.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

import pytest
import uvloop

from backhaul import pki, tlsconfig
from backhaul.config import ListenLimits
from backhaul.relay.accept import TlsListener, send_alpn_alert
from backhaul.relay.admission import Admission

pytestmark = pytest.mark.codec_independent


def _data_dir(tmp_path):
    ca = pki.make_ca()
    key, cert = pki.make_service_cert(ca, ["127.0.0.1"])
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    (tmp_path / "service.pem").write_bytes(pki.cert_to_pem(cert))
    (tmp_path / "service.key").write_bytes(pki.key_to_pem(key))
    return tmp_path


class Recorder(asyncio.Protocol):
    def __init__(self, slot) -> None:
        self.slot = slot
        self.data = b""
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.data += data

    def connection_lost(self, exc):
        self.slot.release()
        self.lost.set_result(exc)


async def _until(predicate, what: str) -> None:
    for _ in range(400):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


async def _serve(tmp_path, limits: ListenLimits, budget: int = 100):
    admission = Admission(limits, budget)
    accepted: list[Recorder] = []

    def on_tls(transport, slot):
        accepted.append(Recorder(slot))
        return accepted[-1]

    context = tlsconfig.server_context(_data_dir(tmp_path), on_alpn_refused=send_alpn_alert)
    listener = TlsListener("listen", context, admission, on_tls, max_per_address=limits.max_per_address)
    server = await asyncio.get_running_loop().create_server(listener, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], listener, admission, accepted


def _client(tmp_path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    ctx.set_alpn_protocols(["backhaul/1"])
    return ctx


def test_data_sent_with_the_handshake_reaches_the_protocol_and_the_slot_is_freed(tmp_path):
    async def run():
        server, port, listener, admission, accepted = await _serve(tmp_path, ListenLimits())
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=_client(tmp_path), server_hostname="127.0.0.1")
        writer.write(b"first frames" * 1000)
        await _until(lambda: accepted and len(accepted[0].data) == 12000, "the early data")
        assert admission.open == 1 and listener.per_address == {"127.0.0.1": 1} and listener.handshakes == 0
        writer.close()
        await asyncio.wait_for(accepted[0].lost, 5)
        assert admission.open == 0 and listener.per_address == {}
        server.close()

    uvloop.run(run())


def test_handshakes_in_progress_are_capped_and_failed_ones_free_their_place(tmp_path):
    async def run():
        limits = ListenLimits(max_handshakes=2, handshake_timeout=0.5)
        server, port, listener, admission, accepted = await _serve(tmp_path, limits)
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        await _until(lambda: listener.handshakes == 2, "two handshakes in progress")
        third = socket.create_connection(("127.0.0.1", port))
        third.settimeout(2)
        # Closed at accept: a reset or EOF, not a ServerHello.
        try:
            assert await asyncio.to_thread(third.recv, 1) == b""
        except ConnectionResetError:
            pass
        assert admission.metrics.events == {"listen_refused": 1}
        garbage = silent[0]
        garbage.sendall(b"GET / HTTP/1.1\r\n\r\n")  # not TLS: the handshake fails
        await _until(lambda: listener.handshakes == 1, "the failed handshake to be counted out")
        # The other one says nothing: the handshake timeout frees its place.
        await _until(lambda: listener.handshakes == 0, "the handshake timeout")
        assert admission.open == 0 and listener.per_address == {} and not accepted
        for sock in silent + [third]:
            sock.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=_client(tmp_path), server_hostname="127.0.0.1")
        await _until(lambda: accepted, "a handshake once places are free")
        writer.close()
        server.close()

    uvloop.run(run())


def test_the_budget_and_the_per_address_cap_refuse_at_accept(tmp_path):
    async def run():
        server, port, listener, admission, accepted = await _serve(tmp_path, ListenLimits(max_per_address=2, address_share=1.0), budget=3)
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        await _until(lambda: listener.handshakes == 2, "two handshakes")
        over = socket.create_connection(("127.0.0.1", port))
        other = socket.socket()
        other.bind(("127.0.0.2", 0))
        other.connect(("127.0.0.1", port))
        await _until(lambda: listener.handshakes == 3, "the other address's handshake")
        assert admission.open == 3 and listener.per_address == {"127.0.0.1": 2, "127.0.0.2": 1}
        last = socket.socket()
        last.bind(("127.0.0.3", 0))
        last.connect(("127.0.0.1", port))  # the budget of 3 is spent
        await _until(lambda: admission.metrics.events.get("listen_refused") == 2, "two refusals")
        for sock in held + [over, other, last]:
            sock.close()
        await _until(lambda: admission.open == 0, "every place freed")
        assert listener.per_address == {}
        server.close()

    uvloop.run(run())


def test_one_address_takes_at_most_its_share_of_a_small_budget(tmp_path):
    async def run():
        limits = ListenLimits(max_per_address=512, address_share=0.25)
        server, port, listener, admission, accepted = await _serve(tmp_path, limits, budget=8)
        mine = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        await _until(lambda: admission.metrics.events.get("listen_refused") == 1, "the third connection refused")
        assert listener.per_address == {"127.0.0.1": 2}  # a quarter of 8, not 512
        other = socket.socket()
        other.bind(("127.0.0.2", 0))
        other.connect(("127.0.0.1", port))
        await _until(lambda: listener.per_address.get("127.0.0.2") == 1, "another address let in")
        for sock in mine + [other]:
            sock.close()
        await _until(lambda: admission.open == 0, "every place freed")
        server.close()

    uvloop.run(run())
