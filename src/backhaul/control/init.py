"""`backhaul service init`: CA, service certificate, admin token and store in a new data dir."""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path

import orjson

from backhaul import pki
from backhaul.control.web import new_admin_token, token_hash
from backhaul.errors import ConfigError
from backhaul.store import STORE_FILE, open_store

#: Files `service init` creates; any of them present means the dir is initialized.
DATA_FILES = ("ca.pem", "ca.key", "service.pem", "service.key", "admin.token", STORE_FILE, "service.json")
#: What only the relay's user may read: keys, the admin token, and the store (token
#: hashes, the inventory, internal URLs, CA bundles) with SQLite's -wal/-shm files.
SECRET_FILES = ("ca.key", "service.key", "admin.token", STORE_FILE, f"{STORE_FILE}-wal", f"{STORE_FILE}-shm")
DIR_MODE = 0o700
SECRET_MODE = 0o600


def loose_modes(data_dir: Path) -> list[Path]:
    """The data dir and the secret files in it that group or others may access."""
    loose = []
    # identity.key and session.key: the relay's own signing keys for --preauth oidc apps.
    for path in (data_dir, *(data_dir / name for name in (*SECRET_FILES, "identity.key", "session.key"))):
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            continue
        if stat.S_IMODE(mode) & 0o077:
            loose.append(path)
    return loose


def chmod_command(paths: list[Path]) -> str:
    """The shell command that makes ``paths`` private (dirs 0700, files 0600)."""
    dirs = [str(p) for p in paths if p.is_dir()]
    files = [str(p) for p in paths if not p.is_dir()]
    parts = ([f"chmod 700 {' '.join(dirs)}"] if dirs else []) + ([f"chmod 600 {' '.join(files)}"] if files else [])
    return " && ".join(parts)


def _own_private_dir(data_dir: Path) -> None:
    """Make ``data_dir`` (created or existing) 0700, or refuse when it is not ours to tighten."""
    if data_dir.exists() and not data_dir.is_dir():
        raise ConfigError(f"{data_dir} is not a directory; give --data-dir a directory (it is created if missing)")
    try:
        data_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        info = data_dir.stat()
    except OSError as exc:
        raise ConfigError(f"cannot create {data_dir}: {exc.strerror}") from exc
    if info.st_uid != os.geteuid():
        raise ConfigError(
            f"{data_dir} belongs to uid {info.st_uid}, not to this user (uid {os.geteuid()}): it cannot be made private; "
            "run init as the relay's user, or use a directory that user owns"
        )
    if stat.S_IMODE(info.st_mode) != DIR_MODE:
        try:
            data_dir.chmod(DIR_MODE)
        except OSError as exc:
            raise ConfigError(f"cannot make {data_dir} private (chmod 700): {exc.strerror}") from exc


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
    _own_private_dir(data_dir)
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
        # The store opens its files with umask 077; this also covers a filesystem that
        # ignored it. The -wal/-shm files may be gone after the close: only what exists.
        for name in (STORE_FILE, f"{STORE_FILE}-wal", f"{STORE_FILE}-shm"):
            path = data_dir / name
            if path.exists():
                path.chmod(SECRET_MODE)
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
