"""The connector's state dir: service URL, id, key, certificate and the service CA.

Layout: ``connector.json`` ({"service", "connector_id", "name"}), ``ca.pem``,
``cert.pem``, ``key.pem`` (0600), ``release-keys/<key_id>.pem`` (the public keys releases
must be signed with, ``register --release-key``). ``connector.json`` is written last at
registration, so its presence means the registration completed.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from pathlib import Path

import orjson
import yarl

from backhaul import pki
from backhaul.errors import CertificateError, ConfigError
from backhaul.release import keys

STATE_FILE = "connector.json"
#: Where the admin and session logs go unless `connector run --log-dir` says otherwise.
LOG_DIR = "logs"
#: Suffix of a renewed key/certificate written but not yet in place (see replace_credentials).
NEXT = ".next"


def parse_service_url(url: str) -> tuple[str, int]:
    """(host, port) of an https:// service URL; ConfigError if it is not one."""
    try:
        parsed = yarl.URL(url)
        port = parsed.port
    except ValueError as exc:
        raise ConfigError(f"service URL {url!r} is not a URL ({exc}); use https://HOST:PORT") from exc
    if parsed.scheme != "https" or not parsed.host:
        raise ConfigError(f"service URL {url!r} must be https://HOST:PORT")
    if parsed.path not in ("", "/") or parsed.query_string or parsed.user:
        raise ConfigError(f"service URL {url!r} must be just https://HOST:PORT, without a path, query or user")
    return parsed.host, port or 443


@dataclasses.dataclass(frozen=True)
class ConnectorState:
    """A loaded, checked state dir."""

    state_dir: Path
    service_url: str
    host: str
    port: int
    connector_id: str
    name: str
    ca_path: Path
    cert_path: Path
    key_path: Path
    cert_serial: int
    cert_not_before: datetime.datetime
    cert_not_after: datetime.datetime

    @classmethod
    def load(cls, state_dir: str | os.PathLike, *, now: datetime.datetime | None = None) -> "ConnectorState":
        """Load and check a state dir. ConfigError if it is missing or corrupt,
        CertificateError if the certificate has expired (re-register with a new token)."""
        state_dir = Path(state_dir)
        _finish_replacement(state_dir)
        state_file = state_dir / STATE_FILE
        try:
            info = orjson.loads(state_file.read_bytes())
        except FileNotFoundError:
            raise ConfigError(
                f"{state_file} is missing: this connector is not registered; run `backhaul connector register --state-dir {state_dir}`"
            ) from None
        except (OSError, orjson.JSONDecodeError) as exc:
            raise ConfigError(f"{state_file} is unreadable or corrupt ({exc}); register the connector again into a new state dir") from exc
        if not isinstance(info, dict) or not all(isinstance(info.get(k), str) for k in ("service", "connector_id", "name")):
            raise ConfigError(f"{state_file} lacks service, connector_id or name; register the connector again into a new state dir")
        if not pki.is_connector_id(info["connector_id"]):
            raise ConfigError(f"{state_file} holds a malformed connector id; register the connector again into a new state dir")
        host, port = parse_service_url(info["service"])
        paths = {name: state_dir / f"{name}.pem" for name in ("ca", "cert", "key")}
        ca = pki.load_cert_file(paths["ca"])
        cert = pki.load_cert_file(paths["cert"])
        key = pki.load_key_file(paths["key"])
        if not pki.same_public_key(key, cert):
            raise CertificateError(f"{paths['key']} does not belong to {paths['cert']}; re-register the connector with a new token")
        pki.verify_issued_by(cert, ca)
        if pki.connector_id_of(cert) != info["connector_id"]:
            raise CertificateError(f"{paths['cert']} is not the certificate of {info['connector_id']}; re-register the connector")
        now = now or datetime.datetime.now(datetime.timezone.utc)
        if cert.not_valid_after_utc <= now:
            raise CertificateError(
                f"the connector certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
                "re-register with a new token (`backhaul admin token create`)"
            )
        return cls(
            state_dir=state_dir,
            service_url=info["service"].rstrip("/"),
            host=host,
            port=port,
            connector_id=info["connector_id"],
            name=info["name"],
            ca_path=paths["ca"],
            cert_path=paths["cert"],
            key_path=paths["key"],
            cert_serial=cert.serial_number,
            cert_not_before=cert.not_valid_before_utc,
            cert_not_after=cert.not_valid_after_utc,
        )

    def renewal_due(self, now: datetime.datetime | None = None, fraction: float = 2 / 3) -> bool:
        """True once ``fraction`` of the certificate's lifetime has passed."""
        now = now or datetime.datetime.now(datetime.timezone.utc)
        # Lifetime counts from issue, not from notBefore: certificates are back-dated by
        # CLOCK_SKEW, which would make a short-lived one due the moment it arrives.
        issued = min(self.cert_not_before + pki.CLOCK_SKEW, self.cert_not_after)
        return now >= issued + (self.cert_not_after - issued) * fraction

    def seconds_left(self, now: datetime.datetime | None = None) -> float:
        now = now or datetime.datetime.now(datetime.timezone.utc)
        return (self.cert_not_after - now).total_seconds()


def write_state(state_dir: Path, *, service_url: str, connector_id: str, name: str, ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> None:
    """Write a new state dir; connector.json last, as the mark of a complete registration."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    pki.write_private(state_dir / "key.pem", key_pem)
    pki.write_file(state_dir / "cert.pem", cert_pem)
    pki.write_file(state_dir / "ca.pem", ca_pem)
    pki.write_file(
        state_dir / STATE_FILE,
        orjson.dumps({"service": service_url, "connector_id": connector_id, "name": name}, option=orjson.OPT_INDENT_2),
        exclusive=True,
    )


def replace_credentials(state_dir: Path, cert_pem: bytes, key_pem: bytes) -> None:
    """Put a renewed key and certificate in place, surviving a crash at any point.

    Both are first written under temporary names, then ``key.pem.next`` and finally
    ``cert.pem.next`` appear; the rename that creates ``cert.pem.next`` is the commit
    point. ``_finish_replacement`` (run by every load) completes a committed
    replacement and discards an uncommitted one.
    """
    pki.write_private(state_dir / f"key.pem{NEXT}", key_pem)
    pki.write_file(state_dir / f"cert.pem{NEXT}", cert_pem)
    _finish_replacement(state_dir)


def _finish_replacement(state_dir: Path) -> None:
    key_next, cert_next = state_dir / f"key.pem{NEXT}", state_dir / f"cert.pem{NEXT}"
    if cert_next.exists():
        if key_next.exists():
            os.replace(key_next, state_dir / "key.pem")
        os.replace(cert_next, state_dir / "cert.pem")
    elif key_next.exists():
        key_next.unlink()


def release_keys_summary(state_dir: Path) -> dict:
    """{"release_keys": [key ids pinned]} for `connector status`; with "release_keys_error" when
    the pinned keys cannot be read (the connector runs regardless; its updater installs nothing)."""
    try:
        return {"release_keys": keys.pinned_ids(Path(state_dir))}
    except ConfigError as exc:
        return {"release_keys": [], "release_keys_error": str(exc)}
