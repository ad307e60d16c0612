"""The SQL stores' releases: manifests, their files in 1 MiB BLOB chunks, uploads and revocation."""

from __future__ import annotations

import secrets

from backhaul.store.base import Conflict, LimitReached, NotFound, Release, ReleaseFile
from backhaul.store.dbapi import Db


class ReleaseTables:
    """Release methods of SqlStore (a mixin: it uses the store's transactions, ``_write``/``_read``)."""

    _RELEASE_COLUMNS = "version, manifest, signature, public_key, key_id, issued, expires, auto, state, created, revoked"

    @staticmethod
    def _release(db: Db, row: tuple) -> Release:
        files = tuple(
            ReleaseFile(name=name, sha256=sha256, size=size, complete=bool(complete))
            for name, sha256, size, complete in db.execute(
                "SELECT name, sha256, size, complete FROM release_files WHERE version = ? ORDER BY name", (row[0],)
            )
        )
        return Release(
            version=row[0], manifest=bytes(row[1]), signature=bytes(row[2]), public_key=row[3], key_id=row[4],
            issued=row[5], expires=row[6], auto=bool(row[7]), state=row[8], created=row[9], revoked=row[10], files=files,
        )

    def _get_release(self, db: Db, version: str) -> Release | None:
        row = db.execute(f"SELECT {self._RELEASE_COLUMNS} FROM releases WHERE version = ?", (version,)).fetchone()
        return self._release(db, row) if row else None

    def _require_release(self, db: Db, version: str) -> Release:
        release = self._get_release(db, version)
        if release is None:
            raise NotFound(f"there is no release {version!r}; see `backhaul admin release list`")
        return release

    def create_release(self, release: Release, *, max_stored: int, max_records: int) -> tuple[Release, bool]:
        with self._write() as db:
            existing = self._get_release(db, release.version)
            if existing is not None and existing.state == "incomplete":
                if existing.manifest == release.manifest and existing.signature == release.signature:
                    return existing, False
                # Never served: a new manifest of the same version (a publish run again) replaces it.
                db.execute("DELETE FROM releases WHERE version = ?", (release.version,))
            elif existing is not None:
                raise Conflict(
                    f"release {release.version} already exists ({existing.state}); a version is published once: "
                    "bump the version to publish other files"
                )
            stored = db.execute("SELECT COUNT(*) FROM releases WHERE state != 'revoked'").fetchone()[0]
            if stored >= max_stored:
                raise LimitReached(
                    f"there are already {max_stored} releases holding files; revoke old ones first (`backhaul admin release revoke VERSION`)"
                )
            if db.execute("SELECT COUNT(*) FROM releases").fetchone()[0] >= max_records:
                raise LimitReached(f"there are already {max_records} release records (revoked ones included)")
            db.execute(
                f"INSERT INTO releases ({self._RELEASE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'incomplete', ?, NULL)",
                (
                    release.version, release.manifest, release.signature, release.public_key, release.key_id,
                    release.issued, release.expires, int(release.auto), self._clock(),
                ),
            )
            db.executemany(
                "INSERT INTO release_files (version, name, sha256, size) VALUES (?, ?, ?, ?)",
                [(release.version, f.name, f.sha256, f.size) for f in release.files],
            )
            return self._require_release(db, release.version), True

    def list_releases(self) -> list[Release]:
        with self._read() as db:
            rows = db.execute(f"SELECT {self._RELEASE_COLUMNS} FROM releases ORDER BY created DESC, version").fetchall()
            return [self._release(db, row) for row in rows]

    def get_release(self, version: str) -> Release | None:
        with self._read() as db:
            return self._get_release(db, version)

    def revoke_release(self, version: str) -> Release:
        with self._write() as db:
            release = self._require_release(db, version)
            if release.state != "revoked":
                db.execute("UPDATE releases SET state = 'revoked', revoked = ? WHERE version = ?", (self._clock(), version))
                # The bytes go (the space is the point of max_stored); the record stays, so the
                # version is never served nor accepted again.
                db.execute("DELETE FROM release_chunks WHERE version = ?", (version,))
                db.execute("UPDATE release_files SET complete = 0, upload = NULL WHERE version = ?", (version,))
            return self._require_release(db, version)

    def _require_uploading(self, db: Db, version: str, name: str, upload: str | None = None) -> None:
        release = self._require_release(db, version)
        if release.state != "incomplete":
            raise Conflict(f"release {version} is {release.state}: its files can no longer be uploaded")
        row = db.execute("SELECT complete, upload FROM release_files WHERE version = ? AND name = ?", (version, name)).fetchone()
        if row is None:
            raise NotFound(f"release {version} has no file {name!r} (the manifest names its files)")
        if row[0]:
            raise Conflict(f"{name} of release {version} is already uploaded")
        if upload is not None and row[1] != upload:
            raise Conflict(f"another upload of {name} (release {version}) started since this one; it alone goes on")

    def begin_file_upload(self, version: str, name: str) -> str:
        upload = secrets.token_hex(8)
        with self._write() as db:
            self._require_uploading(db, version, name)
            db.execute("DELETE FROM release_chunks WHERE version = ? AND name = ?", (version, name))
            db.execute("UPDATE release_files SET upload = ? WHERE version = ? AND name = ?", (upload, version, name))
        return upload

    def put_file_chunk(self, version: str, name: str, upload: str, seq: int, data: bytes) -> None:
        with self._write() as db:
            self._require_uploading(db, version, name, upload)
            db.execute("INSERT INTO release_chunks (version, name, seq, data) VALUES (?, ?, ?, ?)", (version, name, seq, data))

    def finish_file_upload(self, version: str, name: str, upload: str) -> Release:
        with self._write() as db:
            self._require_uploading(db, version, name, upload)
            db.execute("UPDATE release_files SET complete = 1, upload = NULL WHERE version = ? AND name = ?", (version, name))
            if db.execute("SELECT 1 FROM release_files WHERE version = ? AND complete = 0", (version,)).fetchone() is None:
                db.execute("UPDATE releases SET state = 'published' WHERE version = ?", (version,))
            return self._require_release(db, version)

    def abort_file_upload(self, version: str, name: str, upload: str) -> None:
        with self._write() as db:
            if db.execute(
                "UPDATE release_files SET upload = NULL WHERE version = ? AND name = ? AND upload = ? AND complete = 0",
                (version, name, upload),
            ).rowcount:
                db.execute("DELETE FROM release_chunks WHERE version = ? AND name = ?", (version, name))

    def read_file_chunk(self, version: str, name: str, seq: int) -> bytes | None:
        with self._read() as db:
            row = db.execute(
                "SELECT c.data FROM release_chunks c JOIN releases r ON r.version = c.version "
                "JOIN release_files f ON f.version = c.version AND f.name = c.name "
                "WHERE c.version = ? AND c.name = ? AND c.seq = ? AND r.state = 'published' AND f.complete = 1",
                (version, name, seq),
            ).fetchone()
        return bytes(row[0]) if row else None
