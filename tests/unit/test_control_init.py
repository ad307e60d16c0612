"""`backhaul service init`, run as a real subprocess on real files."""

from __future__ import annotations

import json
import stat
import subprocess
import sys

import pytest
from cryptography import x509

from backhaul import pki
from backhaul.control.web import token_hash
from backhaul.store import open_store

pytestmark = pytest.mark.codec_independent

BACKHAUL = [sys.executable, "-m", "backhaul"]


def _init(data_dir, *extra):
    return subprocess.run(BACKHAUL + ["service", "init", "--data-dir", str(data_dir), *extra], capture_output=True, text=True, timeout=60)


def test_init_creates_everything_with_private_modes(tmp_path):
    data_dir = tmp_path / "svc"
    result = _init(data_dir, "--json", "--name", "relay.example.com", "--name", "127.0.0.1")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert set(out) == {"ca_sha256", "admin_token_file", "node_id"}
    assert pki.is_node_id(out["node_id"])
    assert out["admin_token_file"] == str(data_dir / "admin.token")
    assert out["ca_sha256"] == pki.fingerprint_sha256((data_dir / "ca.pem").read_bytes())
    assert sorted(p.name for p in data_dir.iterdir() if not p.name.startswith("store.sqlite-")) == [
        "admin.token", "ca.key", "ca.pem", "service.json", "service.key", "service.pem", "store.sqlite",
    ]
    for secret in ("ca.key", "service.key", "admin.token"):
        assert stat.S_IMODE((data_dir / secret).stat().st_mode) == 0o600, secret
    assert json.loads((data_dir / "service.json").read_text()) == {
        "names": ["relay.example.com", "127.0.0.1"], "ca_sha256": out["ca_sha256"], "node_id": out["node_id"],
    }
    cert = pki.load_cert_file(data_dir / "service.pem")
    assert pki.node_id_of(cert) == out["node_id"]  # a node certificate, so a one-node relay has an id too
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["relay.example.com"]
    pki.verify_issued_by(cert, pki.load_cert_file(data_dir / "ca.pem"))
    token = (data_dir / "admin.token").read_text().strip()
    store = open_store(data_dir)
    try:
        assert store.admin_token_hash() == token_hash(token)
        assert [g.name for g in store.list_groups()] == ["default"]
    finally:
        store.close()


def test_init_in_words_and_default_names(tmp_path):
    result = _init(tmp_path / "svc")
    assert result.returncode == 0, result.stderr
    assert "SHA-256" in result.stdout and "admin.token" in result.stdout
    names = json.loads((tmp_path / "svc" / "service.json").read_text())["names"]
    assert names[:3] == ["localhost", "127.0.0.1", "::1"]


def test_init_refuses_an_initialized_dir_and_changes_nothing(tmp_path):
    data_dir = tmp_path / "svc"
    assert _init(data_dir).returncode == 0
    before = {p.name: p.read_bytes() for p in data_dir.iterdir() if not p.name.startswith("store.sqlite")}
    again = _init(data_dir, "--json")
    assert again.returncode == 2 and again.stdout == ""
    assert again.stderr.count("\n") == 1 and "already initialized" in again.stderr
    assert {p.name: p.read_bytes() for p in data_dir.iterdir() if not p.name.startswith("store.sqlite")} == before


def test_bad_name_is_refused_before_anything_is_written(tmp_path):
    data_dir = tmp_path / "svc"
    result = _init(data_dir, "--name", "not a host")
    assert result.returncode == 2 and "--name" in result.stderr
    assert not data_dir.exists() or list(data_dir.iterdir()) == []


def test_init_into_an_existing_open_dir_makes_it_private(tmp_path):
    import os

    from backhaul.control.init import chmod_command, initialize, loose_modes

    data_dir = tmp_path / "open"
    data_dir.mkdir()
    data_dir.chmod(0o755)
    old = os.umask(0o022)
    try:
        initialize(data_dir, ["127.0.0.1"])
    finally:
        os.umask(old)
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    for path in data_dir.iterdir():
        if path.name.startswith("store.sqlite") or path.name in ("ca.key", "service.key", "admin.token"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
    assert loose_modes(data_dir) == []
    (data_dir / "admin.token").chmod(0o640)
    data_dir.chmod(0o750)
    loose = loose_modes(data_dir)
    assert loose == [data_dir, data_dir / "admin.token"]
    assert chmod_command(loose) == f"chmod 700 {data_dir} && chmod 600 {data_dir / 'admin.token'}"


def test_init_refuses_a_file_where_the_dir_should_be(tmp_path):
    from backhaul.control.init import initialize
    from backhaul.errors import ConfigError

    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="not a directory"):
        initialize(tmp_path / "f", ["127.0.0.1"])


def test_a_data_dir_from_before_node_ids_gets_one_at_its_first_run_and_keeps_it(tmp_path):
    from backhaul.control.init import ensure_node_id

    data_dir = tmp_path / "svc"
    assert _init(data_dir).returncode == 0
    facts = json.loads((data_dir / "service.json").read_text())
    old = {"names": facts["names"], "ca_sha256": facts["ca_sha256"]}  # as service init wrote it before
    (data_dir / "service.json").write_text(json.dumps(old))
    node_id = ensure_node_id(data_dir)
    assert pki.is_node_id(node_id)
    assert json.loads((data_dir / "service.json").read_text()) == {**old, "node_id": node_id}
    assert ensure_node_id(data_dir) == node_id  # kept from then on


def test_the_advertise_address_defaults_to_listen_or_the_first_name_for_a_wildcard():
    from backhaul.errors import ConfigError
    from backhaul.relay.service import _advertise

    assert _advertise("127.0.0.2:8443", None, ["relay.example"]) == "127.0.0.2:8443"
    assert _advertise("0.0.0.0:8443", None, ["relay.example", "10.0.0.1"]) == "relay.example:8443"
    assert _advertise("[::]:8443", None, ["::1"]) == "[::1]:8443"
    assert _advertise("0.0.0.0:8443", "lb.example:443", []) == "lb.example:443"
    with pytest.raises(ConfigError, match="--advertise"):
        _advertise("0.0.0.0:8443", "no-port", ["relay.example"])
    with pytest.raises(ConfigError, match="pass --advertise"):
        _advertise("0.0.0.0:8443", None, [])


def test_joining_a_store_that_holds_no_service_and_a_store_that_is_not_postgresql_are_refused(tmp_path, postgres_url):
    import base64
    import os

    from backhaul.control.init import initialize
    from backhaul.errors import ConfigError

    key = tmp_path / "cluster.key"
    key.write_text(base64.b64encode(os.urandom(32)).decode())
    with pytest.raises(ConfigError, match="holds no relay service yet"):
        initialize(tmp_path / "a", ["127.0.0.1"], postgres_url, key)
    assert sorted((tmp_path / "a").iterdir()) == []
    with pytest.raises(ConfigError, match="PostgreSQL URL"):
        initialize(tmp_path / "b", ["127.0.0.1"], "sqlite:///x", None)
    key.write_text("not a key")
    with pytest.raises(ConfigError, match="does not hold a cluster key"):
        initialize(tmp_path / "c", ["127.0.0.1"], postgres_url, key)
    with pytest.raises(ConfigError, match="pass --store"):
        initialize(tmp_path / "d", ["127.0.0.1"], None, key)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
