"""The SQL stores' part of the admin center's sessions: the key that signs session cookies
and the sessions signed out before they expired, two rows of the meta table.

No table of sessions: a cookie carries its session signed (backhaul.center.sessions), so
any worker of any node checks it with the key read here, and only a sign-out is written.
"""

from __future__ import annotations

import secrets
from typing import Callable

import orjson

from backhaul.store.dbapi import Db

_KEY = "center_session_key"
_SIGNED_OUT = "center_signed_out"


class CenterTables:
    """Admin-center methods of SqlStore (a mixin: it uses the store's transactions)."""

    _clock: Callable[[], float]

    @staticmethod
    def _meta(db: Db, key: str) -> str | None:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    @staticmethod
    def _put_meta(db: Db, key: str, value: str) -> None:
        db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def center_state(self) -> tuple[str, dict[str, float]]:
        """The session key (hex; made on first use) and the signed-out sessions (id: expiry)."""
        with self._read() as db:  # type: ignore[attr-defined]
            key = self._meta(db, _KEY)
            signed_out = self._meta(db, _SIGNED_OUT)
        if key is None:
            with self._write() as db:  # type: ignore[attr-defined]
                key = self._meta(db, _KEY)
                if key is None:
                    key = secrets.token_hex(32)
                    self._put_meta(db, _KEY, key)
        return key, orjson.loads(signed_out) if signed_out else {}

    def center_sign_out(self, session_id: str, expires: float, most: int) -> bool:
        """Remember ``session_id`` as ended until ``expires``; at most ``most`` are kept, and
        when that many are live the key is replaced instead (every session ends). True then."""
        now = self._clock()
        with self._write() as db:  # type: ignore[attr-defined]
            raw = self._meta(db, _SIGNED_OUT)
            ended = {sid: at for sid, at in (orjson.loads(raw) if raw else {}).items() if at > now}
            rotated = len(ended) >= most
            if rotated:
                self._put_meta(db, _KEY, secrets.token_hex(32))
                ended = {}
            else:
                ended[session_id] = expires
            self._put_meta(db, _SIGNED_OUT, orjson.dumps(ended).decode())
        return rotated
