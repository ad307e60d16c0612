"""Release signing keys: the publisher's Ed25519 key pair, and the keys pinned on a connector.

The private key stays on the publisher's machine (``backhaul release keygen``, then
``admin release publish --signing-key``); the relay only ever sees public keys. A connector
pins the public keys it accepts under ``STATE_DIR/release-keys/<key_id>.pem``.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from backhaul import pki
from backhaul.errors import ConfigError
from backhaul.files import read_bounded
from backhaul.release.manifest import key_id

__all__ = ["generate", "key_id", "load_pinned", "load_private", "load_public", "parse_public", "pin", "pinned_ids", "public_pem"]

#: Directory of a connector's state dir that holds the pinned release keys.
PINNED_DIR = "release-keys"
#: A connector pins a handful of keys (the current one, the next during a rotation); more
#: files than this in the directory is a mistake, and bounds what a load reads.
MAX_PINNED = 32
#: A PEM Ed25519 public key is 113 bytes; anything far larger is not one.
MAX_KEY_FILE = 4096


def generate(private: Path, public: Path) -> str:
    """Write a new key pair (private PKCS#8 PEM 0600, public SubjectPublicKeyInfo PEM); the key id.

    Refuses to overwrite either file: a signing key replaced by accident orphans every
    connector that pins the old one.
    """
    private, public = Path(private), Path(public)
    for path in (private, public):
        if path.exists():
            raise ConfigError(f"{path} already exists; refusing to overwrite it (move it away or choose another name)")
    key = Ed25519PrivateKey.generate()
    pki.write_private(
        private,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        exclusive=True,
    )
    try:
        pki.write_file(public, public_pem(key.public_key()), exclusive=True)
    except BaseException:
        private.unlink(missing_ok=True)
        raise
    return key_id(key.public_key())


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _read(path: Path, what: str) -> bytes:
    return read_bounded(path, MAX_KEY_FILE, what, "it is not a release key")


def load_private(path: Path) -> Ed25519PrivateKey:
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(_read(path, "release signing key"), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 key; make one with `backhaul release keygen`")
    return key


def parse_public(data: bytes, source: str) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{source} is not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{source} is not an Ed25519 public key; make one with `backhaul release keygen`")
    return key


def load_public(path: Path) -> Ed25519PublicKey:
    path = Path(path)
    return parse_public(_read(path, "release public key"), str(path))


def pin(state_dir: Path, key: Ed25519PublicKey) -> Path:
    """Write ``key`` as ``STATE_DIR/release-keys/<key_id>.pem`` (replacing the same key is harmless)."""
    directory = Path(state_dir) / PINNED_DIR
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / f"{key_id(key)}.pem"
    pki.write_file(path, public_pem(key))
    return path


def load_pinned(state_dir: Path) -> list[Ed25519PublicKey]:
    """The release keys pinned in a state dir (empty: nothing may be installed).

    A file whose name is not its key's id is refused rather than skipped: a pinned key is a
    trust decision, and a file that says one thing and holds another is tampering or a mistake.
    """
    directory = Path(state_dir) / PINNED_DIR
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(f"cannot read pinned release keys in {directory}: {exc.strerror}") from exc
    names = [n for n in names if n.endswith(".pem")]
    if len(names) > MAX_PINNED:
        raise ConfigError(f"{directory} holds {len(names)} keys, more than {MAX_PINNED}; remove the ones no longer used")
    keys = []
    for name in names:
        key = load_public(directory / name)
        if f"{key_id(key)}.pem" != name:
            raise ConfigError(f"{directory / name} holds key {key_id(key)}, not the one its name says; remove it and pin the key again")
        keys.append(key)
    return keys


def pinned_ids(state_dir: Path) -> list[str]:
    return [key_id(k) for k in load_pinned(state_dir)]
