"""`backhaul service init`: CA, service certificate, admin token and store in a new data dir."""

from __future__ import annotations

import argparse
from pathlib import Path

import orjson

from backhaul import pki
from backhaul.control.api import new_admin_token, token_hash
from backhaul.errors import ConfigError
from backhaul.store import STORE_FILE, open_store

#: Files `service init` creates; any of them present means the dir is initialized.
DATA_FILES = ("ca.pem", "ca.key", "service.pem", "service.key", "admin.token", STORE_FILE, "service.json")


def initialize(data_dir: Path, names: list[str]) -> dict[str, str]:
    """Create everything a relay needs in ``data_dir``; returns the facts to show."""
    present = [f for f in DATA_FILES if (data_dir / f).exists()]
    if present:
        raise ConfigError(
            f"{data_dir} is already initialized (it has {', '.join(present)}); "
            "use another --data-dir, or delete this one to start over (its connectors must then re-register)"
        )
    names = names or pki.default_service_names()
    for name in names:
        pki.general_name(name)
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {data_dir}: {exc.strerror}") from exc
    created: list[Path] = []
    try:
        ca = pki.make_ca()
        service_key, service_cert = pki.make_service_cert(ca, names)
        admin_token = new_admin_token()
        for name, data, secret in (
            ("ca.key", pki.key_to_pem(ca.key), True),
            ("ca.pem", ca.cert_pem, False),
            ("service.key", pki.key_to_pem(service_key), True),
            ("service.pem", pki.cert_to_pem(service_cert), False),
            ("admin.token", admin_token.encode() + b"\n", True),
        ):
            path = data_dir / name
            pki.write_file(path, data, mode=0o600 if secret else 0o644, exclusive=True)
            created.append(path)
        created.append(data_dir / STORE_FILE)
        store = open_store(data_dir / STORE_FILE)
        try:
            store.set_admin_token_hash(token_hash(admin_token))
        finally:
            store.close()
        ca_sha256 = pki.fingerprint_sha256(ca.cert)
        # service.json is written last: its presence means the init completed.
        pki.write_file(data_dir / "service.json", orjson.dumps({"names": names, "ca_sha256": ca_sha256}), exclusive=True)
    except BaseException:
        for path in created:
            for leftover in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
                leftover.unlink(missing_ok=True)
        raise
    return {"ca_sha256": ca_sha256, "admin_token_file": str(data_dir / "admin.token")}


def service_init(args: argparse.Namespace) -> int:
    """Handler of `backhaul service init`."""
    data_dir = Path(args.data_dir).absolute()
    facts = initialize(data_dir, list(args.name))
    if args.json:
        print(orjson.dumps(facts).decode())
    else:
        print(f"Initialized the relay service in {data_dir}.")
        print(f"CA certificate SHA-256 (give it to connectors as --ca-sha256): {facts['ca_sha256']}")
        print(f"Admin token written to {facts['admin_token_file']} (readable by its owner only).")
    return 0
