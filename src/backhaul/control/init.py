"""`backhaul service init`: CA, service certificate, admin token and store in a new data dir.

With ``--store postgresql://...`` the service lives in PostgreSQL and is shared by several
relay nodes. The first node creates it: the CA, whose key is kept in the database only
sealed (AES-256-GCM) with a random 256-bit cluster key written to the node's data dir
(``cluster.key``, 0600), the admin token (its hash, and the token itself sealed so that
every node can write its admin.token file), and the schema. Run against a store that holds
a service already, init adds a node: with a copy of the cluster key (``--cluster-key-file``)
it unseals the CA key and makes the node's own certificate. The store URL (with any
password) is written to service.json only, then 0600.
"""

from __future__ import annotations

import argparse
import base64
import os
import stat
from pathlib import Path

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from backhaul import pki
from backhaul.control.web import new_admin_token, token_hash
from backhaul.errors import ConfigError
from backhaul.store import POSTGRES_SCHEMES, STORE_FILE, Conflict, Store, open_store

#: The cluster key of a service on PostgreSQL (base64 of 32 random bytes, one line).
CLUSTER_KEY_FILE = "cluster.key"
#: Files `service init` creates; any of them present means the dir is initialized.
DATA_FILES = ("ca.pem", "ca.key", "service.pem", "service.key", "admin.token", STORE_FILE, CLUSTER_KEY_FILE, "service.json")
#: What only the relay's user may read: keys, the admin token, the cluster key, service.json
#: (it may hold the store URL's password) and the store (token hashes, the inventory,
#: internal URLs, CA bundles) with SQLite's -wal/-shm files.
SECRET_FILES = (
    "ca.key", "service.key", "admin.token", CLUSTER_KEY_FILE, STORE_FILE, f"{STORE_FILE}-wal", f"{STORE_FILE}-shm",
)
#: What a sealed value is for, bound into its AES-GCM tag (a sealed CA key cannot pass as a token).
_CA_KEY_AAD = b"backhaul ca.key"
_ADMIN_TOKEN_AAD = b"backhaul admin.token"
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


def seal(key: bytes, data: bytes, purpose: bytes) -> str:
    """``data`` encrypted and authenticated with the cluster key (AES-256-GCM, random nonce), as base64."""
    nonce = os.urandom(12)
    return base64.b64encode(nonce + AESGCM(key).encrypt(nonce, data, purpose)).decode("ascii")


def unseal(key: bytes, sealed: str, purpose: bytes, key_file: Path) -> bytes:
    """What ``seal`` sealed; ConfigError when the key is not the one it was sealed with."""
    raw = base64.b64decode(sealed)
    try:
        return AESGCM(key).decrypt(raw[:12], raw[12:], purpose)
    except InvalidTag:
        raise ConfigError(
            f"the cluster key in {key_file} is not this service's (it does not open the CA key in the store); "
            f"copy {CLUSTER_KEY_FILE} from the data dir of a node of this service"
        ) from None


def read_cluster_key(path: Path) -> bytes:
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read --cluster-key-file {path}: {exc}") from exc
    try:
        key = base64.b64decode(text, validate=True)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ConfigError(f"--cluster-key-file {path} does not hold a cluster key; copy {CLUSTER_KEY_FILE} from a node's data dir")
    return key


def read_service(data_dir: Path) -> dict:
    """service.json of an initialized data dir."""
    try:
        return orjson.loads((data_dir / "service.json").read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {data_dir}/service.json ({exc}); run `backhaul service init --data-dir {data_dir}`") from exc


def _write_service(data_dir: Path, facts: dict, *, exclusive: bool) -> None:
    # 0600 when it holds a store URL (it may carry a password), as every secret file.
    mode = SECRET_MODE if facts.get("store") else 0o644
    pki.write_file(data_dir / "service.json", orjson.dumps(facts), mode=mode, exclusive=exclusive)


def ensure_node_id(data_dir: Path) -> str:
    """The relay node id of ``data_dir``. A data dir made before relay nodes had ids gets one
    now, written into its service.json (at its first `service run`; kept from then on)."""
    facts = read_service(data_dir)
    node_id = facts.get("node_id")
    if isinstance(node_id, str) and pki.is_node_id(node_id):
        return node_id
    if node_id is not None:
        raise ConfigError(f"{data_dir}/service.json has a malformed node_id {node_id!r}; restore the file from a backup")
    facts["node_id"] = node_id = pki.new_node_id()
    _write_service(data_dir, facts, exclusive=False)
    return node_id


def store_location(data_dir: Path) -> str | None:
    """The store URL service.json remembers (a service on PostgreSQL), or None: the data dir's SQLite."""
    store = read_service(data_dir).get("store")
    return store if isinstance(store, str) and store else None


def initialize(
    data_dir: Path, names: list[str], store_url: str | None = None, cluster_key_file: Path | None = None
) -> dict[str, str]:
    """Create everything a relay node needs in ``data_dir``; returns the facts to show.

    Without ``store_url`` the service is this one node's, in the data dir's SQLite store.
    With it, the first node creates the service in PostgreSQL and later ones join it
    (``cluster_key_file`` required)."""
    present = [f for f in DATA_FILES if (data_dir / f).exists()]
    if present:
        raise ConfigError(
            f"{data_dir} is already initialized (it has {', '.join(present)}); "
            "use another --data-dir, or delete this one to start over (its connectors must then re-register)"
        )
    if store_url is not None and not store_url.startswith(POSTGRES_SCHEMES):
        raise ConfigError("--store takes a PostgreSQL URL, postgresql://USER[:PASSWORD]@HOST[:PORT]/DBNAME")
    if cluster_key_file is not None and store_url is None:
        raise ConfigError("--cluster-key-file adds a node to a service on PostgreSQL; pass --store postgresql://... too")
    names = names or pki.default_service_names()
    for name in names:
        pki.general_name(name)
    cluster_key = read_cluster_key(cluster_key_file) if cluster_key_file is not None else None
    store = open_store(store_url) if store_url is not None else None
    try:
        _own_private_dir(data_dir)
        return _create(data_dir, names, store, store_url, cluster_key_file, cluster_key)
    finally:
        if store is not None:
            store.close()


def _create(
    data_dir: Path, names: list[str], store: Store | None, store_url: str | None,
    cluster_key_file: Path | None, cluster_key: bytes | None,
) -> dict[str, str]:
    node_id = pki.new_node_id()
    files: list[tuple[str, bytes, bool]] = []
    record = store.service_record() if store is not None else None
    if record is None:
        if cluster_key is not None:
            raise ConfigError(
                f"the store {store.where} holds no relay service yet, so there is nothing to join; "  # type: ignore[union-attr]
                "drop --cluster-key-file to create the service with this node"
            )
        ca = pki.make_ca()
        admin_token = new_admin_token()
    else:
        if cluster_key is None:
            raise ConfigError(
                f"the store {store.where} already holds a relay service (CA SHA-256 {record['ca_sha256']}); "  # type: ignore[union-attr]
                f"to add this node to it, pass --cluster-key-file FILE, a copy of {CLUSTER_KEY_FILE} "
                "from the data dir of one of its nodes"
            )
        key_file = cluster_key_file or Path()
        ca_key = serialization.load_pem_private_key(unseal(cluster_key, record["ca_key"], _CA_KEY_AAD, key_file), password=None)
        ca = pki.CertificateAuthority(key=ca_key, cert=pki.load_cert(record["ca_pem"]))  # type: ignore[arg-type]
        if ca.key.public_key().public_numbers() != ca.cert.public_key().public_numbers():
            raise ConfigError(f"the store {store.where} holds a CA key that does not belong to its CA certificate; restore it from a backup")  # type: ignore[union-attr]
        admin_token = unseal(cluster_key, record["admin_token"], _ADMIN_TOKEN_AAD, key_file).decode()
    service_key, service_cert = pki.make_service_cert(ca, names, node_id=node_id)
    files = [
        ("ca.key", pki.key_to_pem(ca.key), True),
        ("ca.pem", ca.cert_pem, False),
        ("service.key", pki.key_to_pem(service_key), True),
        ("service.pem", pki.cert_to_pem(service_cert), False),
        ("admin.token", admin_token.encode() + b"\n", True),
    ]
    ca_sha256 = pki.fingerprint_sha256(ca.cert)
    if store is not None:
        if cluster_key is None:
            cluster_key = os.urandom(32)  # 256 random bits
        files.append((CLUSTER_KEY_FILE, base64.b64encode(cluster_key) + b"\n", True))
    created: list[Path] = []
    try:
        for name, data, secret in files:
            path = data_dir / name
            pki.write_file(path, data, mode=SECRET_MODE if secret else 0o644, exclusive=True)
            created.append(path)
        if store is None:
            created.append(data_dir / STORE_FILE)
            _init_sqlite(data_dir, admin_token)
        elif record is None:
            # Recorded after this node's files are written, so a failed init leaves no service
            # behind that nobody holds the cluster key of.
            try:
                store.create_service(
                    {
                        "ca_pem": ca.cert_pem.decode(),
                        "ca_sha256": ca_sha256,
                        "ca_key": seal(cluster_key, pki.key_to_pem(ca.key), _CA_KEY_AAD),  # type: ignore[arg-type]
                        "admin_token": seal(cluster_key, admin_token.encode(), _ADMIN_TOKEN_AAD),  # type: ignore[arg-type]
                    }
                )
            except Conflict:
                raise ConfigError(
                    f"another node created a relay service in {store.where} meanwhile; "
                    "run init again with --cluster-key-file (a copy of that node's cluster.key)"
                ) from None
            store.set_admin_token_hash(token_hash(admin_token))
        facts = {"names": names, "ca_sha256": ca_sha256, "node_id": node_id}
        if store_url is not None:
            facts["store"] = store_url
        # service.json is written last: its presence means the init completed.
        _write_service(data_dir, facts, exclusive=True)
    except BaseException:
        for path in created:
            for leftover in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
                leftover.unlink(missing_ok=True)
        raise
    out = {"ca_sha256": ca_sha256, "admin_token_file": str(data_dir / "admin.token"), "node_id": node_id}
    if store is not None:
        out["store"] = store.where
        out["cluster_key_file"] = str(data_dir / CLUSTER_KEY_FILE)
        out["joined"] = record is not None
    return out


def _init_sqlite(data_dir: Path, admin_token: str) -> None:
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


def service_init(args: argparse.Namespace) -> int:
    """Handler of `backhaul service init`."""
    data_dir = Path(args.data_dir).absolute()
    key_file = Path(args.cluster_key_file) if getattr(args, "cluster_key_file", None) else None
    facts = initialize(data_dir, list(args.name), getattr(args, "store", None), key_file)
    if args.json:
        print(orjson.dumps(facts).decode())
        return 0
    if facts.get("joined"):
        print(f"Added relay node {facts['node_id']} in {data_dir} to the service in {facts['store']}.")
    else:
        print(f"Initialized the relay service in {data_dir}.")
    print(f"CA certificate SHA-256 (give it to connectors as --ca-sha256): {facts['ca_sha256']}")
    print(f"Admin token written to {facts['admin_token_file']} (readable by its owner only).")
    if "cluster_key_file" in facts:
        print(
            f"Cluster key written to {facts['cluster_key_file']} (readable by its owner only): add a node with "
            "`backhaul service init --data-dir DIR --store URL --cluster-key-file` and a copy of it."
        )
    return 0
