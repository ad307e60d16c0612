"""Release uploads as an attacker (or a broken publisher) tries them, against a real relay:
a manifest signed by another key than the one sent, a tampered file, a file longer than the
signed manifest says (refused without reading past the size), an upload without the admin
token. Each refusal says why, is logged, and leaves nothing stored or served."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from backhaul.release import keys, publish
from tests.tiny_wheels import make_wheel

pytestmark = [pytest.mark.e2e, pytest.mark.codec_independent]


def _context(system) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(system.data_dir / "ca.pem"))


def _call(system, method: str, path: str, body: bytes | None = None, headers: dict | None = None, admin: bool = True):
    conn = http.client.HTTPSConnection("127.0.0.1", system.port, context=_context(system), timeout=10)
    token = (system.data_dir / "admin.token").read_text().strip()
    hdrs = {**({"Authorization": f"Bearer {token}"} if admin else {}), **(headers or {})}
    try:
        conn.request(method, path, body=body, headers=hdrs)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _raw(system, head: bytes, body: bytes) -> tuple[int, dict, bool]:
    """Send ``head`` and ``body`` and read the answer without sending anything more; whether
    the relay then closed the connection."""
    with socket.create_connection(("127.0.0.1", system.port), timeout=10) as plain:
        with _context(system).wrap_socket(plain, server_hostname="127.0.0.1") as sock:
            sock.sendall(head + body)
            reader = sock.makefile("rb")
            status = int(reader.readline().split()[1])
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            answer = json.loads(reader.read(length))
            return status, answer, reader.read(1) == b""


def test_hostile_release_uploads_are_refused_with_reasons(system, tmp_path):
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    wheels = [str(make_wheel(tmp_path, "backhaul", "3.0.0", payload=b"z" * 100_000)), str(make_wheel(tmp_path, "dep", "1.0"))]
    manifest, data, sig, files = publish.build(wheels, key, expires_days=1, now=time.time())

    def post(signature: bytes, public) -> tuple[int, dict]:
        body = {
            "manifest": base64.b64encode(data).decode(), "signature": base64.b64encode(signature).decode(),
            "public_key": keys.public_pem(public).decode(),
        }
        return _call(system, "POST", "/v1/releases", json.dumps(body).encode(), {"Content-Type": "application/json"})

    # Signed by another key than the public key sent along (and named by the manifest).
    status, answer = post(other.sign(data), key.public_key())
    assert (status, answer["error"], answer["reason"]) == (400, "release_refused", "bad_signature")
    # Sent with another public key than the one the manifest names.
    status, answer = post(other.sign(data), other.public_key())
    assert (status, answer["reason"]) == (400, "unknown_key")
    assert _call(system, "GET", "/v1/releases") == (200, [])

    status, answer = post(sig, key.public_key())
    assert status == 201 and answer["state"] == "incomplete"
    entry = manifest.file("backhaul-3.0.0-py3-none-any.whl")
    path = f"/v1/releases/3.0.0/files/{entry.name}"
    good = open(files[entry.name], "rb").read()
    tampered = good[:-1] + bytes([good[-1] ^ 1])

    # Without the admin token: refused before the body.
    assert _call(system, "PUT", path, good, admin=False)[0] == 401
    # A tampered file: refused, with the reason.
    status, answer = _call(system, "PUT", path, tampered)
    assert (status, answer["reason"]) == (400, "bad_hash") and entry.sha256 in answer["detail"]
    # Longer than the manifest says: by its Content-Length, refused before any of the body is read.
    token = (system.data_dir / "admin.token").read_text().strip()
    head = f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n".encode()
    status, answer, closed = _raw(system, head + f"Content-Length: {10 * entry.size}\r\n\r\n".encode(), b"")
    assert (status, answer["reason"], closed) == (413, "bad_size", True)
    # Chunked, so the length is not known: refused at size + 1 bytes; the rest is never sent.
    over = good + b"!"
    status, answer, closed = _raw(system, head + b"Transfer-Encoding: chunked\r\n\r\n", b"%x\r\n%s\r\n" % (len(over), over))
    assert (status, answer["reason"], closed) == (413, "bad_size", True)

    # Nothing of it is stored or served; every refusal is in the relay's log with its reason.
    listed = _call(system, "GET", "/v1/releases")[1]
    assert [(r["version"], r["state"], sorted(r["missing"])) for r in listed] == [("3.0.0", "incomplete", sorted(files))]
    reasons = [e.get("reason") for e in system.relay.log_entries("release refused")]
    assert reasons.count("bad_signature") == 1 and reasons.count("unknown_key") == 1 and "bad_hash" in reasons
    assert [e["reason"] for e in system.relay.log_entries("release file refused")] == ["bad_size", "bad_size"]
    # The right bytes are still taken afterwards.
    for name, p in files.items():
        status, answer = _call(system, "PUT", f"/v1/releases/3.0.0/files/{name}", open(p, "rb").read())
        assert status == 200, answer
    assert answer["state"] == "published"
