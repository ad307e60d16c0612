"""The connector state dir and the admin credential lookup, on real files."""

from __future__ import annotations

import datetime
import os
import stat

import pytest

from backhaul import pki
from backhaul.admin.client import DEFAULT_SERVICE, resolve_target
from backhaul.connector.state import ConnectorState, parse_service_url, replace_credentials, write_state
from backhaul.errors import CertificateError, ConfigError

pytestmark = pytest.mark.codec_independent


@pytest.fixture(scope="module")
def ca():
    return pki.make_ca()


def _issue(ca, cid, days=90):
    key = pki.generate_key()
    cert = pki.sign_csr(ca, pki.make_csr(key, "x"), cid, datetime.timedelta(days=days))
    return pki.cert_to_pem(cert), pki.key_to_pem(key)


@pytest.fixture
def state_dir(tmp_path, ca):
    cid = pki.new_connector_id()
    cert_pem, key_pem = _issue(ca, cid)
    d = tmp_path / "state"
    write_state(d, service_url="https://relay.example.com:8443", connector_id=cid, name="edge", ca_pem=ca.cert_pem, cert_pem=cert_pem, key_pem=key_pem)
    return d


def test_load_reads_everything(state_dir):
    st = ConnectorState.load(state_dir)
    assert (st.host, st.port, st.name) == ("relay.example.com", 8443, "edge")
    assert st.cert_path == state_dir / "cert.pem"
    assert stat.S_IMODE(st.key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert not st.renewal_due()
    assert st.renewal_due(st.cert_not_before + datetime.timedelta(days=61))
    assert 89 * 86400 < st.seconds_left() <= 90 * 86400 + 600


def test_short_lived_certificate_is_due_at_two_thirds_of_its_life_from_issue(tmp_path, ca):
    # Back-dating by CLOCK_SKEW must not count as lifetime: a 60 s certificate is not due at once.
    cid = pki.new_connector_id()
    key = pki.generate_key()
    cert = pki.sign_csr(ca, pki.make_csr(key, "x"), cid, datetime.timedelta(seconds=60))
    d = tmp_path / "state"
    write_state(d, service_url="https://relay.example.com:8443", connector_id=cid, name="edge", ca_pem=ca.cert_pem,
                cert_pem=pki.cert_to_pem(cert), key_pem=pki.key_to_pem(key))
    st = ConnectorState.load(d)
    issued = st.cert_not_before + pki.CLOCK_SKEW
    assert not st.renewal_due(issued + datetime.timedelta(seconds=39))
    assert st.renewal_due(issued + datetime.timedelta(seconds=41))


def test_missing_or_corrupt_state_says_what_to_do(tmp_path, state_dir, ca):
    with pytest.raises(ConfigError, match="not registered"):
        ConnectorState.load(tmp_path / "nowhere")
    (state_dir / "connector.json").write_text("{broken")
    with pytest.raises(ConfigError, match="corrupt"):
        ConnectorState.load(state_dir)
    (state_dir / "connector.json").write_text('{"service": "https://h", "connector_id": "nope", "name": "x"}')
    with pytest.raises(ConfigError, match="malformed connector id"):
        ConnectorState.load(state_dir)


def test_key_of_another_certificate_is_detected(state_dir):
    pki.write_private(state_dir / "key.pem", pki.key_to_pem(pki.generate_key()))
    with pytest.raises(CertificateError, match="does not belong"):
        ConnectorState.load(state_dir)


def test_certificate_of_another_ca_is_detected(state_dir):
    other = pki.make_ca()
    cid = ConnectorState.load(state_dir).connector_id
    cert_pem, key_pem = _issue(other, cid)
    replace_credentials(state_dir, cert_pem, key_pem)
    with pytest.raises(CertificateError, match="not issued by the service CA"):
        ConnectorState.load(state_dir)


def test_expired_certificate_says_re_register(state_dir):
    st = ConnectorState.load(state_dir)
    with pytest.raises(CertificateError, match="re-register with a new token"):
        ConnectorState.load(state_dir, now=st.cert_not_after + datetime.timedelta(seconds=1))


def test_replace_credentials_and_crash_recovery(state_dir, ca):
    st = ConnectorState.load(state_dir)
    cert_pem, key_pem = _issue(ca, st.connector_id)
    replace_credentials(state_dir, cert_pem, key_pem)
    assert (state_dir / "cert.pem").read_bytes() == cert_pem
    assert stat.S_IMODE((state_dir / "key.pem").stat().st_mode) == 0o600
    # Crash after the commit point (cert.pem.next written) but before the renames:
    cert2, key2 = _issue(ca, st.connector_id)
    pki.write_private(state_dir / "key.pem.next", key2)
    pki.write_file(state_dir / "cert.pem.next", cert2)
    assert ConnectorState.load(state_dir).cert_serial == pki.load_cert(cert2).serial_number
    # Crash after the key was renamed but before the certificate was:
    cert3, key3 = _issue(ca, st.connector_id)
    pki.write_file(state_dir / "cert.pem.next", cert3)
    pki.write_private(state_dir / "key.pem", key3)
    assert ConnectorState.load(state_dir).cert_serial == pki.load_cert(cert3).serial_number
    # Crash before the commit point: the half-done renewal is discarded.
    pki.write_private(state_dir / "key.pem.next", pki.key_to_pem(pki.generate_key()))
    assert ConnectorState.load(state_dir).cert_serial == pki.load_cert(cert3).serial_number
    assert sorted(p.name for p in state_dir.iterdir()) == ["ca.pem", "cert.pem", "connector.json", "key.pem"]


@pytest.mark.parametrize("url", ["http://h:1", "https://", "https://h/path", "https://u@h:1", "https://h:99999", "nonsense"])
def test_bad_service_urls(url):
    with pytest.raises(ConfigError):
        parse_service_url(url)


def test_admin_credentials_precedence(tmp_path):
    data_dir = tmp_path / "svc"
    data_dir.mkdir()
    (data_dir / "admin.token").write_text("from-data-dir\n")
    (data_dir / "ca.pem").write_text("ca")
    token_file = tmp_path / "t"
    token_file.write_text("from-file\n")
    ca_env = tmp_path / "ca-env.pem"
    ca_env.write_text("ca")
    env = {"BACKHAUL_SERVICE": "https://env:1", "BACKHAUL_TOKEN": "from-env", "BACKHAUL_CA": str(ca_env)}
    t = resolve_target(service="https://flag:2", token_file=str(token_file), data_dir=str(data_dir), environ=env)
    assert (t.service_url, t.token, t.ca) == ("https://flag:2", "from-file", ca_env)
    t = resolve_target(service=None, token_file=None, data_dir=str(data_dir), environ=env)
    assert (t.service_url, t.token) == ("https://env:1", "from-env")
    t = resolve_target(service=None, token_file=None, data_dir=str(data_dir), environ={})
    assert (t.service_url, t.token, t.ca) == (DEFAULT_SERVICE, "from-data-dir", data_dir / "ca.pem")
    with pytest.raises(ConfigError, match="no admin token"):
        resolve_target(service=None, token_file=None, data_dir=None, environ={})
    with pytest.raises(ConfigError, match="BACKHAUL_CA"):
        resolve_target(service=None, token_file=str(token_file), data_dir=None, environ={})
    with pytest.raises(ConfigError, match="https://"):
        resolve_target(service="http://plain:1", token_file=str(token_file), data_dir=str(data_dir), environ={})
    os.unlink(data_dir / "admin.token")
    with pytest.raises(ConfigError, match="missing"):
        resolve_target(service=None, token_file=None, data_dir=str(data_dir), environ={})
