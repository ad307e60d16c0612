"""The SQL stores' rollout: update leases with fencing tokens, group update settings, reports."""

from __future__ import annotations

import time
from typing import Any

from backhaul import maintenance
from backhaul.store.base import (
    HALTING_STEPS,
    LEASE_RELEASING_STEPS,
    GroupRollout,
    LeaseRefused,
    NotFound,
    ReportOutcome,
    UpdateFailure,
    UpdateLease,
    UpdateReport,
)
from backhaul.store.dbapi import Db
from backhaul.store.sql_nodes import LIVE_TUNNELS


class RolloutTables:
    """Rollout methods of SqlStore (a mixin: it uses the store's transactions, ``_write``/``_read``)."""

    _ROLLOUT_COLUMNS = (
        "g.name, COALESCE(r.allow_downtime, 0), r.update_window, COALESCE(r.paused, 0), "
        "r.halted, r.halted_connector, r.halted_version, r.halted_at"
    )

    def _rollout(self, db: Db, row: tuple, now: float, listed_failures: int) -> GroupRollout:
        name = row[0]
        lease = db.execute(
            "SELECT l.grp, l.connector_id, l.version, l.token, l.granted, l.expires FROM update_leases l "
            "JOIN connectors c ON c.id = l.connector_id AND c.grp = l.grp AND c.revoked = 0 "
            "WHERE l.grp = ? AND l.expires > ?",
            (name, now),
        ).fetchone()
        versions = dict(
            db.execute(
                "SELECT version, COUNT(*) FROM connectors WHERE grp = ? AND revoked = 0 GROUP BY version ORDER BY version",
                (name,),
            ).fetchall()
        )
        failed = "FROM update_failures f JOIN connectors c ON c.id = f.connector_id WHERE c.grp = ? AND c.revoked = 0"
        total = db.execute(f"SELECT COUNT(*) {failed}", (name,)).fetchone()[0]
        failures = tuple(
            UpdateFailure(*r)
            for r in db.execute(
                f"SELECT f.connector_id, c.name, f.version, f.step, f.reason, f.at {failed} ORDER BY f.at DESC, f.connector_id LIMIT ?",
                (name, listed_failures),
            )
        )
        return GroupRollout(
            group=name,
            allow_downtime=bool(row[1]),
            window=row[2],
            paused=bool(row[3]),
            halted=row[4],
            halted_connector=row[5],
            halted_version=row[6],
            halted_at=row[7],
            lease=UpdateLease(*lease) if lease else None,
            versions=versions,
            failures=failures,
            failures_total=total,
        )

    def group_rollout(self, name: str, listed_failures: int = 100) -> GroupRollout:
        now = self._clock()
        with self._read() as db:
            row = db.execute(
                f"SELECT {self._ROLLOUT_COLUMNS} FROM groups g LEFT JOIN group_rollout r ON r.grp = g.name WHERE g.name = ?",
                (name,),
            ).fetchone()
            if row is None:
                raise NotFound(f"there is no connector group {name!r}; see `backhaul admin group list`")
            return self._rollout(db, row, now, listed_failures)

    def list_rollouts(self, listed_failures: int = 100) -> list[GroupRollout]:
        now = self._clock()
        with self._read() as db:
            rows = db.execute(
                f"SELECT {self._ROLLOUT_COLUMNS} FROM groups g LEFT JOIN group_rollout r ON r.grp = g.name ORDER BY g.name"
            ).fetchall()
            return [self._rollout(db, row, now, listed_failures) for row in rows]

    def update_failure_counts(self) -> dict[tuple[str, str, str], int]:
        with self._read() as db:
            rows = db.execute(
                "SELECT c.grp, f.version, f.step, COUNT(*) FROM update_failures f "
                "JOIN connectors c ON c.id = f.connector_id WHERE c.revoked = 0 GROUP BY c.grp, f.version, f.step"
            ).fetchall()
        return {(grp, version, step): count for grp, version, step, count in rows}

    @staticmethod
    def _rollout_row(db: Db, name: str) -> None:
        db.execute("INSERT INTO group_rollout (grp) VALUES (?) ON CONFLICT (grp) DO NOTHING", (name,))

    def set_group_updates(self, name: str, changes: dict[str, Any]) -> GroupRollout:
        unknown = set(changes) - {"allow_downtime", "window"}
        if unknown:
            raise ValueError(f"unknown group update settings {sorted(unknown)}")
        if changes.get("window") is not None:
            # Stored canonical, so what is shown is what is evaluated.
            changes = {**changes, "window": maintenance.canonical(changes["window"])}
        with self._write() as db:
            self._require_group(db, name)
            self._rollout_row(db, name)
            if "allow_downtime" in changes:
                db.execute("UPDATE group_rollout SET allow_downtime = ? WHERE grp = ?", (int(bool(changes["allow_downtime"])), name))
            if "window" in changes:
                db.execute("UPDATE group_rollout SET update_window = ? WHERE grp = ?", (changes["window"], name))
        return self.group_rollout(name)

    def _groups(self, db: Db, name: str | None) -> list[str]:
        if name is None:
            return [r[0] for r in db.execute("SELECT name FROM groups ORDER BY name")]
        self._require_group(db, name)
        return [name]

    def pause_rollout(self, name: str | None) -> list[str]:
        with self._write() as db:
            changed = []
            for group in self._groups(db, name):
                self._rollout_row(db, group)
                if db.execute("UPDATE group_rollout SET paused = 1 WHERE grp = ? AND paused = 0", (group,)).rowcount:
                    changed.append(group)
            return changed

    def resume_rollout(self, name: str | None) -> list[str]:
        with self._write() as db:
            changed = []
            for group in self._groups(db, name):
                if db.execute(
                    "UPDATE group_rollout SET paused = 0, halted = NULL, halted_connector = NULL, halted_version = NULL, "
                    "halted_at = NULL WHERE grp = ? AND (paused != 0 OR halted IS NOT NULL)",
                    (group,),
                ).rowcount:
                    changed.append(group)
            return changed

    def _holder(self, db: Db, connector_id: str) -> str:
        """The group of a connector that may take part in a rollout (NotFound otherwise)."""
        row = db.execute("SELECT grp FROM connectors WHERE id = ? AND revoked = 0", (connector_id,)).fetchone()
        if row is None:
            raise NotFound(f"there is no connector {connector_id!r}; re-register it")
        return row[0]

    def acquire_update_lease(self, connector_id: str, version: str, seconds: float) -> UpdateLease:
        # One write transaction (BEGIN IMMEDIATE) from the first read to the grant: relay
        # workers in other processes asking at the same time queue behind it, so the check
        # "nobody else holds it" cannot go stale before the grant.
        now = self._clock()
        with self._write() as db:
            group = self._holder(db, connector_id)
            settings = db.execute(
                "SELECT allow_downtime, update_window, paused, halted, halted_connector, halted_version "
                "FROM group_rollout WHERE grp = ?",
                (group,),
            ).fetchone() or (0, None, 0, None, None, None)
            allow_downtime, window, paused, halted, halted_connector, halted_version = settings
            if paused:
                raise LeaseRefused(
                    f"the rollout of group {group!r} is paused; `backhaul admin rollout resume --group {group}` resumes it",
                    reason="paused",
                )
            if halted is not None:
                raise LeaseRefused(
                    f"the rollout of group {group!r} is halted: version {halted_version} failed on connector "
                    f"{halted_connector} ({halted}); fix the release, then `backhaul admin rollout resume --group {group}`",
                    reason="halted",
                )
            held = db.execute(
                "SELECT l.connector_id, l.version, l.expires FROM update_leases l "
                "JOIN connectors c ON c.id = l.connector_id AND c.grp = l.grp AND c.revoked = 0 "
                "WHERE l.grp = ? AND l.expires > ?",
                (group, now),
            ).fetchone()
            if held is not None and held[0] != connector_id:
                raise LeaseRefused(
                    f"connector {held[0]} of group {group!r} is updating to {held[1]} (its lease runs for "
                    f"{max(0, round(held[2] - now))} s more); one connector of a group updates at a time",
                    reason="busy",
                )
            if not allow_downtime:
                others = db.execute(
                    "SELECT COUNT(*) FROM connectors c WHERE c.grp = ? AND c.revoked = 0 AND c.id != ? "
                    # Only tunnels of up nodes: a dead node's rows must not let the last connector go.
                    f"AND EXISTS (SELECT 1 {LIVE_TUNNELS} AND t.connector_id = c.id)",
                    (group, connector_id, self._fresh_since()),
                ).fetchone()[0]
                if not others:
                    self._refuse_alone(group, window, now)
            token = db.execute("UPDATE update_fence SET token = token + 1 WHERE id = 1 RETURNING token").fetchone()[0]
            # Replaces an expired lease, a lease of a holder gone from the group, or this
            # connector's own older lease (whose token is stale from now on).
            db.execute(
                "INSERT INTO update_leases (grp, connector_id, version, token, granted, expires) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (grp) DO UPDATE SET connector_id = excluded.connector_id, version = excluded.version, "
                "token = excluded.token, granted = excluded.granted, expires = excluded.expires",
                (group, connector_id, version, token, now, now + seconds),
            )
        return UpdateLease(group, connector_id, version, token, now, now + seconds)

    @staticmethod
    def _refuse_alone(group: str, window: str | None, now: float) -> None:
        """No other connector of the group is active: refused unless inside the maintenance window."""
        if window is None:
            raise LeaseRefused(
                f"no other connector of group {group!r} is active, so updating this one would stop the group's apps; "
                f"start another connector, or allow it: `backhaul admin group update {group} --allow-downtime yes` "
                "or a maintenance window (`--window`)",
                reason="alone",
            )
        spec = maintenance.Window.parse(window)
        if spec.contains(now):
            return
        opens = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(spec.next_open(now)))
        raise LeaseRefused(
            f"no other connector of group {group!r} is active and its maintenance window ({window}, UTC) is closed; "
            f"it opens at {opens}",
            reason="outside_window",
        )

    def renew_update_lease(self, connector_id: str, token: int, seconds: float) -> UpdateLease:
        now = self._clock()
        with self._write() as db:
            self._holder(db, connector_id)
            row = db.execute(
                "UPDATE update_leases SET expires = ? WHERE connector_id = ? AND token = ? AND expires > ? "
                "AND grp = (SELECT grp FROM connectors WHERE id = ?) "
                "RETURNING grp, connector_id, version, token, granted, expires",
                (now + seconds, connector_id, token, now, connector_id),
            ).fetchone()
            if row is None:
                raise LeaseRefused(
                    f"lease {token} is not held any more (it expired, was granted again or was released); "
                    "stop the update and ask for a new lease",
                    reason="stale",
                )
        return UpdateLease(*row)

    def report_update(
        self, connector_id: str, version: str, step: str, reason: str, token: int | None, *, keep: int, keep_failures: int
    ) -> ReportOutcome:
        now = self._clock()
        with self._write() as db:
            group = self._holder(db, connector_id)
            db.execute(
                "INSERT INTO update_reports (connector_id, grp, version, step, reason, token, at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (connector_id, group, version, step, reason, token, now),
            )
            db.execute(
                "DELETE FROM update_reports WHERE connector_id = ? AND id NOT IN "
                "(SELECT id FROM update_reports WHERE connector_id = ? ORDER BY id DESC LIMIT ?)",
                (connector_id, connector_id, keep),
            )
            released = False
            if step in LEASE_RELEASING_STEPS and token is not None:
                # Only the current token releases: a report of a superseded holder leaves the newer lease alone.
                released = bool(
                    db.execute("DELETE FROM update_leases WHERE connector_id = ? AND token = ?", (connector_id, token)).rowcount
                )
            halted = False
            if step in HALTING_STEPS:
                db.execute(
                    "INSERT INTO update_failures (connector_id, version, step, reason, at) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (connector_id, version) DO UPDATE SET step = excluded.step, reason = excluded.reason, at = excluded.at",
                    (connector_id, version, step, reason, now),
                )
                db.execute(
                    "DELETE FROM update_failures WHERE connector_id = ? AND version NOT IN "
                    "(SELECT version FROM update_failures WHERE connector_id = ? ORDER BY at DESC, version DESC LIMIT ?)",
                    (connector_id, connector_id, keep_failures),
                )
                self._rollout_row(db, group)
                # The first failure is the one to read: later ones do not overwrite its reason.
                halted = bool(
                    db.execute(
                        "UPDATE group_rollout SET halted = ?, halted_connector = ?, halted_version = ?, halted_at = ? "
                        "WHERE grp = ? AND halted IS NULL",
                        (reason or step, connector_id, version, now, group),
                    ).rowcount
                )
        return ReportOutcome(group=group, released=released, halted=halted)

    def update_reports(self, connector_id: str) -> list[UpdateReport]:
        with self._read() as db:
            rows = db.execute(
                "SELECT connector_id, grp, version, step, reason, token, at FROM update_reports WHERE connector_id = ? ORDER BY id",
                (connector_id,),
            )
            return [UpdateReport(*row) for row in rows]

    def set_connector_version(self, connector_id: str, version: str) -> bool:
        with self._write() as db:
            return bool(
                db.execute(
                    "UPDATE connectors SET version = ? WHERE id = ? AND revoked = 0 AND version != ?",
                    (version, connector_id, version),
                ).rowcount
            )
