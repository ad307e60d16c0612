"""The release manifest: what a publisher signs, and every check before anything is installed.

A release is the backhaul wheel plus the wheels it depends on. The manifest names each file
with its size and SHA-256, the version, when it was issued and when it expires, and the id of
the key that signed it. The signature (Ed25519, 64 bytes) covers the exact bytes of
``Manifest.to_bytes()``: canonical JSON with sorted keys, so signer and verifier never
disagree about what was signed. Whoever stores or serves a release (the relay) can withhold
it, but cannot make a connector install anything a pinned key has not signed, nor an older
or expired release (a replay).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from packaging.version import InvalidVersion, Version

FORMAT = "backhaul-release/1"

#: Seconds a manifest's ``issued`` may lie in the future of the verifier's clock: clocks of
#: publisher and connector hosts drift; more than this means a wrong clock or a forged time.
CLOCK_SKEW = 300.0

#: Ed25519 signatures are exactly this long.
SIGNATURE_SIZE = 64

#: Bounds on what a manifest may describe, so parsing a hostile one is cheap. A wheelhouse of
#: backhaul and its dependencies is about 15 files; names of real wheels stay far below 200.
MAX_FILES = 256
MAX_NAME = 255
MAX_VERSION = 64

#: A plain wheel file name: no directory part, no "..", nothing a path join could turn into
#: a different place. (``packaging.utils.parse_wheel_filename`` checks the structure.)
WHEEL_NAME_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_.+!-]*\.whl"
_WHEEL_NAME = re.compile(WHEEL_NAME_PATTERN)
#: Versions a release may have: PEP 440 public versions in normal form (what
#: ``str(packaging.version.Version(v))`` gives), without a local part: a release is public.
#: The control API documents the same pattern for ``?installed=`` and ``?version=``.
VERSION_PATTERN = (
    r"(?:[1-9][0-9]*!)?(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*"
    r"(?:(?:a|b|rc)(?:0|[1-9][0-9]*))?(?:\.post(?:0|[1-9][0-9]*))?(?:\.dev(?:0|[1-9][0-9]*))?"
)
_VERSION = re.compile(VERSION_PATTERN)
_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEY_ID = re.compile(r"[0-9a-f]{16}")

_FIELDS = {"format", "version", "issued", "expires", "files", "key_id"}
_FILE_FIELDS = {"name", "sha256", "size"}

#: Read size when hashing a file: large enough to be fast, small enough to never matter.
_CHUNK = 1 << 20


class ReleaseRefused(Exception):
    """A release (or one of its files) must not be installed or stored.

    ``reason`` is a short machine word (``bad_signature``, ``unknown_key``, ``expired``,
    ``not_yet_valid``, ``not_newer``, ``bad_hash``, ``bad_size``, ``malformed``,
    ``revoked``) for reports and metrics; the message says what is wrong in words.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class FileEntry:
    name: str
    sha256: str
    size: int


@dataclasses.dataclass(frozen=True)
class Manifest:
    version: str
    issued: int
    expires: int
    files: tuple[FileEntry, ...]
    key_id: str

    def to_bytes(self) -> bytes:
        """The canonical bytes that are signed and shipped (sorted keys, no whitespace)."""
        _check_shape(self)
        doc = {
            "format": FORMAT,
            "version": self.version,
            "issued": self.issued,
            "expires": self.expires,
            "key_id": self.key_id,
            "files": [{"name": f.name, "sha256": f.sha256, "size": f.size} for f in self.files],
        }
        return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)

    @classmethod
    def from_bytes(cls, data: bytes) -> "Manifest":
        """Parse and validate the shape; ``ReleaseRefused('malformed', ...)`` on anything wrong."""
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise ReleaseRefused("malformed", f"the release manifest is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ReleaseRefused("malformed", "the release manifest must be a JSON object")
        if set(doc) != _FIELDS:
            missing = sorted(_FIELDS - set(doc))
            extra = sorted(set(doc) - _FIELDS)
            raise ReleaseRefused("malformed", f"the release manifest has missing fields {missing} or unknown fields {extra}")
        if doc["format"] != FORMAT:
            raise ReleaseRefused("malformed", f"the release manifest format is {doc['format']!r}, not {FORMAT!r}")
        files = doc["files"]
        if not isinstance(files, list):
            raise ReleaseRefused("malformed", "the release manifest's files must be a list")
        entries = []
        for item in files:
            if not isinstance(item, dict) or set(item) != _FILE_FIELDS:
                raise ReleaseRefused("malformed", "each file of a release manifest has exactly name, sha256 and size")
            entries.append(FileEntry(name=item["name"], sha256=item["sha256"], size=item["size"]))
        manifest = cls(
            version=doc["version"], issued=doc["issued"], expires=doc["expires"],
            files=tuple(entries), key_id=doc["key_id"],
        )
        _check_shape(manifest)
        return manifest

    def file(self, name: str) -> FileEntry:
        """The entry named ``name``; ``ReleaseRefused('malformed')`` when the release has none."""
        for entry in self.files:
            if entry.name == name:
                return entry
        raise ReleaseRefused("malformed", f"release {self.version} has no file {name!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_file_name(name: object) -> str:
    """``name`` if it is a plain wheel file name; ``ReleaseRefused('malformed')`` otherwise.

    Names end up in paths (the relay's URLs, the updater's download directory), so anything
    with a separator, a leading dot, ".." or control characters is refused outright.
    """
    if not isinstance(name, str) or len(name) > MAX_NAME or not _WHEEL_NAME.fullmatch(name) or ".." in name:
        raise ReleaseRefused("malformed", f"release file name {name!r} is not a plain wheel file name (NAME-VERSION-TAGS.whl)")
    # Imported here: packaging.utils is only needed for names, and keeps import time small.
    from packaging.utils import InvalidWheelFilename, parse_wheel_filename

    try:
        parse_wheel_filename(name)
    except (InvalidWheelFilename, InvalidVersion) as exc:
        raise ReleaseRefused("malformed", f"release file name {name!r} is not a valid wheel file name: {exc}") from None
    return name


def parse_version(text: object) -> Version:
    """A PEP 440 version; ``ReleaseRefused('malformed')`` when ``text`` is not one."""
    if not isinstance(text, str) or not text or len(text) > MAX_VERSION:
        raise ReleaseRefused("malformed", f"release version {text!r} is not a version string")
    if not _VERSION.fullmatch(text):
        raise ReleaseRefused(
            "malformed", f"release version {text!r} is not a public PEP 440 version in normal form (e.g. 1.2.0, 1.3.0rc1)"
        )
    try:
        version = Version(text)
    except InvalidVersion:
        raise ReleaseRefused("malformed", f"release version {text!r} is not a PEP 440 version") from None
    if str(version) != text:
        # One spelling per version, so "1.0" and "1.0.0" cannot be two releases in a store.
        raise ReleaseRefused("malformed", f"release version {text!r} is not in normal form (write {str(version)!r})")
    return version


def _check_shape(m: Manifest) -> None:
    parse_version(m.version)
    if not _is_int(m.issued) or not _is_int(m.expires) or m.issued < 0:
        raise ReleaseRefused("malformed", "release issued and expires must be whole seconds since the epoch")
    if m.expires <= m.issued:
        raise ReleaseRefused("malformed", "release expires must be after issued")
    if not isinstance(m.key_id, str) or not _KEY_ID.fullmatch(m.key_id):
        raise ReleaseRefused("malformed", f"release key id {m.key_id!r} is not 16 hex digits")
    if not isinstance(m.files, tuple) or not m.files:
        raise ReleaseRefused("malformed", "a release has at least one file")
    if len(m.files) > MAX_FILES:
        raise ReleaseRefused("malformed", f"a release has at most {MAX_FILES} files, this one {len(m.files)}")
    seen = set()
    for entry in m.files:
        check_file_name(entry.name)
        if entry.name in seen:
            raise ReleaseRefused("malformed", f"release file {entry.name!r} is listed twice")
        seen.add(entry.name)
        if not isinstance(entry.sha256, str) or not _HEX64.fullmatch(entry.sha256):
            raise ReleaseRefused("malformed", f"release file {entry.name!r}: sha256 must be 64 lowercase hex digits")
        if not _is_int(entry.size) or entry.size < 0:
            raise ReleaseRefused("malformed", f"release file {entry.name!r}: size must be a whole number of bytes")


def key_id(public_key: Ed25519PublicKey) -> str:
    """The key's id: hex SHA-256 of the raw 32-byte public key, first 16 hex digits."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(manifest: Manifest, private_key: Ed25519PrivateKey) -> bytes:
    """The Ed25519 signature of ``manifest.to_bytes()``; the key must be the one ``key_id`` names."""
    if key_id(private_key.public_key()) != manifest.key_id:
        raise ValueError(f"the signing key's id is {key_id(private_key.public_key())}, the manifest names {manifest.key_id}")
    return private_key.sign(manifest.to_bytes())


def verify(
    manifest_bytes: bytes,
    signature: bytes,
    keys: Sequence[Ed25519PublicKey],
    *,
    now: float,
    installed: str | None,
) -> Manifest:
    """The manifest, if a key in ``keys`` signed exactly these bytes and it may be installed now.

    Checks, in order: the shape; a key whose id the manifest names is among ``keys``; the
    signature; ``issued <= now + CLOCK_SKEW`` and ``now < expires``; the version strictly
    newer than ``installed`` (PEP 440, so 1.0rc1 < 1.0 < 1.0.post1), when given.
    Raises ``ReleaseRefused`` with the reason otherwise.
    """
    manifest = Manifest.from_bytes(manifest_bytes)
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_SIZE:
        raise ReleaseRefused("bad_signature", f"a release signature is {SIGNATURE_SIZE} bytes (Ed25519)")
    by_id = {key_id(k): k for k in keys}
    key = by_id.get(manifest.key_id)
    if key is None:
        known = ", ".join(sorted(by_id)) or "none"
        raise ReleaseRefused(
            "unknown_key", f"release {manifest.version} is signed by key {manifest.key_id}, which is not pinned (pinned: {known})"
        )
    try:
        key.verify(signature, manifest_bytes)
    except InvalidSignature:
        raise ReleaseRefused("bad_signature", f"the signature of release {manifest.version} does not verify with key {manifest.key_id}") from None
    if manifest.issued > now + CLOCK_SKEW:
        raise ReleaseRefused(
            "not_yet_valid", f"release {manifest.version} is issued {manifest.issued - now:.0f} s in the future: check the clocks"
        )
    if now >= manifest.expires:
        raise ReleaseRefused("expired", f"release {manifest.version} expired {now - manifest.expires:.0f} s ago")
    if installed is not None:
        try:
            current = Version(installed)
        except InvalidVersion:
            raise ReleaseRefused("malformed", f"the installed version {installed!r} is not a PEP 440 version") from None
        if Version(manifest.version) <= current:
            raise ReleaseRefused("not_newer", f"release {manifest.version} is not newer than the installed {installed}")
    return manifest


def check_file(entry: FileEntry, path: Path) -> None:
    """Raise ``ReleaseRefused`` unless ``path`` has ``entry``'s size (checked first) and SHA-256."""
    size = path.stat().st_size
    if size != entry.size:
        raise ReleaseRefused("bad_size", f"{entry.name} is {size} bytes, the manifest says {entry.size}")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        # Bounded reads: never more than the manifest's size, even if the file grows meanwhile.
        remaining = entry.size
        while remaining > 0:
            chunk = f.read(min(_CHUNK, remaining))
            if not chunk:
                raise ReleaseRefused("bad_size", f"{entry.name} shrank while it was read")
            digest.update(chunk)
            remaining -= len(chunk)
        if f.read(1):
            raise ReleaseRefused("bad_size", f"{entry.name} grew while it was read")
    if digest.hexdigest() != entry.sha256:
        raise ReleaseRefused("bad_hash", f"{entry.name} has sha256 {digest.hexdigest()}, the manifest says {entry.sha256}")


#: The distribution a release is a version of (its other files are its dependencies).
PROJECT = "backhaul"


def check_project_wheel(manifest: Manifest) -> None:
    """Refuse a release without a backhaul wheel of its own version, or with one of another.

    A release's version is its backhaul wheel's: a manifest saying 1.3.0 around a 1.2.0
    wheel would install something other than what it announces.
    """
    from packaging.utils import canonicalize_name, parse_wheel_filename

    versions = set()
    for entry in manifest.files:
        name, version, _, _ = parse_wheel_filename(entry.name)
        if name == canonicalize_name(PROJECT):
            versions.add(str(version))
    if versions != {manifest.version}:
        found = ", ".join(sorted(versions)) or "none"
        raise ReleaseRefused(
            "malformed", f"release {manifest.version} must hold a {PROJECT} wheel of version {manifest.version} and no other (found: {found})"
        )
