"""The service PKI: real keys and certificates, checked with cryptography and with ssl."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from backhaul import pki
from backhaul.errors import CertificateError, ConfigError

pytestmark = pytest.mark.codec_independent


@pytest.fixture(scope="module")
def ca():
    return pki.make_ca()


def test_ca_is_a_ten_year_p256_signing_ca(ca):
    cert = ca.cert
    assert isinstance(ca.key.curve, ec.SECP256R1)
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=3649) < lifetime < datetime.timedelta(days=3651)
    cert.verify_directly_issued_by(cert)


def test_service_cert_covers_each_name_for_server_auth(ca):
    key, cert = pki.make_service_cert(ca, ["relay.example.com", "10.1.2.3", "::1"])
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["relay.example.com"]
    assert set(sans.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("::1")}
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime <= datetime.timedelta(days=825, minutes=10)
    pki.verify_issued_by(cert, ca.cert)
    assert pki.same_public_key(key, cert)


def test_default_names_include_loopback():
    names = pki.default_service_names()
    assert names[:3] == ["localhost", "127.0.0.1", "::1"]


@pytest.mark.parametrize("bad", ["", "exa mple.com", "-bad-.com", "a" * 300, "http://x"])
def test_bad_service_name_is_refused(ca, bad):
    with pytest.raises(ConfigError):
        pki.make_service_cert(ca, [bad])


def test_connector_cert_from_csr_names_the_connector(ca):
    key = pki.generate_key()
    csr = pki.load_csr(pki.csr_to_pem(pki.make_csr(key, "CN=admin-trick")))
    cid = pki.new_connector_id()
    cert = pki.sign_csr(ca, csr, cid, datetime.timedelta(days=7))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == cid
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [f"urn:backhaul:connector:{cid}"]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=7) <= lifetime <= datetime.timedelta(days=7, minutes=10)
    assert pki.connector_id_of(cert) == cid
    assert pki.same_public_key(key, cert)
    other = pki.sign_csr(ca, csr, cid)
    assert other.serial_number != cert.serial_number


def test_connector_ids_are_random_and_well_formed():
    ids = {pki.new_connector_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(pki.is_connector_id(i) for i in ids)
    assert not pki.is_connector_id("c-UPPERCASE000")
    assert not pki.is_connector_id("c-short")


def test_service_cert_is_not_a_connector(ca):
    _, cert = pki.make_service_cert(ca, ["localhost"])
    assert pki.connector_id_of(cert) is None


def test_csr_garbage_and_weak_keys_are_refused():
    with pytest.raises(CertificateError):
        pki.load_csr(b"not a csr")
    with pytest.raises(CertificateError):
        pki.load_csr(b"x" * (pki.MAX_PEM + 1))
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    from cryptography.hazmat.primitives import hashes

    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(weak, hashes.SHA256())
    with pytest.raises(CertificateError, match="2048"):
        pki.load_csr(pki.csr_to_pem(csr))


def test_fingerprint_is_sha256_of_der_and_pins_accept_colons(ca):
    fp = pki.fingerprint_sha256(ca.cert_pem)
    assert len(fp) == 64 and fp == fp.lower()
    from cryptography.hazmat.primitives import hashes

    assert fp == ca.cert.fingerprint(hashes.SHA256()).hex()
    spaced = ":".join(fp[i : i + 2] for i in range(0, 64, 2)).upper()
    assert pki.normalize_fingerprint(spaced) == fp
    for bad in ("", "abc", "g" * 64, fp + "00"):
        with pytest.raises(ConfigError):
            pki.normalize_fingerprint(bad)


def test_private_files_are_0600_from_creation(tmp_path):
    old = os.umask(0)
    try:
        pki.write_private(tmp_path / "k.pem", pki.key_to_pem(pki.generate_key()))
        pki.write_file(tmp_path / "c.pem", b"public")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "c.pem").stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pem", "k.pem"]


def test_exclusive_write_refuses_to_overwrite(tmp_path):
    pki.write_private(tmp_path / "k", b"one", exclusive=True)
    with pytest.raises(ConfigError, match="already exists"):
        pki.write_private(tmp_path / "k", b"two", exclusive=True)
    assert (tmp_path / "k").read_bytes() == b"one"


def test_load_ca_round_trip_and_mismatch(tmp_path, ca):
    pki.write_private(tmp_path / "ca.key", pki.key_to_pem(ca.key))
    pki.write_file(tmp_path / "ca.pem", ca.cert_pem)
    loaded = pki.load_ca(tmp_path)
    assert loaded.cert == ca.cert
    pki.write_private(tmp_path / "ca.key", pki.key_to_pem(pki.generate_key()))
    with pytest.raises(CertificateError, match="does not belong"):
        pki.load_ca(tmp_path)
    (tmp_path / "ca.pem").unlink()
    with pytest.raises(ConfigError, match="missing"):
        pki.load_ca(tmp_path)


def test_openssl_accepts_the_chain(tmp_path, ca):
    """The stdlib ssl module (OpenSSL) loads what we produce."""
    key, cert = pki.make_service_cert(ca, ["localhost"])
    pki.write_private(tmp_path / "s.key", pki.key_to_pem(key))
    pki.write_file(tmp_path / "s.pem", pki.cert_to_pem(cert))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "s.pem", tmp_path / "s.key")
    ctx.load_verify_locations(cadata=ca.cert_pem.decode())
