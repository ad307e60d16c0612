"""The release tables of the store (both backends): states, chunked files, upload ids, limits."""

from __future__ import annotations

import pytest

from backhaul.config import ReleaseLimits
from backhaul.store import Conflict, LimitReached, NotFound, Release, ReleaseFile, open_store

from .conftest import is_postgres

pytestmark = pytest.mark.codec_independent

FILES = (ReleaseFile("backhaul-1.0.0-py3-none-any.whl", "ab" * 32, 10), ReleaseFile("dep-1.0-py3-none-any.whl", "cd" * 32, 3))


def release(version: str, manifest: bytes = b"{}") -> Release:
    return Release(
        version=version, manifest=manifest, signature=b"s" * 64, public_key="PEM", key_id="0" * 16, issued=1, expires=2,
        auto=False, state="incomplete", created=0.0, files=FILES,
    )


def _chunks(store, name: str | None = None) -> int:
    """Chunk rows stored (of one file name, or all)."""
    with store._read() as db:
        if name is None:
            return db.execute("SELECT COUNT(*) FROM release_chunks").fetchone()[0]
        return db.execute("SELECT COUNT(*) FROM release_chunks WHERE name = ?", (name,)).fetchone()[0]


@pytest.fixture
def store(store_location):
    s = open_store(store_location if is_postgres(store_location) else store_location / "store.sqlite")
    yield s
    s.close()


def test_upload_chunks_publish_and_revoke(store):
    stored, created = store.create_release(release("1.0.0"), max_stored=8, max_records=100)
    assert created and stored.state == "incomplete" and stored.missing == [f.name for f in FILES]
    assert store.create_release(release("1.0.0"), max_stored=8, max_records=100)[1] is False  # resumed
    name = FILES[0].name
    stale = store.begin_file_upload("1.0.0", name)
    current = store.begin_file_upload("1.0.0", name)  # a second upload of the same file wins
    with pytest.raises(Conflict, match="another upload"):
        store.put_file_chunk("1.0.0", name, stale, 0, b"x")
    store.put_file_chunk("1.0.0", name, current, 0, b"01234")
    store.put_file_chunk("1.0.0", name, current, 1, b"56789")
    assert store.read_file_chunk("1.0.0", name, 0) is None  # not served before the release is published
    assert store.finish_file_upload("1.0.0", name, current).state == "incomplete"
    with pytest.raises(Conflict, match="already uploaded"):
        store.begin_file_upload("1.0.0", name)
    with pytest.raises(NotFound):
        store.begin_file_upload("1.0.0", "other-1.0-py3-none-any.whl")
    dep = store.begin_file_upload("1.0.0", FILES[1].name)
    store.put_file_chunk("1.0.0", FILES[1].name, dep, 0, b"abc")
    store.abort_file_upload("1.0.0", FILES[1].name, dep)  # a refused upload leaves nothing
    assert _chunks(store, FILES[1].name) == 0
    dep = store.begin_file_upload("1.0.0", FILES[1].name)
    store.put_file_chunk("1.0.0", FILES[1].name, dep, 0, b"abc")
    assert store.finish_file_upload("1.0.0", FILES[1].name, dep).state == "published"
    assert [store.read_file_chunk("1.0.0", name, i) for i in range(3)] == [b"01234", b"56789", None]
    with pytest.raises(Conflict):
        store.create_release(release("1.0.0", b"other"), max_stored=8, max_records=100)
    assert store.revoke_release("1.0.0").state == "revoked"
    assert store.read_file_chunk("1.0.0", name, 0) is None
    assert _chunks(store) == 0
    with pytest.raises(Conflict, match="revoked"):
        store.create_release(release("1.0.0"), max_stored=8, max_records=100)
    with pytest.raises(NotFound):
        store.revoke_release("9.9.9")


def test_an_incomplete_release_is_replaced_by_a_new_manifest(store):
    store.create_release(release("1.0.0", b"a"), max_stored=8, max_records=100)
    upload = store.begin_file_upload("1.0.0", FILES[0].name)
    store.put_file_chunk("1.0.0", FILES[0].name, upload, 0, b"x")
    stored, created = store.create_release(release("1.0.0", b"b"), max_stored=8, max_records=100)
    assert created and stored.manifest == b"b" and stored.missing == [f.name for f in FILES]
    assert _chunks(store) == 0


def test_limits_on_stored_releases_and_records(store):
    for i in range(2):
        store.create_release(release(f"1.{i}.0"), max_stored=2, max_records=3)
    with pytest.raises(LimitReached, match="revoke old ones"):
        store.create_release(release("1.2.0"), max_stored=2, max_records=3)
    store.revoke_release("1.0.0")
    store.create_release(release("1.2.0"), max_stored=2, max_records=3)
    store.revoke_release("1.2.0")
    with pytest.raises(LimitReached, match="release records"):
        store.create_release(release("1.3.0"), max_stored=2, max_records=3)
    assert sorted((r.version, r.state) for r in store.list_releases()) == [("1.0.0", "revoked"), ("1.1.0", "incomplete"), ("1.2.0", "revoked")]


def test_release_limits_must_be_positive():
    with pytest.raises(ValueError, match="chunk_size"):
        ReleaseLimits(chunk_size=0)
    assert ReleaseLimits().max_release_size >= ReleaseLimits().max_file_size
