"""Certificates for the TLS peers of bench/compare.py (v2ray, stunnel), made at run time.

Our own throwaway CA, a server certificate for ``SERVER_NAME`` and a client certificate,
all with backhaul.pki (EC P-256), written into one directory. It needs backhaul and the
cryptography package; bench/peers.py imports it where they are importable, and otherwise
runs this file with the Python next to the ``backhaul`` command (``python peer_pki.py DIR``).
"""

from __future__ import annotations

import sys
from pathlib import Path

#: The DNS name the peers' server certificates carry and their clients check.
SERVER_NAME = "peer.bench"
#: File name of each PEM the peers' configurations point at.
FILES = {
    "ca": "ca.pem",
    "server_cert": "server.pem",
    "server_key": "server.key",
    "client_cert": "client.pem",
    "client_key": "client.key",
}


def write_pki(directory: Path) -> dict[str, Path]:
    """Write the CA, server and client PEMs into ``directory``; their paths by FILES key."""
    from backhaul import pki  # here, not at module level: peers.py imports this file on any Python

    ca = pki.make_ca("backhaul bench peers CA")
    server_key, server_cert = pki.make_service_cert(ca, [SERVER_NAME, "127.0.0.1"])
    client_key = pki.generate_key()
    client_cert = pki.sign_csr(ca, pki.make_csr(client_key, "bench-client"), pki.new_connector_id())
    paths = {key: Path(directory, name) for key, name in FILES.items()}
    pki.write_file(paths["ca"], ca.cert_pem)
    pki.write_file(paths["server_cert"], pki.cert_to_pem(server_cert))
    pki.write_private(paths["server_key"], pki.key_to_pem(server_key))
    pki.write_file(paths["client_cert"], pki.cert_to_pem(client_cert))
    pki.write_private(paths["client_key"], pki.key_to_pem(client_key))
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} DIRECTORY")
    write_pki(Path(sys.argv[1]))
