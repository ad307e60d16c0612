"""Signed release manifests: the round trip, and every refusal before anything is installed."""

from __future__ import annotations

import hashlib
import os
import stat
import tomllib
from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import backhaul
from backhaul.errors import ConfigError
from backhaul.release import keys, manifest as rm
from backhaul.release.manifest import FileEntry, Manifest, ReleaseRefused

pytestmark = pytest.mark.codec_independent

NOW = 1_800_000_000


@pytest.fixture(scope="module")
def key():
    return Ed25519PrivateKey.generate()


def make(key, *, version="1.2.0", issued=NOW - 60, expires=NOW + 86400, files=None) -> Manifest:
    files = files or (FileEntry("backhaul-1.2.0-py3-none-any.whl", "ab" * 32, 1234),)
    return Manifest(version=version, issued=issued, expires=expires, files=tuple(files), key_id=rm.key_id(key.public_key()))


def signed(key, m: Manifest) -> tuple[bytes, bytes]:
    return m.to_bytes(), rm.sign(m, key)


def refused(reason: str, fn, *args, **kwargs) -> ReleaseRefused:
    with pytest.raises(ReleaseRefused) as info:
        fn(*args, **kwargs)
    assert info.value.reason == reason, str(info.value)
    assert str(info.value)  # a message a person can read
    return info.value


def test_sign_verify_round_trip(key):
    m = make(key)
    data, sig = signed(key, m)
    assert len(sig) == 64
    got = rm.verify(data, sig, [key.public_key()], now=NOW, installed="1.1.0")
    assert got == m
    assert Manifest.from_bytes(data) == m
    # Canonical: sorted keys, the format marker, byte-identical on a second encoding.
    assert orjson.loads(data)["format"] == rm.FORMAT
    assert list(orjson.loads(data)) == sorted(orjson.loads(data))
    assert m.to_bytes() == data
    # No installed version (first install): accepted too.
    assert rm.verify(data, sig, [key.public_key()], now=NOW, installed=None) == m


def test_key_id_is_sha256_of_the_raw_key(key):
    from cryptography.hazmat.primitives import serialization

    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert rm.key_id(key.public_key()) == hashlib.sha256(raw).hexdigest()[:16]


def test_one_of_several_pinned_keys_suffices(key):
    data, sig = signed(key, make(key))
    others = [Ed25519PrivateKey.generate().public_key() for _ in range(3)]
    assert rm.verify(data, sig, [*others, key.public_key()], now=NOW, installed=None).version == "1.2.0"


def test_sign_refuses_a_key_other_than_the_named_one(key):
    with pytest.raises(ValueError):
        rm.sign(make(key), Ed25519PrivateKey.generate())


def test_unknown_key_id_is_refused(key):
    data, sig = signed(key, make(key))
    err = refused("unknown_key", rm.verify, data, sig, [Ed25519PrivateKey.generate().public_key()], now=NOW, installed=None)
    assert rm.key_id(key.public_key()) in str(err)
    refused("unknown_key", rm.verify, data, sig, [], now=NOW, installed=None)


def test_wrong_key_with_the_same_id_is_refused(key):
    # A manifest naming the pinned key's id but signed by another key: the id is not proof.
    other = Ed25519PrivateKey.generate()
    m = make(key)
    data = m.to_bytes()
    refused("bad_signature", rm.verify, data, other.sign(data), [key.public_key()], now=NOW, installed=None)


def test_every_tampered_manifest_byte_is_refused(key):
    data, sig = signed(key, make(key))
    for i in range(len(data)):
        tampered = bytearray(data)
        tampered[i] ^= 0x01
        with pytest.raises(ReleaseRefused) as info:
            rm.verify(bytes(tampered), sig, [key.public_key()], now=NOW, installed=None)
        assert info.value.reason in ("malformed", "bad_signature", "unknown_key"), (i, info.value)


def test_tampered_or_truncated_signature_is_refused(key):
    data, sig = signed(key, make(key))
    for i in (0, 31, 63):
        bad = bytearray(sig)
        bad[i] ^= 0x80
        refused("bad_signature", rm.verify, data, bytes(bad), [key.public_key()], now=NOW, installed=None)
    refused("bad_signature", rm.verify, data, sig[:63], [key.public_key()], now=NOW, installed=None)
    refused("bad_signature", rm.verify, data, sig + b"\0", [key.public_key()], now=NOW, installed=None)


def test_expired_is_refused(key):
    data, sig = signed(key, make(key, expires=NOW))
    refused("expired", rm.verify, data, sig, [key.public_key()], now=NOW, installed=None)
    refused("expired", rm.verify, data, sig, [key.public_key()], now=NOW + 10, installed=None)
    assert rm.verify(data, sig, [key.public_key()], now=NOW - 1, installed=None)


def test_issued_in_the_future_beyond_skew_is_refused(key):
    data, sig = signed(key, make(key, issued=NOW + 301))
    refused("not_yet_valid", rm.verify, data, sig, [key.public_key()], now=NOW, installed=None)
    data, sig = signed(key, make(key, issued=NOW + 300))
    assert rm.verify(data, sig, [key.public_key()], now=NOW, installed=None)


@pytest.mark.parametrize(
    "release,installed",
    [
        ("1.2.0", "1.2.0"),  # equal: a replay of what runs
        ("1.1.9", "1.2.0"),  # older
        ("1.2.0rc1", "1.2.0"),  # a pre-release of what runs is older
        ("1.2.0", "1.2.0.post1"),
        ("1.2.0a1", "1.2.0b1"),
        ("0.9.0", "1.0.0.dev3"),
    ],
)
def test_not_newer_is_refused(key, release, installed):
    data, sig = signed(key, make(key, version=release))
    refused("not_newer", rm.verify, data, sig, [key.public_key()], now=NOW, installed=installed)


@pytest.mark.parametrize("release,installed", [("1.2.0", "1.2.0rc1"), ("1.2.0.post1", "1.2.0"), ("1.10.0", "1.9.0"), ("2.0.0a1", "1.99")])
def test_newer_by_pep440_is_accepted(key, release, installed):
    data, sig = signed(key, make(key, version=release))
    assert rm.verify(data, sig, [key.public_key()], now=NOW, installed=installed).version == release


def _doc(key, **change):
    doc = orjson.loads(make(key).to_bytes())
    doc.update(change)
    return doc


@pytest.mark.parametrize(
    "change",
    [
        {"extra": 1},
        {"format": "backhaul-release/2"},
        {"version": 12},
        {"version": "not a version"},
        {"version": "01.2.0"},  # not normal form
        {"issued": "now"},
        {"issued": True},
        {"issued": 1.5},
        {"expires": NOW - 100},  # before issued
        {"key_id": "ABCDEF0123456789"},
        {"key_id": "abc"},
        {"files": []},
        {"files": "x"},
        {"files": [{"name": "backhaul-1.0-py3-none-any.whl", "sha256": "ab" * 32}]},
        {"files": [{"name": "backhaul-1.0-py3-none-any.whl", "sha256": "ab" * 32, "size": 1, "x": 1}]},
        {"files": [{"name": "backhaul-1.0-py3-none-any.whl", "sha256": "AB" * 32, "size": 1}]},
        {"files": [{"name": "backhaul-1.0-py3-none-any.whl", "sha256": "ab" * 31, "size": 1}]},
        {"files": [{"name": "backhaul-1.0-py3-none-any.whl", "sha256": "ab" * 32, "size": -1}]},
        {"files": [{"name": "backhaul-1.0-py3-none-any.whl", "sha256": "ab" * 32, "size": "1"}]},
        {"files": [{"name": "backhaul-1.0-py3-none-any.whl", "sha256": "ab" * 32, "size": 1}] * 2},
        {"files": [{"name": "backhaul-1.0-py3-none-any.whl", "sha256": "ab" * 32, "size": i} for i in range(rm.MAX_FILES + 1)]},
    ],
)
def test_malformed_shape_is_refused(key, change):
    doc = _doc(key, **change)
    refused("malformed", Manifest.from_bytes, orjson.dumps(doc))


def test_missing_fields_are_refused(key):
    for field in ("format", "version", "issued", "expires", "files", "key_id"):
        doc = _doc(key)
        del doc[field]
        err = refused("malformed", Manifest.from_bytes, orjson.dumps(doc))
        assert field in str(err)


@pytest.mark.parametrize("data", [b"", b"{", b"[]", b"null", b"\xff\xfe", b'"x"', b"{}"])
def test_not_a_manifest_is_refused(data):
    refused("malformed", Manifest.from_bytes, data)


@pytest.mark.parametrize(
    "name",
    [
        "../backhaul-1.0-py3-none-any.whl",
        "sub/backhaul-1.0-py3-none-any.whl",
        "sub\\backhaul-1.0-py3-none-any.whl",
        "/etc/backhaul-1.0-py3-none-any.whl",
        "..",
        ".backhaul-1.0-py3-none-any.whl",
        "backhaul-1.0..-py3-none-any.whl",
        "backhaul-1.0-py3-none-any.whl\n",
        "backhaul-1.0-py3-none-any.whl\0",
        "backhaul-1.0.tar.gz",
        "backhaul.whl",
        "backhaul-1.0-py3-none-any.zip",
        "",
        "x" * 300 + "-1.0-py3-none-any.whl",
        7,
    ],
)
def test_file_names_other_than_plain_wheel_names_are_refused(key, name):
    refused("malformed", rm.check_file_name, name)
    doc = _doc(key, files=[{"name": name, "sha256": "ab" * 32, "size": 1}])
    refused("malformed", Manifest.from_bytes, orjson.dumps(doc))


@pytest.mark.parametrize("name", ["backhaul-1.0-py3-none-any.whl", "orjson-3.10.7-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", "PyJWT-2.8.0-py3-none-any.whl"])
def test_plain_wheel_names_are_accepted(name):
    assert rm.check_file_name(name) == name


def test_check_file_size_then_hash(tmp_path: Path):
    body = os.urandom(3 * 1024 * 1024 + 17)  # several read chunks
    path = tmp_path / "backhaul-1.0-py3-none-any.whl"
    path.write_bytes(body)
    entry = FileEntry(path.name, hashlib.sha256(body).hexdigest(), len(body))
    rm.check_file(entry, path)
    refused("bad_size", rm.check_file, FileEntry(path.name, entry.sha256, len(body) - 1), path)
    refused("bad_size", rm.check_file, FileEntry(path.name, entry.sha256, len(body) + 1), path)
    refused("bad_hash", rm.check_file, FileEntry(path.name, "00" * 32, len(body)), path)
    tampered = bytearray(body)
    tampered[len(body) // 2] ^= 1
    path.write_bytes(bytes(tampered))
    refused("bad_hash", rm.check_file, entry, path)


def test_manifest_file_lookup(key):
    m = make(key)
    assert m.file("backhaul-1.2.0-py3-none-any.whl").size == 1234
    refused("malformed", m.file, "other-1.0-py3-none-any.whl")


# -- keys


def test_keygen_writes_a_pair_and_refuses_to_overwrite(tmp_path: Path):
    priv, pub = tmp_path / "release.key", tmp_path / "release.pub"
    kid = keys.generate(priv, pub)
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in priv.read_bytes() and b"BEGIN PUBLIC KEY" in pub.read_bytes()
    private, public = keys.load_private(priv), keys.load_public(pub)
    assert rm.key_id(public) == rm.key_id(private.public_key()) == kid
    before = priv.read_bytes()
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        keys.generate(priv, tmp_path / "other.pub")
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        keys.generate(tmp_path / "other.key", pub)
    assert priv.read_bytes() == before
    assert not (tmp_path / "other.key").exists() and not (tmp_path / "other.pub").exists()


def test_load_refuses_other_key_types(tmp_path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    eckey = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "ec.key").write_bytes(
        eckey.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (tmp_path / "ec.pub").write_bytes(
        eckey.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    (tmp_path / "junk").write_bytes(b"not pem")
    for fn, name in ((keys.load_private, "ec.key"), (keys.load_public, "ec.pub"), (keys.load_public, "junk"), (keys.load_private, "junk")):
        with pytest.raises(ConfigError):
            fn(tmp_path / name)
    with pytest.raises(ConfigError, match="missing"):
        keys.load_public(tmp_path / "absent")


def test_pinned_keys(tmp_path: Path):
    assert keys.load_pinned(tmp_path) == []
    a, b = Ed25519PrivateKey.generate().public_key(), Ed25519PrivateKey.generate().public_key()
    path = keys.pin(tmp_path, a)
    assert path.name == f"{rm.key_id(a)}.pem"
    keys.pin(tmp_path, b)
    keys.pin(tmp_path, a)  # pinning again is harmless
    assert sorted(keys.pinned_ids(tmp_path)) == sorted([rm.key_id(a), rm.key_id(b)])
    # A file whose name is not its key's id: refused, not skipped.
    os.replace(path, tmp_path / keys.PINNED_DIR / "0000000000000000.pem")
    with pytest.raises(ConfigError, match="not the one its name says"):
        keys.load_pinned(tmp_path)


# -- the version a connector reports


def test_version_is_the_installed_distributions():
    import importlib.metadata

    try:
        expected = importlib.metadata.version("backhaul")
    except importlib.metadata.PackageNotFoundError:
        expected = backhaul._SOURCE_VERSION
    assert backhaul.__version__ == expected


def test_version_falls_back_to_the_source(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert backhaul._installed_version() == backhaul._SOURCE_VERSION


def test_source_version_matches_pyproject():
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    assert tomllib.loads(pyproject.read_text())["project"]["version"] == backhaul._SOURCE_VERSION
