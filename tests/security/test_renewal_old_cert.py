"""A renewed connector's previous certificate (a stolen copy, say) stops working soon after
the connector uses its new one, instead of staying good for the rest of its 90 days."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import time

import pytest

from backhaul.connector import control_client
from backhaul.connector.state import ConnectorState
from backhaul.control.context import ControlSettings
from backhaul.protocol.constants import ALPN_TUNNEL

from tests.e2e.harness import wait_until

pytestmark = pytest.mark.e2e

#: Certificates of 30 s: the grace is a tenth of that (the 5 minutes of 90-day ones would make a slow test).
VALIDITY = 30.0


def _tunnel_answers(system, creds) -> bool:
    """Dial a tunnel with the key and certificate in ``creds``: True if the relay says hello, False if it hangs up."""
    tls = ssl.create_default_context(cafile=str(creds / "ca.pem"))
    tls.load_cert_chain(str(creds / "cert.pem"), str(creds / "key.pem"))
    tls.set_alpn_protocols([ALPN_TUNNEL])
    with socket.create_connection(("127.0.0.1", system.port), timeout=10) as raw:
        with tls.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            assert sock.selected_alpn_protocol() == ALPN_TUNNEL
            return sock.recv(1) != b""


async def _renew(state_dir) -> ConnectorState:
    state = ConnectorState.load(state_dir)
    async with control_client.connector_session(state) as session:
        return await control_client.renew(state, session)


def test_old_certificate_is_refused_after_the_grace_once_the_new_one_is_used(system, backend, tmp_path):
    grace = ControlSettings(cert_validity=VALIDITY).replaced_cert_grace
    assert grace == 3.0
    echo = backend("echo")
    system.relay.stop()
    system.start_relay(extra=("--cert-validity", str(VALIDITY)))
    state_dir = system.register("one")
    stolen = tmp_path / "stolen"
    stolen.mkdir()
    for name in ("ca.pem", "cert.pem", "key.pem"):
        shutil.copy(state_dir / name, stolen / name)
    old_expires = system.connector_info("one")["cert_expires"]
    # The connector's own renewal code; its new certificate is in the state dir, not used yet.
    renewed = asyncio.run(_renew(state_dir))
    info = system.connector_info("one")
    assert info["cert_serial"] == format(renewed.cert_serial, "x") and info["previous_expires"] == old_expires
    assert _tunnel_answers(system, stolen)  # unused new certificate: the old one still works (a lost answer)
    # The connector starts with its new certificate: its config pull is the first use.
    system.start_connector("one", tunnels=1)
    port = system.publish_tcp("echo", echo.target)
    system.wait_app(port)
    cut = wait_until(
        lambda: (e := system.connector_info("one")["previous_expires"]) < old_expires and e,
        10, "the relay to see the new certificate used",
    )
    assert cut <= time.time() + grace + 1
    wait_until(lambda: not _tunnel_answers(system, stolen), grace + 10, "the old certificate to be refused")
    assert time.time() >= cut - 1.0, "refused before the grace was over"
    assert time.time() < old_expires, "refused only because it expired: the test proves nothing"
    wait_until(lambda: system.relay.log_entries("tunnel refused: connector unknown, revoked or certificate replaced"), 10, "the refusal in the relay log")
    # The connector, on its new certificate, works on: a fresh connection, a fresh tunnel.
    system.wait_app(port)
    assert _tunnel_answers(system, state_dir)
