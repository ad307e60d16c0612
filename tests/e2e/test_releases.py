"""Signed releases end to end: keygen, publish, list, revoke through the CLI against a real
relay, and the connector-facing endpoints over mTLS with a registered connector's certificate."""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
import stat
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from backhaul import tlsconfig
from backhaul.connector.state import ConnectorState
from backhaul.release import keys, manifest as rm
from tests.tiny_wheels import make_wheel

from .harness import running_relay

pytestmark = [pytest.mark.e2e, pytest.mark.codec_independent]


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    """One relay for the module: starting one costs a second or two."""
    with running_relay(tmp_path_factory.mktemp("releases")) as system:
        yield system


@pytest.fixture(scope="module")
def signing(relay):
    """A key pair made by `backhaul release keygen`: (private path, public path, key id)."""
    d = relay.workdir / "keys"
    d.mkdir()
    out = relay.cli("release", "keygen", "--private", str(d / "release.key"), "--public", str(d / "release.pub"))
    return d / "release.key", d / "release.pub", out.stdout.strip()


def wheelhouse(root: Path, version: str) -> list[Path]:
    d = root / f"wheels-{version}"
    return [
        make_wheel(d, "backhaul", version, payload=version.encode() * 40_000),  # ~200 KB
        make_wheel(d, "some-dep", "3.1", payload=bytes(range(256)) * 500),
    ]


def connector_get(state: Path, url: str) -> tuple[int, bytes, dict]:
    ctx = tlsconfig.connector_context(ConnectorState.load(state), tlsconfig.ALPN_HTTP)
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=10) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def test_keygen_publish_list_and_refusals(relay, signing):
    private, public, kid = signing
    assert len(kid) == 16 and stat.S_IMODE(private.stat().st_mode) == 0o600
    assert kid == rm.key_id(keys.load_public(public))
    before = private.read_bytes()
    again = relay.cli("release", "keygen", "--private", str(private), "--public", str(public.with_name("x.pub")), check=False)
    assert again.returncode != 0 and "refusing to overwrite" in again.stderr
    assert private.read_bytes() == before and not public.with_name("x.pub").exists()

    first = relay.admin_json("release", "publish", *map(str, wheelhouse(relay.workdir, "1.1.0")), "--signing-key", str(private))
    assert first["state"] == "published" and first["version"] == "1.1.0" and first["key_id"] == kid
    second = relay.admin_json(
        "release", "publish", *map(str, wheelhouse(relay.workdir, "1.2.0")), "--signing-key", str(private), "--auto", "--expires", "7"
    )
    assert second["state"] == "published" and second["expires"] - time.time() == pytest.approx(7 * 86400, abs=60)

    # What the CLI refuses before anything is sent.
    dep_only = [str(wheelhouse(relay.workdir, "1.1.0")[1])]
    two_versions = [str(wheelhouse(relay.workdir, "1.1.0")[0]), str(wheelhouse(relay.workdir, "1.2.0")[0])]
    not_a_wheel = relay.workdir / "notes.txt"
    not_a_wheel.write_text("hello")
    for wheels, words in (
        (dep_only, "none of the files is a backhaul wheel"),
        (two_versions, "several versions"),
        ([*map(str, wheelhouse(relay.workdir, "1.1.0")), str(not_a_wheel)], "is not a wheel"),
    ):
        result = relay.admin("release", "publish", *wheels, "--signing-key", str(private), check=False)
        assert result.returncode != 0 and words in result.stderr, result.stderr

    listed = {r["version"]: r for r in relay.admin_json("release", "list")}
    assert set(listed) == {"1.1.0", "1.2.0"}
    assert listed["1.1.0"]["auto"] is False and listed["1.2.0"]["auto"] is True
    assert all(r["state"] == "published" and len(r["files"]) == 2 and r["key_id"] == kid for r in listed.values())
    assert listed["1.2.0"]["size"] == sum(p.stat().st_size for p in wheelhouse(relay.workdir, "1.2.0"))
    human = relay.admin("release", "list").stdout
    assert "VERSION" in human and "1.2.0" in human and "published" in human


def test_connector_endpoints_pinned_keys_and_revoke(relay, signing):
    private, public, kid = signing
    if not relay.api("/v1/releases"):
        test_keygen_publish_list_and_refusals(relay, signing)
    state = relay.workdir / "conn-updater"
    token = relay.token()
    out = relay.cli(
        "connector", "register", "--service", relay.url, "--token", token, "--ca-sha256", relay.ca_sha256,
        "--state-dir", str(state), "--name", "updater", "--release-key", str(public),
    ).stdout
    assert kid in out
    assert (state / "release-keys" / f"{kid}.pem").read_bytes() == public.read_bytes()
    status = json.loads(relay.cli("connector", "status", "--state-dir", str(state), "--json").stdout)
    assert status["release_keys"] == [kid]
    pinned = keys.load_pinned(state)

    code, raw, _ = connector_get(state, f"{relay.url}/v1/updates?installed=1.0.0")
    assert code == 200
    update = json.loads(raw)["release"]
    assert update["version"] == "1.2.0" and update["auto"] is True
    manifest = rm.verify(
        base64.b64decode(update["manifest"]), base64.b64decode(update["signature"]), pinned, now=time.time(), installed="1.0.0"
    )
    uploaded = {p.name: p.read_bytes() for p in wheelhouse(relay.workdir, "1.2.0")}
    assert {f.name for f in manifest.files} == set(uploaded)
    for entry in manifest.files:
        code, body, headers = connector_get(state, f"{relay.url}/v1/releases/1.2.0/files/{entry.name}")
        assert code == 200 and headers["Content-Type"] == "application/octet-stream"
        assert len(body) == entry.size and hashlib.sha256(body).hexdigest() == entry.sha256
        assert body == uploaded[entry.name]
    code, raw, _ = connector_get(state, f"{relay.url}/v1/updates?installed=1.2.0")
    assert json.loads(raw) == {"release": None, "rollout": {"paused": False, "halted": None}}

    # Without the connector's certificate: refused.
    ctx = ssl.create_default_context(cafile=str(relay.data_dir / "ca.pem"))
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{relay.url}/v1/updates", context=ctx, timeout=5)
    assert refused.value.code == 403

    # Revoked: never served again; the next older one is offered instead.
    assert "revoked release 1.2.0" in relay.admin("release", "revoke", "1.2.0").stdout
    code, raw, _ = connector_get(state, f"{relay.url}/v1/updates?installed=1.0.0")
    assert json.loads(raw)["release"]["version"] == "1.1.0"
    assert connector_get(state, f"{relay.url}/v1/updates?version=1.2.0")[0] == 410
    assert connector_get(state, f"{relay.url}/v1/releases/1.2.0/files/{manifest.files[0].name}")[0] == 410
    states = {r["version"]: r["state"] for r in relay.admin_json("release", "list")}
    assert states == {"1.1.0": "published", "1.2.0": "revoked"}
    again = relay.admin("release", "publish", *map(str, wheelhouse(relay.workdir, "1.2.0")), "--signing-key", str(private), check=False)
    assert again.returncode != 0 and "already exists (revoked)" in again.stderr
