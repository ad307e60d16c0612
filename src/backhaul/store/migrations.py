"""Numbered schema migrations of the SQLite store. Append only: never edit a shipped step."""

from __future__ import annotations

#: (version, statements). Each step runs in the same transaction as its row in
#: ``schema_migrations``, so a step is applied completely or not at all.
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        1,
        (
            """CREATE TABLE meta (
                key TEXT PRIMARY KEY,
                value TEXT NOT NULL
            )""",
            """CREATE TABLE config_version (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                version INTEGER NOT NULL
            )""",
            "INSERT INTO config_version (id, version) VALUES (1, 1)",
            """CREATE TABLE groups (
                name TEXT PRIMARY KEY,
                created REAL NOT NULL
            )""",
            "INSERT INTO groups (name, created) VALUES ('default', CAST(strftime('%s', 'now') AS REAL))",
            """CREATE TABLE tokens (
                hash TEXT PRIMARY KEY,
                grp TEXT NOT NULL,
                expires REAL NOT NULL,
                uses_left INTEGER NOT NULL,
                created REAL NOT NULL
            )""",
            """CREATE TABLE connectors (
                id TEXT PRIMARY KEY,
                name TEXT NOT NULL,
                hostname TEXT NOT NULL,
                version TEXT NOT NULL,
                grp TEXT NOT NULL,
                created REAL NOT NULL,
                last_seen REAL NOT NULL,
                source_addr TEXT NOT NULL,
                cert_serial TEXT NOT NULL,
                cert_expires REAL NOT NULL,
                prev_serial TEXT,
                prev_expires REAL,
                revoked INTEGER NOT NULL DEFAULT 0,
                active_streams INTEGER NOT NULL DEFAULT 0,
                bytes_in INTEGER NOT NULL DEFAULT 0,
                bytes_out INTEGER NOT NULL DEFAULT 0,
                cpu REAL NOT NULL DEFAULT 0,
                memory REAL NOT NULL DEFAULT 0
            )""",
            "CREATE INDEX connectors_grp ON connectors (grp)",
            """CREATE TABLE tunnels (
                connector_id TEXT NOT NULL REFERENCES connectors (id) ON DELETE CASCADE,
                worker INTEGER NOT NULL,
                count INTEGER NOT NULL,
                PRIMARY KEY (connector_id, worker)
            )""",
            "CREATE INDEX tunnels_worker ON tunnels (worker)",
            """CREATE TABLE apps (
                name TEXT PRIMARY KEY,
                grp TEXT NOT NULL,
                proto TEXT NOT NULL CHECK (proto IN ('tcp', 'udp', 'http')),
                port INTEGER,
                target TEXT,
                external_host TEXT UNIQUE,
                internal_url TEXT,
                preauth TEXT,
                created REAL NOT NULL,
                UNIQUE (proto, port)
            )""",
            "CREATE INDEX apps_grp ON apps (grp)",
        ),
    ),
    (
        2,
        (
            # Per-app options of http apps: keep the external Host for the backend; the
            # connector's TLS to an https backend (a CA bundle in PEM, or no verification).
            "ALTER TABLE apps ADD COLUMN keep_host INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE apps ADD COLUMN backend_ca TEXT",
            "ALTER TABLE apps ADD COLUMN backend_insecure INTEGER NOT NULL DEFAULT 0",
        ),
    ),
    (
        3,
        (
            "ALTER TABLE apps ADD COLUMN health_path TEXT",
            # What each connector last reported about reaching each app's origin. At most
            # connectors x apps rows; both tables are bounded by StoreLimits.
            """CREATE TABLE app_health (
                connector_id TEXT NOT NULL REFERENCES connectors (id) ON DELETE CASCADE,
                app TEXT NOT NULL REFERENCES apps (name) ON DELETE CASCADE ON UPDATE CASCADE,
                ok INTEGER NOT NULL,
                since REAL NOT NULL,
                PRIMARY KEY (connector_id, app)
            )""",
            "CREATE INDEX app_health_app ON app_health (app)",
        ),
    ),
    (
        4,
        (
            # A short public id per enrollment token, separate from the secret, so an admin can
            # list tokens and revoke one without ever seeing the token (only its hash is stored).
            "ALTER TABLE tokens ADD COLUMN id TEXT",
            "UPDATE tokens SET id = lower(hex(randomblob(6))) WHERE id IS NULL",
            "CREATE UNIQUE INDEX tokens_id ON tokens (id)",
        ),
    ),
    # -- releases
    (
        5,
        (
            # Signed releases as uploaded by `admin release publish`: the manifest and signature
            # exactly as signed, the public key sent with them (the relay holds no private key),
            # and the relay-side choices (auto). A revoked release keeps its row, never its files.
            """CREATE TABLE releases (
                version TEXT PRIMARY KEY,
                manifest BLOB NOT NULL,
                signature BLOB NOT NULL,
                public_key TEXT NOT NULL,
                key_id TEXT NOT NULL,
                issued INTEGER NOT NULL,
                expires INTEGER NOT NULL,
                auto INTEGER NOT NULL DEFAULT 0,
                state TEXT NOT NULL CHECK (state IN ('incomplete', 'published', 'revoked')),
                created REAL NOT NULL,
                revoked REAL
            )""",
            # One row per file of a release (from the manifest); `upload` is the id of the upload
            # under way, so chunks of an older, abandoned upload of the same file are refused.
            """CREATE TABLE release_files (
                version TEXT NOT NULL REFERENCES releases (version) ON DELETE CASCADE,
                name TEXT NOT NULL,
                sha256 TEXT NOT NULL,
                size INTEGER NOT NULL,
                complete INTEGER NOT NULL DEFAULT 0,
                upload TEXT,
                PRIMARY KEY (version, name)
            )""",
            # File bytes in chunks of ReleaseLimits.chunk_size: written and served a chunk at a
            # time, so neither an upload nor a download holds a whole wheel in memory.
            """CREATE TABLE release_chunks (
                version TEXT NOT NULL,
                name TEXT NOT NULL,
                seq INTEGER NOT NULL,
                data BLOB NOT NULL,
                PRIMARY KEY (version, name, seq),
                FOREIGN KEY (version, name) REFERENCES release_files (version, name) ON DELETE CASCADE
            )""",
        ),
    ),
    # -- rollout
    (
        6,
        (
            # A group's update settings and the state of its rollout; a row once something
            # was set (no row: the defaults). Follows its group's renames and deletion.
            """CREATE TABLE group_rollout (
                grp TEXT PRIMARY KEY REFERENCES groups (name) ON UPDATE CASCADE ON DELETE CASCADE,
                allow_downtime INTEGER NOT NULL DEFAULT 0,
                update_window TEXT,
                paused INTEGER NOT NULL DEFAULT 0,
                halted TEXT,
                halted_connector TEXT,
                halted_version TEXT,
                halted_at REAL
            )""",
            # At most one lease per group (the key), so at most one connector of it updates.
            """CREATE TABLE update_leases (
                grp TEXT PRIMARY KEY REFERENCES groups (name) ON UPDATE CASCADE ON DELETE CASCADE,
                connector_id TEXT NOT NULL REFERENCES connectors (id) ON DELETE CASCADE,
                version TEXT NOT NULL,
                token INTEGER NOT NULL,
                granted REAL NOT NULL,
                expires REAL NOT NULL
            )""",
            # The fencing counter: only ever grows, and lives in the store, so a token
            # handed out before a relay restart is never handed out again.
            """CREATE TABLE update_fence (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                token INTEGER NOT NULL
            )""",
            "INSERT INTO update_fence (id, token) VALUES (1, 0)",
            # The newest reports of each connector (RolloutSettings.reports_per_connector).
            """CREATE TABLE update_reports (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                connector_id TEXT NOT NULL REFERENCES connectors (id) ON DELETE CASCADE,
                grp TEXT NOT NULL,
                version TEXT NOT NULL,
                step TEXT NOT NULL,
                reason TEXT NOT NULL,
                token INTEGER,
                at REAL NOT NULL
            )""",
            "CREATE INDEX update_reports_connector ON update_reports (connector_id, id)",
            # Versions that failed or were rolled back per connector (RolloutSettings.failures_per_connector).
            """CREATE TABLE update_failures (
                connector_id TEXT NOT NULL REFERENCES connectors (id) ON DELETE CASCADE,
                version TEXT NOT NULL,
                step TEXT NOT NULL,
                reason TEXT NOT NULL,
                at REAL NOT NULL,
                PRIMARY KEY (connector_id, version)
            )""",
        ),
    ),
    # -- several relay nodes
    (
        7,
        (
            # One row per relay node (`admin node list`); a node is up while its heartbeat
            # (last_seen) is fresh and it has not stopped. At most ClusterSettings.max_nodes.
            """CREATE TABLE nodes (
                id TEXT PRIMARY KEY,
                listen TEXT NOT NULL,
                peer TEXT NOT NULL,
                version TEXT NOT NULL,
                started REAL NOT NULL,
                last_seen REAL NOT NULL,
                state TEXT NOT NULL CHECK (state IN ('running', 'stopped'))
            )""",
            # Tunnel counts are per (connector, node, worker) now. Their rows are transient (every
            # worker clears its own at start), so the old table is dropped, not copied: the
            # relay being upgraded restarts its workers, which count their tunnels again.
            "DROP TABLE tunnels",
            """CREATE TABLE tunnels (
                connector_id TEXT NOT NULL REFERENCES connectors (id) ON DELETE CASCADE,
                node_id TEXT NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
                worker INTEGER NOT NULL,
                count INTEGER NOT NULL,
                PRIMARY KEY (connector_id, node_id, worker)
            )""",
            "CREATE INDEX tunnels_node ON tunnels (node_id, worker)",
            # One row per config_version bump (the newest ClusterSettings.change_log_rows): what
            # changed, for a node catching up and for an operator; the version stays the truth.
            """CREATE TABLE change_log (
                version INTEGER PRIMARY KEY,
                kind TEXT NOT NULL,
                subject TEXT NOT NULL,
                at REAL NOT NULL
            )""",
        ),
    ),
    # -- inactive connectors
    (
        8,
        (
            # When a connector became inactive (its last tunnel went away); NULL while it has a
            # tunnel, or when it never had one (then it is inactive since it was created).
            "ALTER TABLE connectors ADD COLUMN inactive_since REAL",
            # A connector of an existing store with no tunnel row: inactive since it was last
            # seen, as near as the old schema knows.
            "UPDATE connectors SET inactive_since = last_seen "
            "WHERE NOT EXISTS (SELECT 1 FROM tunnels t WHERE t.connector_id = connectors.id AND t.count > 0)",
        ),
    ),
)
