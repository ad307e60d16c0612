"""The service's own PKI: CA, service certificate, connector certificates from CSRs.

Keys are EC P-256. Private keys are written with mode 0600 from the moment the file
exists (``os.open`` with the mode, never a chmod afterwards), and files are replaced
atomically so a reader never sees half a key.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import ipaddress
import os
import re
import secrets
import socket
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from backhaul.errors import CertificateError, ConfigError

CA_VALIDITY = datetime.timedelta(days=3650)
SERVICE_VALIDITY = datetime.timedelta(days=825)
CONNECTOR_VALIDITY = datetime.timedelta(days=90)
#: Certificates are back-dated a little so a peer whose clock is slightly behind accepts them.
CLOCK_SKEW = datetime.timedelta(minutes=5)

CONNECTOR_URI_PREFIX = "urn:backhaul:connector:"
_CONNECTOR_ID = re.compile(r"^c-[a-z2-7]{12}$")
#: A relay node's certificate names its node id so: peers of a relay-to-relay link tell a
#: node from a connector (whose certificates carry CONNECTOR_URI_PREFIX) by it.
NODE_URI_PREFIX = "urn:backhaul:node:"
_NODE_ID = re.compile(r"^n-[a-z2-7]{12}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_DNS_NAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*\.?$")
#: Largest PEM document (certificate, CSR) accepted from a peer.
MAX_PEM = 16 * 1024

PrivateKey = ec.EllipticCurvePrivateKey


@dataclasses.dataclass(frozen=True)
class CertificateAuthority:
    """The service CA: its key signs connector certificates."""

    key: PrivateKey
    cert: x509.Certificate

    @property
    def cert_pem(self) -> bytes:
        return cert_to_pem(self.cert)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def generate_key() -> PrivateKey:
    """A fresh EC P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: PrivateKey) -> bytes:
    """PKCS#8 PEM of a private key, unencrypted (the file mode protects it)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def csr_to_pem(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.PEM)


def write_file(path: str | os.PathLike, data: bytes, *, mode: int = 0o644, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` atomically, the file having ``mode`` from its creation.

    The bytes go to a temporary file in the same directory (created with ``mode``),
    are flushed to disk, then renamed over ``path``. With ``exclusive`` an existing
    ``path`` is an error instead of being replaced.
    """
    path = Path(path)
    if exclusive and path.exists():
        raise ConfigError(f"{path} already exists; refusing to overwrite it")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            # link() fails if the target exists, so a racing writer cannot be clobbered.
            os.link(tmp, path)
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_private(path: str | os.PathLike, data: bytes, *, exclusive: bool = False) -> None:
    """Write secret material (keys, tokens) readable by the owner only (0600)."""
    write_file(path, data, mode=0o600, exclusive=exclusive)


def new_connector_id() -> str:
    """A new connector id: ``c-`` and 12 random lowercase base32 characters (60 bits)."""
    return "c-" + base64.b32encode(secrets.token_bytes(8)).decode("ascii")[:12].lower()


def is_connector_id(value: str) -> bool:
    return isinstance(value, str) and bool(_CONNECTOR_ID.match(value))


def new_node_id() -> str:
    """A new relay node id: ``n-`` and 12 random lowercase base32 characters (60 bits)."""
    return "n-" + base64.b32encode(secrets.token_bytes(8)).decode("ascii")[:12].lower()


def is_node_id(value: str) -> bool:
    return isinstance(value, str) and bool(_NODE_ID.match(value))


def default_service_names() -> list[str]:
    """Names a fresh service certificate covers when ``--name`` is not given."""
    names = ["localhost", "127.0.0.1", "::1"]
    host = socket.gethostname()
    if host and host not in names and _DNS_NAME.match(host):
        names.append(host)
    return names


def general_name(name: str) -> x509.GeneralName:
    """An IP address or DNS SAN entry for ``name``; ConfigError if it is neither."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        pass
    if not _DNS_NAME.match(name):
        raise ConfigError(f"{name!r} is neither an IP address nor a DNS name; pass a valid --name")
    return x509.DNSName(name.rstrip(".").lower())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_ids(builder: x509.CertificateBuilder, public_key, issuer: x509.Certificate | None) -> x509.CertificateBuilder:
    builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    if issuer is not None:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
    return builder


def make_ca(common_name: str = "backhaul service CA", validity: datetime.timedelta = CA_VALIDITY) -> CertificateAuthority:
    """A new self-signed CA that may sign certificates and CRLs, and nothing else."""
    key = generate_key()
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    builder = _key_ids(builder, key.public_key(), None)
    return CertificateAuthority(key=key, cert=builder.sign(key, hashes.SHA256()))


def _leaf_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def make_service_cert(
    ca: CertificateAuthority,
    names: list[str],
    validity: datetime.timedelta = SERVICE_VALIDITY,
    node_id: str | None = None,
) -> tuple[PrivateKey, x509.Certificate]:
    """A TLS server key and certificate for the relay, valid for every name in ``names``.

    With ``node_id`` it is a relay node's certificate: it also names the node (a URI SAN)
    and may authenticate the node as the client of a relay-to-relay link."""
    if not names:
        raise ConfigError("the service certificate needs at least one name; pass --name HOST")
    if node_id is not None and not is_node_id(node_id):
        raise ConfigError(f"{node_id!r} is not a relay node id (n- and 12 base32 characters)")
    sans = []
    for name in names:
        entry = general_name(name)
        if entry not in sans:
            sans.append(entry)
    usages = [ExtendedKeyUsageOID.SERVER_AUTH]
    if node_id is not None:
        sans.append(x509.UniformResourceIdentifier(NODE_URI_PREFIX + node_id))
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    key = generate_key()
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(min(now + validity, ca.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
    )
    builder = _key_ids(builder, key.public_key(), ca.cert)
    return key, builder.sign(ca.key, hashes.SHA256())


def make_csr(key: PrivateKey, name: str) -> x509.CertificateSigningRequest:
    """A CSR for ``key``; the CA ignores the subject and sets its own."""
    return x509.CertificateSigningRequestBuilder().subject_name(_name(name[:64] or "connector")).sign(key, hashes.SHA256())


def load_csr(pem: bytes | str) -> x509.CertificateSigningRequest:
    """Parse a CSR received from a peer and check it is signed by an acceptable key."""
    data = pem.encode() if isinstance(pem, str) else pem
    if len(data) > MAX_PEM:
        raise CertificateError(f"the CSR is larger than {MAX_PEM} bytes; send a single PEM CSR")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise CertificateError(f"the CSR is not a valid PEM certificate request ({exc}); send one made by make_csr") from exc
    if not csr.is_signature_valid:
        raise CertificateError("the CSR's signature does not verify; generate a new key and CSR")
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1"):
            raise CertificateError(f"curve {key.curve.name} is not accepted; use an EC P-256 key")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise CertificateError("RSA keys shorter than 2048 bits are not accepted; use an EC P-256 key")
    else:
        raise CertificateError("only EC P-256 (or RSA >= 2048) keys are accepted; use an EC P-256 key")
    return csr


def sign_csr(
    ca: CertificateAuthority,
    csr: x509.CertificateSigningRequest,
    connector_id: str,
    validity: datetime.timedelta = CONNECTOR_VALIDITY,
) -> x509.Certificate:
    """A client certificate for ``connector_id`` over the CSR's public key.

    The subject is set by the CA, never taken from the CSR: CN is the connector id,
    and a URI SAN ``urn:backhaul:connector:<id>`` names it too.
    """
    if not is_connector_id(connector_id):
        raise ValueError(f"not a connector id: {connector_id!r}")
    if not csr.is_signature_valid:
        raise CertificateError("the CSR's signature does not verify; generate a new key and CSR")
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(connector_id))
        .issuer_name(ca.cert.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(min(now + validity, ca.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(CONNECTOR_URI_PREFIX + connector_id)]),
            critical=False,
        )
    )
    builder = _key_ids(builder, csr.public_key(), ca.cert)
    return builder.sign(ca.key, hashes.SHA256())


def _one_uri_id(cert: x509.Certificate, prefix: str) -> str | None:
    """What follows ``prefix`` in the certificate's one URI SAN starting with it, or None
    (no SAN, none such, or more than one)."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = [u for u in sans.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith(prefix)]
    return uris[0][len(prefix) :] if len(uris) == 1 else None


def connector_id_of(cert: x509.Certificate) -> str | None:
    """The connector id a certificate names (URI SAN, which must agree with the CN), or None."""
    cid = _one_uri_id(cert, CONNECTOR_URI_PREFIX)
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cid is None or not is_connector_id(cid) or cns != [cid]:
        return None
    return cid


def node_id_of(cert: x509.Certificate) -> str | None:
    """The relay node id a certificate names (its one node URI SAN), or None."""
    node_id = _one_uri_id(cert, NODE_URI_PREFIX)
    return node_id if node_id is not None and is_node_id(node_id) else None


def verify_issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> None:
    """CertificateError unless ``cert`` was signed by ``ca_cert``."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CertificateError("the certificate was not issued by the service CA; re-register the connector") from exc


def same_public_key(key: PrivateKey, cert: x509.Certificate) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key.public_key().public_bytes(*fmt) == cert.public_key().public_bytes(*fmt)


def normalize_fingerprint(value: str) -> str:
    """A SHA-256 fingerprint as 64 lowercase hex digits; colons, spaces and case are accepted."""
    cleaned = value.replace(":", "").replace(" ", "").strip().lower()
    if not _HEX64.match(cleaned):
        raise ConfigError(
            "the CA fingerprint must be 64 hex digits (colons allowed); copy ca_sha256 from `backhaul service init`"
        )
    return cleaned


def fingerprint_sha256(cert_pem: bytes | str | x509.Certificate) -> str:
    """SHA-256 of a certificate's DER encoding, as lowercase hex without colons."""
    cert = cert_pem if isinstance(cert_pem, x509.Certificate) else load_cert(cert_pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def load_cert(pem: bytes | str) -> x509.Certificate:
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise CertificateError(f"not a valid PEM certificate ({exc})") from exc


def _read(path: str | os.PathLike, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} is missing") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc


def load_cert_file(path: str | os.PathLike) -> x509.Certificate:
    try:
        return load_cert(_read(path, "certificate"))
    except CertificateError as exc:
        raise CertificateError(f"{path}: {exc}") from exc


def load_key_file(path: str | os.PathLike) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(_read(path, "private key"), password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"{path} is not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{path} is not an EC private key")
    return key


def load_ca(data_dir: str | os.PathLike) -> CertificateAuthority:
    """The CA of a service data dir (ca.pem + ca.key)."""
    data_dir = Path(data_dir)
    ca = CertificateAuthority(key=load_key_file(data_dir / "ca.key"), cert=load_cert_file(data_dir / "ca.pem"))
    if not same_public_key(ca.key, ca.cert):
        raise CertificateError(f"{data_dir}/ca.key does not belong to ca.pem; restore both from the same backup")
    return ca
