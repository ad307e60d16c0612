"""Releases on the control API: upload, list, revoke, serve; over real TLS with a real store."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from backhaul import tlsconfig
from backhaul.admin.client import AdminTarget
from backhaul.config import ReleaseLimits
from backhaul.connector import control_client
from backhaul.control.context import ControlContext, ControlSettings
from backhaul.control.init import initialize
from backhaul.errors import ServiceError
from backhaul.release import keys, publish
from backhaul.release import manifest as rm
from tests.tiny_wheels import make_wheel
from tests.unit.test_control_api import Service

pytestmark = pytest.mark.codec_independent

#: Small chunks, so a file of a few KiB spans several stored chunks.
LIMITS = ReleaseLimits(chunk_size=1000, max_stored=3, max_files=4, max_file_size=200_000)


@pytest.fixture
def run(tmp_path):
    data_dir = tmp_path / "service"
    initialize(data_dir, ["localhost", "127.0.0.1"])
    ctx = ControlContext.load(data_dir, settings=ControlSettings(housekeeping_interval=0, releases=LIMITS))

    def runner(fn):
        async def main():
            async with Service(data_dir, ctx) as service:
                return await fn(service)

        return asyncio.run(asyncio.wait_for(main(), 60))

    yield runner
    ctx.store.close()


@pytest.fixture
def key():
    return Ed25519PrivateKey.generate()


def wheelhouse(tmp_path: Path, version: str, size: int = 5500) -> list[str]:
    d = tmp_path / f"wh-{version}"
    return [
        str(make_wheel(d, "backhaul", version, payload=b"B" * size)),
        str(make_wheel(d, "dep-lib", "2.0", payload=bytes(range(256)) * 10)),
    ]


def target(s: Service) -> AdminTarget:
    return AdminTarget(service_url=s.url, token=s.admin_token, ca=s.ca_pem)


def body_for(data: bytes, sig: bytes, public, auto=False) -> dict:
    return {
        "manifest": base64.b64encode(data).decode(),
        "signature": base64.b64encode(sig).decode(),
        "public_key": keys.public_pem(public).decode(),
        "auto": auto,
    }


async def raw_request(s: Service, head: bytes, body_parts: list[bytes]) -> tuple[int, dict, bool]:
    """Send a request by hand; (status, JSON body, whether the relay closed the connection)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", int(s.url.rsplit(":", 1)[1]), ssl=tlsconfig.admin_context(s.ca_pem), server_hostname="127.0.0.1")
    try:
        writer.write(head)
        for part in body_parts:
            writer.write(part)
        await writer.drain()
        status_line = await reader.readline()
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        body = await reader.readexactly(int(headers["content-length"]))
        closed = await asyncio.wait_for(reader.read(1), 5) == b""
        return int(status_line.split()[1]), orjson.loads(body), closed
    finally:
        writer.close()


def test_publish_serve_revoke(run, tmp_path, key):
    wheels = wheelhouse(tmp_path, "1.1.0")
    state_dir = tmp_path / "connector"

    async def go(s: Service):
        state = await s.register(state_dir)
        manifest, data, sig, files = publish.build(wheels, key, expires_days=1, now=time.time())
        answer = await publish.upload(target(s), data, sig, keys.public_pem(key.public_key()), True, files)
        assert answer["state"] == "published" and answer["missing"] == []
        status, listed, _ = await s.call("GET", "/v1/releases")
        assert status == 200 and [r["version"] for r in listed] == ["1.1.0"]
        assert listed[0]["state"] == "published" and listed[0]["auto"] is True and listed[0]["key_id"] == rm.key_id(key.public_key())
        assert listed[0]["size"] == sum(Path(w).stat().st_size for w in wheels)
        # Its rollout per group: the one registered connector, not on it yet, nothing updating or failed.
        assert listed[0]["groups"] == {"default": {"connectors": 1, "on": 0, "updating": None, "failed": 0, "rolled_back": 0, "halted": None}}
        # Several stored chunks per file (chunk_size 1000).
        chunks = s.store._db.execute("SELECT COUNT(*) FROM release_chunks WHERE version = '1.1.0'").fetchone()[0]
        assert chunks > 6

        async with control_client.connector_session(state) as session:
            base = s.url

            async def get(path):
                async with session.get(base + path) as resp:
                    return resp.status, await resp.read(), resp.headers

            status, raw, _ = await get("/v1/updates?installed=1.0.0")
            update = orjson.loads(raw)["release"]
            assert status == 200 and update["version"] == "1.1.0" and update["auto"] is True
            # What the connector gets verifies with the publisher's key, and says what to fetch.
            got = rm.verify(base64.b64decode(update["manifest"]), base64.b64decode(update["signature"]), [key.public_key()], now=time.time(), installed="1.0.0")
            assert got == manifest
            for entry in manifest.files:
                status, content, headers = await get(f"/v1/releases/1.1.0/files/{entry.name}")
                assert status == 200 and headers["Content-Type"] == "application/octet-stream"
                assert int(headers["Content-Length"]) == entry.size == len(content)
                assert hashlib.sha256(content).hexdigest() == entry.sha256
                assert content == Path(files[entry.name]).read_bytes()
            # Not newer, equal, pre-release ordering.
            for installed in ("1.1.0", "1.2.0", "2.0.0rc1"):
                status, raw, _ = await get(f"/v1/updates?installed={installed}")
                assert (status, orjson.loads(raw)) == (200, {"release": None, "rollout": {"paused": False, "halted": None}}), installed
            status, raw, _ = await get("/v1/updates?installed=1.1.0rc1")
            assert orjson.loads(raw)["release"]["version"] == "1.1.0"
            status, raw, _ = await get("/v1/updates?installed=1.1.0&version=1.1.0")
            assert orjson.loads(raw)["release"]["version"] == "1.1.0"  # asked for by name: served, newer or not
            for bad in ("installed=latest", "installed=1.0%2Bx", "version=" + "1" * 80):
                status, raw, _ = await get(f"/v1/updates?{bad}")
                assert status == 400, bad
            status, _, _ = await get("/v1/updates?version=9.9.9")
            assert status == 404
            status, _, _ = await get("/v1/releases/1.1.0/files/nope-1.0-py3-none-any.whl")
            assert status == 404

            # Revoked: never served again, its bytes gone, its version never accepted again.
            status, body, _ = await s.call("DELETE", "/v1/releases/1.1.0")
            assert (status, body) == (200, {"revoked": "1.1.0"})
            assert s.store._db.execute("SELECT COUNT(*) FROM release_chunks").fetchone()[0] == 0
            status, raw, _ = await get("/v1/updates?version=1.1.0")
            assert status == 410 and orjson.loads(raw)["error"] == "revoked"
            status, raw, _ = await get(f"/v1/releases/1.1.0/files/{manifest.files[0].name}")
            assert status == 410
            status, raw, _ = await get("/v1/updates?installed=1.0.0")
            assert orjson.loads(raw) == {"release": None, "rollout": {"paused": False, "halted": None}}
        status, body, _ = await s.call("POST", "/v1/releases", body_for(data, sig, key.public_key()))
        assert status == 409 and "already exists" in body["detail"]
        status, listed, _ = await s.call("GET", "/v1/releases")
        assert listed[0]["state"] == "revoked" and listed[0]["revoked"]

    run(go)


def test_newest_of_several_and_expired_skipped(run, tmp_path, key):
    async def go(s: Service):
        state = await s.register(tmp_path / "connector")
        now = time.time()
        for version, expires_days in (("1.1.0", 1), ("1.3.0", 1), ("1.2.0", 1)):
            _, data, sig, files = publish.build(wheelhouse(tmp_path, version), key, expires_days=expires_days, now=now)
            await publish.upload(target(s), data, sig, keys.public_pem(key.public_key()), False, files)
        async with control_client.connector_session(state) as session:
            async with session.get(s.url + "/v1/updates?installed=1.0.0") as resp:
                assert (await resp.json())["release"]["version"] == "1.3.0"
            async with session.get(s.url + "/v1/updates") as resp:
                assert (await resp.json())["release"]["version"] == "1.3.0"
        # The store holds at most max_stored (3) releases with files.
        _, data, sig, files = publish.build(wheelhouse(tmp_path, "1.4.0"), key, expires_days=1, now=now)
        with pytest.raises(ServiceError, match="revoke old ones"):
            await publish.upload(target(s), data, sig, keys.public_pem(key.public_key()), False, files)
        await s.call("DELETE", "/v1/releases/1.3.0")
        await publish.upload(target(s), data, sig, keys.public_pem(key.public_key()), False, files)
        # An expired release is not offered as the newest (a connector would refuse it).
        s.ctx.store._db.execute("UPDATE releases SET expires = 1 WHERE version = '1.4.0'")
        async with control_client.connector_session(state) as session:
            async with session.get(s.url + "/v1/updates?installed=1.0.0") as resp:
                assert (await resp.json())["release"]["version"] == "1.2.0"

    run(go)


def test_uploads_the_relay_refuses(run, tmp_path, key):
    other = Ed25519PrivateKey.generate()
    wheels = wheelhouse(tmp_path, "2.0.0")

    async def go(s: Service):
        now = time.time()
        manifest, data, sig, files = publish.build(wheels, key, expires_days=1, now=now)

        async def post(body):
            status, answer, _ = await s.call("POST", "/v1/releases", body)
            return status, answer

        # Signed by another key than the public key sent (which the manifest names).
        status, answer = await post(body_for(data, other.sign(data), key.public_key()))
        assert (status, answer["reason"]) == (400, "bad_signature")
        # A public key that is not the one the manifest names.
        status, answer = await post(body_for(data, sig, other.public_key()))
        assert (status, answer["reason"]) == (400, "unknown_key") and rm.key_id(other.public_key()) in answer["detail"]
        # Tampered manifest.
        status, answer = await post(body_for(data.replace(b"2.0.0", b"2.0.1", 1), sig, key.public_key()))
        assert status == 400 and answer["reason"] in ("bad_signature", "malformed")
        # Expired.
        _, old, old_sig, _ = publish.build(wheels, key, expires_days=1, now=now - 2 * 86400)
        status, answer = await post(body_for(old, old_sig, key.public_key()))
        assert (status, answer["reason"]) == (400, "expired")
        # No backhaul wheel of the release's version.
        m = rm.Manifest(version="2.0.0", issued=int(now), expires=int(now) + 600, key_id=rm.key_id(key.public_key()),
                        files=(rm.FileEntry("dep_lib-2.0-py3-none-any.whl", "ab" * 32, 10),))
        status, answer = await post(body_for(m.to_bytes(), rm.sign(m, key), key.public_key()))
        assert (status, answer["reason"]) == (400, "malformed") and "backhaul wheel" in answer["detail"]
        # Beyond the relay's limits: files and file size.
        many = tuple(rm.FileEntry(f"dep{i}-1.0-py3-none-any.whl", "ab" * 32, 10) for i in range(LIMITS.max_files))
        m = rm.Manifest(version="2.0.0", issued=int(now), expires=int(now) + 600, key_id=rm.key_id(key.public_key()),
                        files=(rm.FileEntry("backhaul-2.0.0-py3-none-any.whl", "ab" * 32, 10), *many))
        status, answer = await post(body_for(m.to_bytes(), rm.sign(m, key), key.public_key()))
        assert (status, answer["reason"]) == (400, "too_large")
        m = rm.Manifest(version="2.0.0", issued=int(now), expires=int(now) + 600, key_id=rm.key_id(key.public_key()),
                        files=(rm.FileEntry("backhaul-2.0.0-py3-none-any.whl", "ab" * 32, LIMITS.max_file_size + 1),))
        status, answer = await post(body_for(m.to_bytes(), rm.sign(m, key), key.public_key()))
        assert (status, answer["reason"]) == (400, "too_large")
        # Malformed bodies.
        for bad in ({}, {**body_for(data, sig, key.public_key()), "x": 1}, {**body_for(data, sig, key.public_key()), "auto": "yes"},
                    {**body_for(data, sig, key.public_key()), "manifest": "***"}, {**body_for(data, sig, key.public_key()), "public_key": "junk"}):
            status, answer = await post(bad)
            assert status == 400, bad
        status, _, _ = await s.call("GET", "/v1/releases")
        assert status == 200
        assert s.store.list_releases() == []

        # The good manifest; then hostile file uploads.
        status, answer = await post(body_for(data, sig, key.public_key()))
        assert status == 201 and answer["state"] == "incomplete" and sorted(answer["missing"]) == sorted(files)
        entry = manifest.files[0]
        good = Path(files[entry.name]).read_bytes()
        path = f"/v1/releases/2.0.0/files/{entry.name}"
        tampered = bytearray(good)
        tampered[len(good) // 2] ^= 1
        status, answer, _ = await s.call("PUT", path, raw=bytes(tampered))
        assert (status, answer["reason"]) == (400, "bad_hash")
        status, answer, _ = await s.call("PUT", path, raw=good[:-1])
        assert (status, answer["reason"]) == (400, "bad_size")
        head = (
            f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {s.admin_token}\r\n"
        ).encode()
        # Content-Length beyond the manifest's size: refused before a byte of the body is read.
        status, answer, closed = await raw_request(s, head + f"Content-Length: {entry.size + 10_000_000}\r\n\r\n".encode(), [])
        assert (status, answer["reason"], closed) == (413, "bad_size", True)
        # A chunked body longer than the size: refused after size + 1 bytes, the rest never sent.
        over = good + b"X"
        status, answer, closed = await raw_request(
            s, head + b"Transfer-Encoding: chunked\r\n\r\n", [b"%x\r\n%s\r\n" % (len(over), over)]
        )
        assert (status, answer["reason"], closed) == (413, "bad_size", True)
        assert "nothing past" in answer["detail"]
        # Nothing of the refused uploads stays; the release is still incomplete and unserved.
        assert s.store._db.execute("SELECT COUNT(*) FROM release_chunks").fetchone()[0] == 0
        assert s.store.get_release("2.0.0").state == "incomplete"
        # The right bytes, chunked, are taken.
        status, answer, _ = await raw_request(
            s, head + b"Connection: close\r\nTransfer-Encoding: chunked\r\n\r\n", [b"%x\r\n%s\r\n0\r\n\r\n" % (len(good), good)]
        )
        assert status == 200 and answer["missing"] == [manifest.files[1].name]
        status, answer, _ = await s.call("PUT", path, raw=good)
        assert status == 409 and "already uploaded" in answer["detail"]
        status, answer, _ = await s.call("PUT", "/v1/releases/2.0.0/files/other-1.0-py3-none-any.whl", raw=b"x")
        assert status == 404
        # Admin calls need the admin token; connector calls a connector certificate.
        for method, p in (("PUT", f"/v1/releases/2.0.0/files/{manifest.files[1].name}"), ("GET", "/v1/releases"),
                          ("DELETE", "/v1/releases/2.0.0"), ("POST", "/v1/releases")):
            status, _, _ = await s.call(method, p, token=None, raw=b"{}")
            assert status == 401, (method, p)
        for p in ("/v1/updates", f"/v1/releases/2.0.0/files/{entry.name}"):
            status, answer, _ = await s.call("GET", p, token=None)
            assert (status, answer["error"]) == (403, "no_client_certificate")
        # A publish run again with a new manifest of the same (unpublished) version replaces it.
        _, data2, sig2, files2 = publish.build(wheels, key, expires_days=2, now=now)
        answer = await publish.upload(target(s), data2, sig2, keys.public_pem(key.public_key()), False, files2)
        assert answer["state"] == "published"
        assert s.store.get_release("2.0.0").manifest == data2

    run(go)
