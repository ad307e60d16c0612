"""The store interface, its records and its errors. No backend code here."""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

from backhaul.config import REFRESH_INTERVAL, ClusterSettings
from backhaul.errors import BackhaulError

DEFAULT_GROUP = "default"


class StoreError(BackhaulError):
    """A store operation was refused; the message says why and what to do."""


class NotFound(StoreError):
    """The named group, app, connector or token does not exist."""


class Conflict(StoreError):
    """The change clashes with existing records (duplicate, in use, non-empty group)."""


class LimitReached(StoreError):
    """A table is at its configured size limit."""


class InvalidToken(StoreError):
    """An enrollment token is unknown (never issued, revoked or used up) or expired.

    The message is the same for every case (the caller must not learn which); ``reason``
    ("unknown" or "expired") and ``token_id`` (when the token exists) are for the relay's log.
    """

    def __init__(self, message: str, *, reason: str = "unknown", token_id: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.token_id = token_id


class Unavailable(StoreError):
    """The backend could not be reached or stayed busy too long; retrying may work."""


@dataclasses.dataclass(frozen=True)
class StoreLimits:
    """Upper bounds on every table, so nothing grows without bound."""

    max_groups: int = 1000
    max_apps: int = 10000
    max_connectors: int = 10000
    #: Live (unexpired, not used up) enrollment tokens; dead ones are purged on creation.
    max_tokens: int = 10000
    #: Seconds a writer waits for another process's transaction before giving up.
    busy_timeout: float = 10.0
    #: PostgreSQL connections one process keeps (its pool's size): store calls run on a few
    #: executor threads, and every node's every worker shares the server's max_connections
    #: (100 by default), so a handful each. Unused by SQLite (one connection per process).
    pool_size: int = 4
    #: Seconds a PostgreSQL store call waits for a pooled connection once the pool could not
    #: give one within busy_timeout (the server is away), until a call succeeds again: a
    #: caller on the relay's event loop (a connector redialing) then costs it half a second,
    #: not ten, and the worker falls back on what it knows.
    unreachable_wait: float = 0.5


@dataclasses.dataclass(frozen=True)
class Group:
    name: str
    created: float
    apps: int = 0
    connectors: int = 0


@dataclasses.dataclass(frozen=True)
class Token:
    """An enrollment token as listed: never its secret nor the secret's hash."""

    id: str
    group: str
    uses_left: int
    expires: float
    created: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class App:
    """A published application. tcp/udp apps have ``port`` and ``target`` (host:port);
    http apps have ``external_host``, ``internal_url`` and ``preauth``, and options:
    ``keep_host`` (the backend gets the external Host), ``backend_ca`` (PEM CA bundle the
    connector verifies an https backend with), ``backend_insecure`` (no verification) and
    ``health_path`` (what connectors GET to check the origin; else they TCP-connect)."""

    name: str
    group: str
    proto: str
    port: int | None = None
    target: str | None = None
    external_host: str | None = None
    internal_url: str | None = None
    preauth: str | None = None
    keep_host: bool = False
    backend_ca: str | None = None
    backend_insecure: bool = False
    health_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ConnectorStats:
    """What a connector reports in a heartbeat."""

    version: str = ""
    cpu: float = 0.0
    memory: float = 0.0
    streams: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


@dataclasses.dataclass(frozen=True)
class OriginReport:
    """What one active connector of an app's group last said about reaching the app."""

    connector_id: str
    connector: str
    #: None: the connector has not reported on this app (not checked yet, a udp app, an older connector)
    reachable: bool | None
    #: when the connector first reported the current state
    since: float | None


@dataclasses.dataclass(frozen=True)
class Connector:
    id: str
    name: str
    hostname: str
    version: str
    group: str
    created: float
    last_seen: float
    source_addr: str
    cert_serial: int
    cert_expires: float
    revoked: bool = False
    #: The serial of the certificate replaced by the last renewal: still accepted until
    #: ``previous_expires``, so a renewal whose answer was lost does not lock the connector
    #: out. That is the old certificate's own expiry until the connector first uses the new
    #: one; from then on a short grace (see ``retire_previous_cert``).
    previous_serial: int | None = None
    previous_expires: float | None = None
    tunnels: int = 0
    active_streams: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    cpu: float = 0.0
    memory: float = 0.0
    #: When it became inactive: when its last tunnel went away, or its enrollment if it never
    #: had one; None while a relay node that is up counts a tunnel of it.
    inactive_since: float | None = None
    #: True when ``inactive_since`` is the loss of its last tunnel (the grace of ``status_at``
    #: applies), False when it never had a tunnel since its enrollment.
    tunnel_lost: bool = False

    @property
    def status(self) -> str:
        """"active" while it has a tunnel (no grace: see ``status_at``)."""
        return "active" if self.tunnels > 0 else "inactive"

    def status_at(self, now: float, grace: float) -> str:
        """"active" while it has a tunnel or its last one went away less than ``grace`` seconds
        before ``now`` (a connector redialing after a drop is not a status flap), else "inactive"."""
        if self.tunnels > 0:
            return "active"
        if self.tunnel_lost and self.inactive_since is not None and now - self.inactive_since < grace:
            return "active"
        return "inactive"

    def removal_at(self, now: float, grace: float, remove_after: float) -> float | None:
        """When housekeeping may remove it (``Store.prune``: unseen, no heartbeat and no tunnel,
        for ``remove_after``); None while it is active."""
        if self.status_at(now, grace) == "active":
            return None
        return self.last_seen + remove_after

    def accepts_serial(self, serial: int | None, now: float) -> bool:
        """True when a certificate with ``serial`` may act as this connector right now."""
        if self.revoked or serial is None:
            return False
        if serial == self.cert_serial:
            return True
        return serial == self.previous_serial and self.previous_expires is not None and now < self.previous_expires

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["cert_serial"] = format(self.cert_serial, "x")
        data["previous_serial"] = format(self.previous_serial, "x") if self.previous_serial is not None else None
        data["status"] = self.status
        data.pop("tunnel_lost")
        return data

    def lifecycle_dict(self, now: float, grace: float, remove_after: float) -> dict[str, Any]:
        """``to_dict`` as the admin API lists it at ``now``: the status with the grace,
        ``inactive_since`` (None while active) and ``removal_at``."""
        data = self.to_dict()
        status = self.status_at(now, grace)
        data["status"] = status
        data["inactive_since"] = None if status == "active" else self.inactive_since
        data["removal_at"] = self.removal_at(now, grace, remove_after)
        return data


# -- relay nodes


#: A node's ``state`` in the store: serving (while its heartbeat is fresh), or stopped cleanly.
NODE_STATES = ("running", "stopped")


@dataclasses.dataclass(frozen=True)
class Node:
    """One relay node of the service as the store knows it (``admin node list``)."""

    id: str
    #: HOST:PORT connectors dial (the node's listen port as reachable from the private networks)
    listen: str
    #: HOST:PORT other nodes dial for relay-to-relay links (often the same)
    peer: str
    version: str
    started: float
    #: the node's last heartbeat (seconds since the epoch)
    last_seen: float
    #: "running" or "stopped" (a clean stop); a node that died stays "running" but goes stale
    state: str = "running"
    #: usable connector tunnels it holds (0 once it is down: its rows no longer count)
    tunnels: int = 0
    #: True when its heartbeat is fresh (ClusterSettings.node_fresh) and it has not stopped
    fresh: bool = False

    @property
    def status(self) -> str:
        return "up" if self.fresh and self.state == "running" else "down"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("fresh")
        data["status"] = self.status
        return data


# -- releases


#: States of a stored release: files still being uploaded, served to connectors, withdrawn.
RELEASE_STATES = ("incomplete", "published", "revoked")


@dataclasses.dataclass(frozen=True)
class ReleaseFile:
    """One file of a stored release, as the signed manifest describes it."""

    name: str
    sha256: str
    size: int
    #: All its bytes are stored and matched the manifest's size and SHA-256.
    complete: bool = False


@dataclasses.dataclass(frozen=True)
class Release:
    """A signed release as stored: the manifest and signature exactly as signed, the
    publisher's public key sent with them, and what the relay decides (``auto``, ``state``)."""

    version: str
    manifest: bytes
    signature: bytes
    public_key: str
    key_id: str
    issued: int
    expires: int
    auto: bool
    state: str
    created: float
    files: tuple[ReleaseFile, ...] = ()
    revoked: float | None = None

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def missing(self) -> list[str]:
        """Names of the files not uploaded yet."""
        return [f.name for f in self.files if not f.complete]

    def to_dict(self) -> dict[str, Any]:
        """The release as listed (without the manifest and signature bytes)."""
        return {
            "version": self.version,
            "state": self.state,
            "auto": self.auto,
            "key_id": self.key_id,
            "issued": self.issued,
            "expires": self.expires,
            "created": self.created,
            "revoked": self.revoked,
            "size": self.size,
            "files": [dataclasses.asdict(f) for f in self.files],
            "missing": self.missing,
        }



# -- rollout

#: The steps an updater reports, in the order of one update (docs/architecture.md, "Rollout").
UPDATE_STEPS = ("downloaded", "installed", "switched", "healthy", "refused", "failed", "rolled_back")
#: Steps after which the updater is done with a version: with the current token, they give the lease back.
LEASE_RELEASING_STEPS = frozenset({"healthy", "refused", "failed", "rolled_back"})
#: Steps that halt the group's rollout and mark the version failed for the connector.
HALTING_STEPS = frozenset({"failed", "rolled_back"})


class LeaseRefused(Conflict):
    """An update lease was not granted or renewed. ``reason``: busy, paused, halted, alone,
    outside_window (a lease) or stale (a renewal); the message says why in words."""

    REASONS = ("busy", "paused", "halted", "alone", "outside_window", "stale")

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class UpdateLease:
    """The right of one connector of ``group`` to update now. ``token`` is a fencing token:
    every grant takes a larger one, so a holder that lost its lease (expired, or granted
    again) is told apart from the current one."""

    group: str
    connector_id: str
    version: str
    token: int
    granted: float
    expires: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class UpdateReport:
    """One step of an update, as a connector reported it."""

    connector_id: str
    group: str
    version: str
    step: str
    reason: str
    token: int | None
    at: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ReportOutcome:
    """What a report changed: whether it gave the lease back and whether it halted the group."""

    group: str
    released: bool
    halted: bool


@dataclasses.dataclass(frozen=True)
class UpdateFailure:
    """A version that failed or was rolled back on a connector."""

    connector_id: str
    connector: str
    version: str
    step: str
    reason: str
    at: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class GroupRollout:
    """A group's update settings and the state of its rollout.

    ``window`` is a canonical maintenance window spec (backhaul.maintenance) or None;
    ``halted`` the reason of the failure that stopped the rollout (None: not halted);
    ``lease`` the unexpired lease, if any; ``versions`` how many connectors (not revoked)
    run which version; ``failures`` the newest failures in the group, ``failures_total`` all.
    """

    group: str
    allow_downtime: bool = False
    window: str | None = None
    paused: bool = False
    halted: str | None = None
    halted_connector: str | None = None
    halted_version: str | None = None
    halted_at: float | None = None
    lease: UpdateLease | None = None
    versions: dict[str, int] = dataclasses.field(default_factory=dict)
    failures: tuple[UpdateFailure, ...] = ()
    failures_total: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "allow_downtime": self.allow_downtime,
            "window": self.window,
            "paused": self.paused,
            "halted": self.halted,
            "halted_connector": self.halted_connector,
            "halted_version": self.halted_version,
            "halted_at": self.halted_at,
            "lease": self.lease.to_dict() if self.lease is not None else None,
            "versions": dict(self.versions),
            "failures": [f.to_dict() for f in self.failures],
            "failures_total": self.failures_total,
        }


class Store(abc.ABC):
    """Everything the control plane and the relay keep. Every method is short and blocking.

    Every change that affects routing or a connector's configuration (apps, groups,
    a connector's group, revocation) bumps ``config_version`` in the same transaction, and
    writes a change-log row (on PostgreSQL also a NOTIFY on ``backhaul_config``).
    A connector's ``tunnels`` count only the rows of up nodes (fresh heartbeat, running).
    """

    #: node freshness and the bounds of the nodes and change-log tables (given at open_store)
    cluster: ClusterSettings

    # -- lifecycle and meta
    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def config_version(self) -> int: ...

    @abc.abstractmethod
    def set_admin_token_hash(self, token_hash: str) -> None: ...

    @abc.abstractmethod
    def admin_token_hash(self) -> str | None: ...

    # -- the admin center's sessions (store/sql_center.py)

    @abc.abstractmethod
    def center_state(self) -> tuple[str, dict[str, float]]:
        """The admin center's session key (hex) and the sessions signed out (id: expiry)."""

    @abc.abstractmethod
    def center_sign_out(self, session_id: str, expires: float, most: int) -> bool:
        """End a session; True when the list was full and the key was replaced instead."""

    # -- groups
    @abc.abstractmethod
    def list_groups(self) -> list[Group]: ...

    @abc.abstractmethod
    def get_group(self, name: str) -> Group | None: ...

    @abc.abstractmethod
    def create_group(self, name: str) -> Group: ...

    @abc.abstractmethod
    def delete_group(self, name: str) -> None: ...

    @abc.abstractmethod
    def rename_group(self, old: str, new: str) -> Group: ...

    # -- enrollment tokens (only their SHA-256 is stored)
    @abc.abstractmethod
    def create_token(self, token_hash: str, group: str, expires: float, uses: int) -> str:
        """Store a new token; returns its public id (what `token list` and `token revoke` name)."""

    @abc.abstractmethod
    def list_tokens(self) -> list[Token]:
        """The usable tokens (unexpired, uses left), oldest first."""

    @abc.abstractmethod
    def revoke_token(self, token_id: str) -> None:
        """Delete a token: it enrolls nothing from now on. NotFound if there is no such token."""

    @abc.abstractmethod
    def check_token(self, token_hash: str) -> str:
        """The group of a usable token; InvalidToken otherwise. Consumes nothing."""

    @abc.abstractmethod
    def enroll(self, token_hash: str, connector: Connector) -> Connector:
        """Use one use of the token and add the connector, in one transaction.

        The connector joins the token's group; the stored record is returned.
        """

    # -- connectors
    @abc.abstractmethod
    def get_connector(self, connector_id: str) -> Connector | None: ...

    @abc.abstractmethod
    def list_connectors(self) -> list[Connector]:
        """Every connector that is not revoked."""

    @abc.abstractmethod
    def assign_connector(self, connector_id: str, group: str) -> Connector: ...

    @abc.abstractmethod
    def revoke_connector(self, connector_id: str) -> None:
        """Delete a connector: its certificates are refused from now on."""

    @abc.abstractmethod
    def renew_connector_cert(self, connector_id: str, serial: int, expires: float, presented: int | None = None) -> None:
        """Make ``serial`` the connector's certificate. The one the renewal was asked with
        (``presented``; None: the current one) becomes the previous certificate, so a
        connector whose renewal answer was lost, and which asks again with its old
        certificate, keeps that one usable."""

    @abc.abstractmethod
    def retire_previous_cert(self, connector_id: str, serial: int, until: float) -> None:
        """The connector used its current certificate ``serial``: its previous one is
        accepted only until ``until`` (or its own expiry, if sooner). Nothing happens when
        ``serial`` is not the current one."""

    @abc.abstractmethod
    def heartbeat(self, connector_id: str, stats: ConnectorStats, peer: str) -> None: ...

    @abc.abstractmethod
    def set_app_health(self, connector_id: str, apps: dict[str, bool]) -> None:
        """Replace what the connector reports about reaching its apps' origins.

        Apps not in ``apps`` become unreported; names that are not apps of the
        connector's group are ignored."""

    @abc.abstractmethod
    def origin_health(self) -> dict[str, list[OriginReport]]:
        """Per app name, a report for every active connector of the app's group."""

    @abc.abstractmethod
    def tunnel_changed(self, connector_id: str, node_id: str, worker: int, delta: int, peer: str) -> None:
        """Worker ``worker`` of relay node ``node_id`` gained (+1) or lost (-1) a usable tunnel
        of the connector. NotFound when the node is not registered."""

    @abc.abstractmethod
    def mark_worker_down(self, node_id: str, worker: int) -> None:
        """Forget every tunnel counted for ``worker`` of ``node_id`` (at its start and exit)."""

    # -- relay nodes (docs/architecture.md, "Several nodes")
    @abc.abstractmethod
    def register_node(self, node: "Node") -> None:
        """Add or replace the node ``node.id`` (state running, started = last_seen = now);
        LimitReached beyond ClusterSettings.max_nodes nodes."""

    @abc.abstractmethod
    def node_heartbeat(self, node_id: str) -> None:
        """The node is alive now; NotFound when it is not registered as running."""

    @abc.abstractmethod
    def node_stopped(self, node_id: str) -> None:
        """A clean stop: the node is ``stopped`` and its tunnel rows are deleted."""

    @abc.abstractmethod
    def remove_node(self, node_id: str) -> None:
        """Forget a node that is down; NotFound when there is none, Conflict when it is up."""

    @abc.abstractmethod
    def list_nodes(self, fresh_for: float) -> list["Node"]:
        """Every registered node, by id, with ``tunnels`` and ``fresh`` computed (a node is
        fresh while its heartbeat is younger than ``fresh_for`` and it has not stopped)."""

    @abc.abstractmethod
    def group_nodes(self, fresh_for: float) -> dict[str, list[str]]:
        """Group name -> ids of the up nodes holding a usable tunnel of a non-revoked
        connector of that group."""

    @abc.abstractmethod
    def changes_since(self, version: int) -> list[dict[str, Any]]:
        """The change-log rows after ``version`` (version, kind, subject, at), oldest first."""

    @abc.abstractmethod
    def create_service(self, record: dict[str, str]) -> None:
        """Record the service the nodes of this store join; Conflict when one is recorded."""

    @abc.abstractmethod
    def service_record(self) -> dict[str, str] | None:
        """The recorded service, or None."""

    @abc.abstractmethod
    def prune(self, unseen_for: float) -> list[str]:
        """Remove connectors unseen (and without tunnels) for ``unseen_for`` seconds,
        revoked records whose certificates have expired, and dead tokens.
        Returns the ids of the connectors removed."""

    @abc.abstractmethod
    def connector_config(self, connector_id: str, refresh_interval: int = REFRESH_INTERVAL) -> dict[str, Any]: ...

    # -- apps
    @abc.abstractmethod
    def list_apps(self) -> list[App]: ...

    @abc.abstractmethod
    def get_app(self, name: str) -> App | None: ...

    @abc.abstractmethod
    def create_app(self, app: App) -> App: ...

    @abc.abstractmethod
    def update_app(self, name: str, app: App) -> App:
        """Replace the app called ``name`` by ``app`` (which may carry a new name)."""

    @abc.abstractmethod
    def delete_app(self, name: str) -> None: ...

    # -- releases (signed connector releases; see backhaul.release)

    @abc.abstractmethod
    def create_release(self, release: Release, *, max_stored: int, max_records: int) -> tuple[Release, bool]:
        """Store a new, ``incomplete`` release with its files (none uploaded yet).

        Storing the same manifest again while it is incomplete returns the stored one (so an
        interrupted upload can resume); another manifest of an incomplete version replaces it
        (it was never served); (release, created) says which. Conflict for a published or
        revoked release of that version; LimitReached beyond ``max_stored`` releases holding files
        (incomplete or published) or ``max_records`` rows in all."""

    @abc.abstractmethod
    def list_releases(self) -> list[Release]:
        """Every release, revoked ones included, newest first by creation."""

    @abc.abstractmethod
    def get_release(self, version: str) -> Release | None: ...

    @abc.abstractmethod
    def revoke_release(self, version: str) -> Release:
        """Mark the release revoked (never served again) and drop its file bytes."""

    @abc.abstractmethod
    def begin_file_upload(self, version: str, name: str) -> str:
        """Start (or restart) the upload of one file of an incomplete release; the upload id.
        Earlier partial bytes of that file are dropped. Conflict when the release is not
        incomplete or the file is already complete; NotFound when there is no such file."""

    @abc.abstractmethod
    def put_file_chunk(self, version: str, name: str, upload: str, seq: int, data: bytes) -> None:
        """Store chunk ``seq`` of an upload; Conflict when ``upload`` is no longer the current one."""

    @abc.abstractmethod
    def finish_file_upload(self, version: str, name: str, upload: str) -> Release:
        """Mark the file complete (its bytes checked by the caller); the release becomes
        ``published`` once every file is. Conflict when ``upload`` is no longer current."""

    @abc.abstractmethod
    def abort_file_upload(self, version: str, name: str, upload: str) -> None:
        """Drop the bytes of a refused or broken upload (if it is still the current one)."""

    @abc.abstractmethod
    def read_file_chunk(self, version: str, name: str, seq: int) -> bytes | None:
        """Chunk ``seq`` of a complete file of a published release; None when there is none
        (past the end, or the release was revoked meanwhile)."""

    # -- rollout
    @abc.abstractmethod
    def group_rollout(self, name: str, listed_failures: int = 100) -> GroupRollout:
        """The update settings and rollout state of one group; NotFound if there is none."""

    @abc.abstractmethod
    def list_rollouts(self, listed_failures: int = 100) -> list[GroupRollout]:
        """``group_rollout`` of every group, by name."""

    @abc.abstractmethod
    def update_failure_counts(self) -> dict[tuple[str, str, str], int]:
        """How many connectors (not revoked) of each group failed or rolled back each version:
        ``{(group, version, step): count}`` with step one of HALTING_STEPS (release list)."""

    @abc.abstractmethod
    def set_group_updates(self, name: str, changes: dict[str, Any]) -> GroupRollout:
        """Change a group's update settings: ``allow_downtime`` (bool) and ``window`` (a
        canonical spec or None for none); keys not given keep their value."""

    @abc.abstractmethod
    def pause_rollout(self, name: str | None) -> list[str]:
        """Pause one group's rollout (None: every group's): no lease is granted until resumed.
        Returns the groups that were not paused before."""

    @abc.abstractmethod
    def resume_rollout(self, name: str | None) -> list[str]:
        """Clear the pause and the halt of one group (None: every group). Returns the groups
        that were paused or halted before."""

    @abc.abstractmethod
    def acquire_update_lease(self, connector_id: str, version: str, seconds: float) -> UpdateLease:
        """Grant the connector its group's update lease for ``seconds``, with a new fencing
        token, in one transaction; LeaseRefused says why not (busy, paused, halted, alone,
        outside_window). A connector that holds the lease already gets it again with a new
        token (the old one is stale from then on)."""

    @abc.abstractmethod
    def renew_update_lease(self, connector_id: str, token: int, seconds: float) -> UpdateLease:
        """Extend the lease the connector holds with ``token`` to ``seconds`` from now;
        LeaseRefused(stale) if it does not hold that lease any more (expired, granted again,
        released, or the connector moved to another group)."""

    @abc.abstractmethod
    def report_update(
        self, connector_id: str, version: str, step: str, reason: str, token: int | None, *, keep: int, keep_failures: int
    ) -> ReportOutcome:
        """Record a step of an update (keeping the connector's newest ``keep`` reports).

        A LEASE_RELEASING_STEPS step with the current token gives the lease back (an old
        token releases nothing); a HALTING_STEPS step halts the group's rollout and marks the
        version failed for the connector (its newest ``keep_failures`` versions are kept)."""

    @abc.abstractmethod
    def update_reports(self, connector_id: str) -> list[UpdateReport]:
        """The connector's kept reports, oldest first."""

    @abc.abstractmethod
    def set_connector_version(self, connector_id: str, version: str) -> bool:
        """Record the version a connector runs (from its tunnel hello); True if it changed."""
