"""Numbered schema migrations of the PostgreSQL store. Append only: never edit a shipped step.

The schema is the SQLite store's (store/migrations.py) as of its step 6, in PostgreSQL's
types: times are DOUBLE PRECISION seconds, counters BIGINT, bytes BYTEA. Flags stay
INTEGER 0/1 as in SQLite, because both backends run the same SQL (store/sql.py).
"""

from __future__ import annotations

#: (version, statements). Every pending step runs in one transaction with its row in
#: ``schema_migrations``, so a step is applied completely or not at all.
PG_MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        1,
        (
            """CREATE TABLE meta (
                key TEXT PRIMARY KEY,
                value TEXT NOT NULL
            )""",
            """CREATE TABLE config_version (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                version BIGINT NOT NULL
            )""",
            "INSERT INTO config_version (id, version) VALUES (1, 1)",
            """CREATE TABLE groups (
                name TEXT PRIMARY KEY,
                created DOUBLE PRECISION NOT NULL
            )""",
            "INSERT INTO groups (name, created) VALUES ('default', extract(epoch FROM now()))",
            # Only the SHA-256 of a token is stored; ``id`` is its public name (list, revoke).
            """CREATE TABLE tokens (
                hash TEXT PRIMARY KEY,
                id TEXT NOT NULL UNIQUE,
                grp TEXT NOT NULL,
                expires DOUBLE PRECISION NOT NULL,
                uses_left INTEGER NOT NULL,
                created DOUBLE PRECISION NOT NULL
            )""",
            """CREATE TABLE connectors (
                id TEXT PRIMARY KEY,
                name TEXT NOT NULL,
                hostname TEXT NOT NULL,
                version TEXT NOT NULL,
                grp TEXT NOT NULL,
                created DOUBLE PRECISION NOT NULL,
                last_seen DOUBLE PRECISION NOT NULL,
                source_addr TEXT NOT NULL,
                cert_serial TEXT NOT NULL,
                cert_expires DOUBLE PRECISION NOT NULL,
                prev_serial TEXT,
                prev_expires DOUBLE PRECISION,
                revoked INTEGER NOT NULL DEFAULT 0,
                active_streams BIGINT NOT NULL DEFAULT 0,
                bytes_in BIGINT NOT NULL DEFAULT 0,
                bytes_out BIGINT NOT NULL DEFAULT 0,
                cpu DOUBLE PRECISION NOT NULL DEFAULT 0,
                memory DOUBLE PRECISION NOT NULL DEFAULT 0
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
                keep_host INTEGER NOT NULL DEFAULT 0,
                backend_ca TEXT,
                backend_insecure INTEGER NOT NULL DEFAULT 0,
                health_path TEXT,
                created DOUBLE PRECISION NOT NULL,
                UNIQUE (proto, port)
            )""",
            "CREATE INDEX apps_grp ON apps (grp)",
            # What each connector last reported about reaching each app's origin. At most
            # connectors x apps rows; both tables are bounded by StoreLimits.
            """CREATE TABLE app_health (
                connector_id TEXT NOT NULL REFERENCES connectors (id) ON DELETE CASCADE,
                app TEXT NOT NULL REFERENCES apps (name) ON DELETE CASCADE ON UPDATE CASCADE,
                ok INTEGER NOT NULL,
                since DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (connector_id, app)
            )""",
            "CREATE INDEX app_health_app ON app_health (app)",
            # -- releases (see store/migrations.py step 5)
            """CREATE TABLE releases (
                version TEXT PRIMARY KEY,
                manifest BYTEA NOT NULL,
                signature BYTEA NOT NULL,
                public_key TEXT NOT NULL,
                key_id TEXT NOT NULL,
                issued BIGINT NOT NULL,
                expires BIGINT NOT NULL,
                auto INTEGER NOT NULL DEFAULT 0,
                state TEXT NOT NULL CHECK (state IN ('incomplete', 'published', 'revoked')),
                created DOUBLE PRECISION NOT NULL,
                revoked DOUBLE PRECISION
            )""",
            """CREATE TABLE release_files (
                version TEXT NOT NULL REFERENCES releases (version) ON DELETE CASCADE,
                name TEXT NOT NULL,
                sha256 TEXT NOT NULL,
                size BIGINT NOT NULL,
                complete INTEGER NOT NULL DEFAULT 0,
                upload TEXT,
                PRIMARY KEY (version, name)
            )""",
            """CREATE TABLE release_chunks (
                version TEXT NOT NULL,
                name TEXT NOT NULL,
                seq INTEGER NOT NULL,
                data BYTEA NOT NULL,
                PRIMARY KEY (version, name, seq),
                FOREIGN KEY (version, name) REFERENCES release_files (version, name) ON DELETE CASCADE
            )""",
            # -- rollout (see store/migrations.py step 6)
            """CREATE TABLE group_rollout (
                grp TEXT PRIMARY KEY REFERENCES groups (name) ON UPDATE CASCADE ON DELETE CASCADE,
                allow_downtime INTEGER NOT NULL DEFAULT 0,
                update_window TEXT,
                paused INTEGER NOT NULL DEFAULT 0,
                halted TEXT,
                halted_connector TEXT,
                halted_version TEXT,
                halted_at DOUBLE PRECISION
            )""",
            """CREATE TABLE update_leases (
                grp TEXT PRIMARY KEY REFERENCES groups (name) ON UPDATE CASCADE ON DELETE CASCADE,
                connector_id TEXT NOT NULL REFERENCES connectors (id) ON DELETE CASCADE,
                version TEXT NOT NULL,
                token BIGINT NOT NULL,
                granted DOUBLE PRECISION NOT NULL,
                expires DOUBLE PRECISION NOT NULL
            )""",
            """CREATE TABLE update_fence (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                token BIGINT NOT NULL
            )""",
            "INSERT INTO update_fence (id, token) VALUES (1, 0)",
            """CREATE TABLE update_reports (
                id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                connector_id TEXT NOT NULL REFERENCES connectors (id) ON DELETE CASCADE,
                grp TEXT NOT NULL,
                version TEXT NOT NULL,
                step TEXT NOT NULL,
                reason TEXT NOT NULL,
                token BIGINT,
                at DOUBLE PRECISION NOT NULL
            )""",
            "CREATE INDEX update_reports_connector ON update_reports (connector_id, id)",
            """CREATE TABLE update_failures (
                connector_id TEXT NOT NULL REFERENCES connectors (id) ON DELETE CASCADE,
                version TEXT NOT NULL,
                step TEXT NOT NULL,
                reason TEXT NOT NULL,
                at DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (connector_id, version)
            )""",
        ),
    ),
    # -- several relay nodes (see store/migrations.py step 7)
    (
        2,
        (
            """CREATE TABLE nodes (
                id TEXT PRIMARY KEY,
                listen TEXT NOT NULL,
                peer TEXT NOT NULL,
                version TEXT NOT NULL,
                started DOUBLE PRECISION NOT NULL,
                last_seen DOUBLE PRECISION NOT NULL,
                state TEXT NOT NULL CHECK (state IN ('running', 'stopped'))
            )""",
            "DROP TABLE tunnels",
            """CREATE TABLE tunnels (
                connector_id TEXT NOT NULL REFERENCES connectors (id) ON DELETE CASCADE,
                node_id TEXT NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
                worker INTEGER NOT NULL,
                count INTEGER NOT NULL,
                PRIMARY KEY (connector_id, node_id, worker)
            )""",
            "CREATE INDEX tunnels_node ON tunnels (node_id, worker)",
            """CREATE TABLE change_log (
                version BIGINT PRIMARY KEY,
                kind TEXT NOT NULL,
                subject TEXT NOT NULL,
                at DOUBLE PRECISION NOT NULL
            )""",
        ),
    ),
    # -- inactive connectors (SQLite's step 8)
    (
        3,
        (
            "ALTER TABLE connectors ADD COLUMN inactive_since DOUBLE PRECISION",
            "UPDATE connectors SET inactive_since = last_seen "
            "WHERE NOT EXISTS (SELECT 1 FROM tunnels t WHERE t.connector_id = connectors.id AND t.count > 0)",
        ),
    ),
)
