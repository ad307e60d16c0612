"""The OpenAPI 3.1 description of the control API, served at GET /v1/openapi.json."""

from __future__ import annotations

from typing import Any

from backhaul import __version__
from backhaul.control import validate as v
from backhaul.control.context import ControlSettings
from backhaul.release import manifest as rm
from backhaul.store import UPDATE_STEPS, LeaseRefused, StoreLimits
from backhaul.store.base import RELEASE_STATES

#: The "format" of a backend CA bundle: PEM text of one or more CA certificates.
CA_BUNDLE_FORMAT = "pem-certificates"


def _obj(required: list[str], **props: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": props}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _whole(pattern: str) -> str:
    """A validate.*_PATTERN (which Python fullmatches) as a JSON Schema pattern (a search)."""
    return f"^(?:{pattern})$"


_S = {"type": "string"}
_I = {"type": "integer"}
_N = {"type": "number"}
_B = {"type": "boolean"}
_NULL = {"type": "null"}
_NULLABLE_S = {"type": ["string", "null"]}
_NULLABLE_I = {"type": ["integer", "null"]}

# Request fields, each a schema of its own: every number and pattern here is the one
# control.validate checks against.
_FIELDS: dict[str, dict[str, Any]] = {
    "Name": {"type": "string", "minLength": 1, "maxLength": v.MAX_NAME, "pattern": _whole(v.NAME_PATTERN)},
    "Counter": {"type": "integer", "minimum": 0, "maximum": v.MAX_COUNTER},
    "Port": {"type": "integer", "minimum": v.PORT_RANGE[0], "maximum": v.PORT_RANGE[1]},
    "Target": {
        "type": "string",
        "allOf": [{"pattern": _whole(v.TARGET_PATTERN)}, {"pattern": v.TARGET_HOST_LENGTH_PATTERN}],
        "description": f"HOST:PORT the connector dials: a DNS name (at most {v.MAX_HOST} characters) or IPv4 address, or [IPv6]:PORT",
    },
    "Host": {
        "type": "string",
        "maxLength": v.MAX_HOST,
        "pattern": _whole(v.HOST_PATTERN),
        "description": "a DNS name or an IP address (IPv6 without brackets or zone)",
    },
    "InternalUrl": {
        "type": "string",
        "maxLength": v.MAX_URL,
        "allOf": [{"pattern": _whole(v.INTERNAL_URL_PATTERN)}, {"pattern": v.URL_HOST_LENGTH_PATTERN}],
        "description": "http(s)://HOST[:PORT][/PATH] where the connector reaches the web app; no user name or password",
    },
    "HealthPath": {
        "type": ["string", "null"],
        "maxLength": v.MAX_HEALTH_PATH,
        "pattern": _whole(v.HEALTH_PATH_PATTERN),
        "description": "what connectors GET to check the origin (else they TCP-connect); null for none",
    },
    "CaBundle": {
        "type": ["string", "null"],
        "format": CA_BUNDLE_FORMAT,
        "maxLength": v.MAX_CA_BUNDLE,
        "description": "PEM bundle of the CA certificates the connector verifies an https backend with",
    },
}
_NAME = _ref("Name")
_TEXT = _ref("Text")
_COUNTER = _ref("Counter")
_HTTPS_URL = {"pattern": f"^{v.HTTPS_PATTERN}:"}


def _tcp_udp_app(required: list[str]) -> dict[str, Any]:
    """A tcp or udp app: a port on the relay and the target its connectors dial; no http option."""
    unset = {option: _NULL if value is None else {"enum": [None, value]} for option, value in v.HTTP_OPTIONS.items()}
    fields = {"name": _NAME, "group": _NAME, "proto": {"type": "string", "enum": [p for p in v.PROTOCOLS if p != "http"]}, "port": _ref("Port"), "target": _ref("Target")}
    return _obj(required, **fields, **unset)


def _http_app(required: list[str]) -> dict[str, Any]:
    """An http app, whose backend TLS options need an https internal URL and exclude each other."""
    schema = _obj(
        required,
        name=_NAME,
        group=_NAME,
        proto={"type": "string", "enum": ["http"]},
        port=_NULL,
        target=_NULL,
        external_host=_ref("Host"),
        internal_url=_ref("InternalUrl"),
        preauth={"enum": [*v.PREAUTH, None], "description": "null means passthrough"},
        keep_host=_B,
        backend_ca=_ref("CaBundle"),
        backend_insecure=_B,
        health_path=_ref("HealthPath"),
    )
    schema["oneOf"] = [
        {"properties": {"backend_ca": _NULL, "backend_insecure": {"const": False}}},
        {"required": ["backend_ca"], "properties": {"internal_url": _HTTPS_URL, "backend_ca": _S, "backend_insecure": {"const": False}}},
        {"required": ["backend_insecure"], "properties": {"internal_url": _HTTPS_URL, "backend_ca": _NULL, "backend_insecure": {"const": True}}},
    ]
    return schema


def _schemas(settings: ControlSettings) -> dict[str, dict[str, Any]]:
    changes = (
        "fields of a tcp/udp app or of an http app; changes that do not fit the app they are for "
        "(another proto, an http option for a tcp app, backend_ca or backend_insecure with an http:// internal URL) are answered 409"
    )
    return {
        **_FIELDS,
        # Built on the first call, not at import: the pattern takes a scan of every code point.
        "Text": {
            "type": ["string", "null"],
            "maxLength": v.MAX_TEXT,
            "pattern": v.printable_pattern(),
            "description": "text without control, format or separator characters (but the space); null for none",
        },
        "Error": _obj(["error", "detail"], error=_S, detail=_S),
        "Health": _obj(["status", "worker"], status=_S, worker=_I),
        "Ca": _obj(["ca", "ca_sha256"], ca=_S, ca_sha256=_S),
        "EnrollRequest": _obj(
            ["token", "csr"],
            token={"type": "string", "minLength": 1, "maxLength": v.MAX_TOKEN},
            csr={"type": "string", "description": "PEM certificate signing request"},
            name=_TEXT,
            hostname=_TEXT,
            version=_TEXT,
        ),
        "EnrollResponse": _obj(["connector_id", "certificate", "ca", "group"], connector_id=_S, certificate=_S, ca=_S, group=_S),
        "ConnectorConfig": _obj(
            ["version", "etag", "connector_id", "group", "refresh_interval", "apps"],
            version=_I,
            etag=_S,
            connector_id=_S,
            group=_S,
            refresh_interval=_I,
            apps={
                "type": "array",
                "items": _obj(
                    ["name", "proto", "target"],
                    name=_S,
                    proto=_S,
                    target=_S,
                    internal_url=_NULLABLE_S,
                    backend_ca=_NULLABLE_S,
                    backend_insecure=_B,
                    health_path=_NULLABLE_S,
                ),
            },
            nodes={
                "type": "array",
                "description": "the relay nodes that are up, and the address connectors dial for each",
                "items": _obj(["id", "listen"], id=_S, listen=_S),
            },
        ),
        "Heartbeat": _obj(
            [],
            version=_TEXT,
            cpu={"type": "number", "minimum": 0, "maximum": v.MAX_CPU},
            memory={"type": "number", "minimum": 0, "maximum": v.MAX_COUNTER},
            streams=_COUNTER,
            bytes_in=_COUNTER,
            bytes_out=_COUNTER,
            apps={
                "type": ["object", "null"],
                "maxProperties": StoreLimits.max_apps,
                "propertyNames": _NAME,
                "additionalProperties": _B,
                "description": "app name -> the connector can reach its origin",
            },
        ),
        "HeartbeatResponse": _obj(["status", "config_version", "refresh_interval"], status=_S, config_version=_I, refresh_interval=_I),
        "RenewRequest": _obj(["csr"], csr={"type": "string", "description": "PEM certificate signing request"}),
        "RenewResponse": _obj(["certificate", "ca"], certificate=_S, ca=_S),
        "Group": _obj(["name"], name=_S, created=_N, apps=_I, connectors=_I),
        "GroupName": _obj(["name"], name=_NAME),
        "TokenRequest": _obj(
            [],
            group=_NAME,
            ttl={"type": "integer", "minimum": 1, "maximum": settings.token_max_ttl},
            uses={"type": "integer", "minimum": 1, "maximum": settings.token_max_uses},
        ),
        "Token": _obj(["token", "id", "group", "expires", "uses"], token=_S, id=_S, group=_S, expires=_N, uses=_I),
        "TokenListed": {
            **_obj(["id", "group", "uses_left", "expires", "created"], id=_S, group=_S, uses_left=_I, expires=_N, created=_N),
            "description": "an enrollment token as listed: never its secret",
        },
        "Revoked": _obj(["revoked"], revoked=_S),
        "TcpUdpApp": _tcp_udp_app(["name", "proto", "port", "target"]),
        "HttpApp": _http_app(["name", "proto", "external_host", "internal_url"]),
        "NewApp": {
            "oneOf": [_ref("TcpUdpApp"), _ref("HttpApp")],
            "discriminator": {
                "propertyName": "proto",
                "mapping": {"tcp": "#/components/schemas/TcpUdpApp", "udp": "#/components/schemas/TcpUdpApp", "http": "#/components/schemas/HttpApp"},
            },
        },
        "AppChanges": {
            "anyOf": [
                {**_tcp_udp_app([]), "additionalProperties": False},
                {**_http_app([]), "additionalProperties": False},
            ],
            "description": changes,
        },
        "App": _obj(
            ["name", "group", "proto"],
            name=_S,
            group=_S,
            proto={"type": "string", "enum": list(v.PROTOCOLS)},
            port=_NULLABLE_I,
            target=_NULLABLE_S,
            external_host=_NULLABLE_S,
            internal_url=_NULLABLE_S,
            preauth={"type": ["string", "null"], "enum": [*v.PREAUTH, None]},
            keep_host=_B,
            backend_ca=_NULLABLE_S,
            backend_insecure=_B,
            health_path=_NULLABLE_S,
        ),
        "Reachability": _obj(
            ["active", "reachable", "unreachable", "connectors"],
            active=_I,
            reachable=_I,
            unreachable=_I,
            connectors={
                "type": "array",
                "items": _obj(
                    ["id", "name", "reachable", "since"],
                    id=_S,
                    name=_S,
                    reachable={"type": ["boolean", "null"]},
                    since={"type": ["number", "null"]},
                ),
            },
        ),
        "Connector": _obj(
            ["id", "name", "group", "status", "version", "last_seen", "inactive_since", "removal_at"],
            id=_S,
            name=_S,
            hostname=_S,
            version=_S,
            group=_S,
            status={
                "type": "string",
                "enum": ["active", "inactive"],
                "description": "active while a relay node that is up holds a tunnel of it, and for a short grace "
                "after its last tunnel went away (`service run --inactive-grace`, default 30 s)",
            },
            created=_N,
            last_seen={**_N, "description": "its last heartbeat or tunnel change"},
            inactive_since={
                "type": ["number", "null"],
                "description": "when it became inactive (its last tunnel went away, or its enrollment when it never "
                "had one), seconds since the epoch; null while active",
            },
            removal_at={
                "type": ["number", "null"],
                "description": "from when housekeeping removes it: last_seen plus the removal period "
                "(`service run --remove-inactive-after`, default 10 days); null while active",
            },
            source_addr=_S,
            cert_serial=_S,
            cert_expires=_N,
            tunnels=_I,
            active_streams=_I,
            bytes_in=_I,
            bytes_out=_I,
            cpu=_N,
            memory=_N,
            cpu_warning=_B,
        ),
        "Node": _obj(
            ["id", "listen", "peer", "status", "state", "tunnels", "version", "started", "last_seen"],
            id=_S,
            listen={**_S, "description": "HOST:PORT connectors dial"},
            peer={**_S, "description": "HOST:PORT the other relay nodes dial"},
            status={"type": "string", "enum": ["up", "down"]},
            state={"type": "string", "enum": ["running", "stopped"]},
            tunnels={**_I, "description": "usable connector tunnels it holds (0 when down)"},
            version=_S,
            started=_N,
            last_seen={**_N, "description": "its last heartbeat"},
        ),
        "AssignRequest": _obj(["group"], group=_NAME),
        "Deleted": _obj(["deleted"], deleted=_S),
        **_release_schemas(settings),
    }


# -- releases


def _b64_text(size: int, what: str) -> dict[str, Any]:
    return {"type": "string", "contentEncoding": "base64", "maxLength": (size + 2) // 3 * 4, "description": what}


def _release_schemas(settings: ControlSettings) -> dict[str, dict[str, Any]]:

    limits = settings.releases
    version = {"type": "string", "maxLength": rm.MAX_VERSION, "pattern": _whole(rm.VERSION_PATTERN)}
    file_entry = _obj(["name", "sha256", "size"], name=_S, sha256=_S, size=_I)
    return {
        "ReleaseUpload": {
            **_obj(
                ["manifest", "signature", "public_key"],
                manifest=_b64_text(limits.max_manifest, f"the signed manifest's exact bytes ({rm.FORMAT}, canonical JSON)"),
                signature=_b64_text(rm.SIGNATURE_SIZE, "Ed25519 signature of the manifest bytes"),
                public_key={"type": "string", "maxLength": 4096, "description": "PEM public key the manifest's key_id names"},
                auto=_B,
            ),
            "additionalProperties": False,
        },
        "ReleaseFile": _obj(["name", "sha256", "size", "complete"], name=_S, sha256=_S, size=_I, complete=_B),
        "Release": _obj(
            ["version", "state", "auto", "key_id", "issued", "expires", "size", "files", "missing"],
            version=_S,
            state={"type": "string", "enum": list(RELEASE_STATES)},
            auto=_B,
            key_id=_S,
            issued=_I,
            expires=_I,
            created=_N,
            revoked={"type": ["number", "null"]},
            size=_I,
            files={"type": "array", "items": _ref("ReleaseFile")},
            missing={"type": "array", "items": _S, "description": "files not uploaded yet"},
            groups={
                "type": "object",
                "description": "GET /v1/releases: the release's rollout per connector group (groups with connectors or a failure of it)",
                "additionalProperties": _ref("ReleaseGroupRollout"),
            },
        ),
        "ReleaseGroupRollout": _obj(
            ["connectors", "on", "updating", "failed", "rolled_back", "halted"],
            connectors={"type": "integer", "minimum": 0, "description": "connectors in the group (not revoked)"},
            on={"type": "integer", "minimum": 0, "description": "of them, those that run this version"},
            updating={"type": ["string", "null"], "description": "the connector holding the group's update lease for this version"},
            failed={"type": "integer", "minimum": 0, "description": "connectors where this version failed"},
            rolled_back={"type": "integer", "minimum": 0, "description": "connectors that rolled this version back"},
            halted={"type": ["string", "null"], "description": "why this version halted the group's rollout"},
        ),
        "ReleaseFileStored": _obj(
            ["version", "name", "state", "missing"], version=_S, name=_S, state=_S, missing={"type": "array", "items": _S}
        ),
        "Updates": _obj(
            ["release", "rollout"],
            rollout=_obj(["paused", "halted"], paused=_B, halted=_NULLABLE_S),
            release={
                "oneOf": [
                    _NULL,
                    _obj(
                        ["version", "manifest", "signature", "auto", "files"],
                        version=_S,
                        manifest={"type": "string", "contentEncoding": "base64"},
                        signature={"type": "string", "contentEncoding": "base64"},
                        auto=_B,
                        files={"type": "array", "items": file_entry},
                    ),
                ],
                "description": "the release to look at, or null; the connector checks it against its pinned keys",
            },
        ),
        "Version": version,
        "WheelName": {"type": "string", "maxLength": rm.MAX_NAME, "pattern": _whole(rm.WHEEL_NAME_PATTERN)},
    }


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


_ERRORS = {
    "400": "malformed request",
    "401": "missing or wrong admin token",
    "403": "refused (token, certificate or revocation)",
    "404": "no such record",
    "409": "conflicts with existing records, a limit, or a port the relay listens on",
}

# (method, path, summary, auth, request schema, status, response schema)
_ROUTES: list[tuple[str, str, str, str | None, str | None, str, dict[str, Any] | None]] = [
    ("get", "/v1/health", "Readiness probe", None, None, "200", _ref("Health")),
    ("get", "/v1/ca", "The service CA certificate (compare with the pinned fingerprint)", None, None, "200", _ref("Ca")),
    ("get", "/v1/openapi.json", "This document", None, None, "200", {"type": "object"}),
    ("post", "/v1/enroll", "Enroll a connector with an enrollment token and a CSR", None, "EnrollRequest", "201", _ref("EnrollResponse")),
    ("get", "/v1/connector/config", "The connector's configuration (ETag / If-None-Match)", "mtls", None, "200", _ref("ConnectorConfig")),
    ("post", "/v1/connector/heartbeat", "Report the connector's statistics", "mtls", "Heartbeat", "200", _ref("HeartbeatResponse")),
    ("post", "/v1/connector/renew", "Renew the connector certificate from a new CSR", "mtls", "RenewRequest", "200", _ref("RenewResponse")),
    ("get", "/v1/groups", "List connector groups", "admin", None, "200", {"type": "array", "items": _ref("Group")}),
    ("post", "/v1/groups", "Create a connector group", "admin", "GroupName", "201", _ref("Group")),
    ("delete", "/v1/groups/{name}", "Delete an empty connector group", "admin", None, "200", _ref("Deleted")),
    ("patch", "/v1/groups/{name}", "Rename a connector group", "admin", "GroupName", "200", _ref("Group")),
    ("post", "/v1/tokens", "Create an enrollment token", "admin", "TokenRequest", "201", _ref("Token")),
    ("get", "/v1/tokens", "List the usable enrollment tokens (never their secrets)", "admin", None, "200", {"type": "array", "items": _ref("TokenListed")}),
    ("delete", "/v1/tokens/{id}", "Revoke an enrollment token: it enrolls nothing from now on", "admin", None, "200", _ref("Revoked")),
    (
        "get", "/v1/apps", "List published apps, with which active connectors can reach each", "admin", None, "200",
        {"type": "array", "items": {"allOf": [_ref("App"), _obj(["reachability"], reachability=_ref("Reachability"))]}},
    ),
    ("post", "/v1/apps", "Publish an app", "admin", "NewApp", "201", _ref("App")),
    ("patch", "/v1/apps/{name}", "Change fields of an app", "admin", "AppChanges", "200", _ref("App")),
    ("delete", "/v1/apps/{name}", "Delete an app", "admin", None, "200", _ref("Deleted")),
    ("get", "/v1/connectors", "List connectors", "admin", None, "200", {"type": "array", "items": _ref("Connector")}),
    ("delete", "/v1/connectors/{id}", "Delete a connector and revoke its certificate", "admin", None, "200", _ref("Deleted")),
    ("put", "/v1/connectors/{id}/group", "Move a connector to another group", "admin", "AssignRequest", "200", _ref("Connector")),
    ("get", "/v1/nodes", "List the relay nodes, up and down", "admin", None, "200", {"type": "array", "items": _ref("Node")}),
    ("delete", "/v1/nodes/{id}", "Forget a relay node that is down", "admin", None, "200", _ref("Deleted")),
    # -- releases
    ("post", "/v1/releases", "Store a signed release manifest; its files follow (PUT)", "admin", "ReleaseUpload", "201", _ref("Release")),
    (
        "get", "/v1/releases", "List releases, each with its rollout per group", "admin", None, "200",
        {"type": "array", "items": {"allOf": [_ref("Release"), _obj(["groups"])]}},
    ),
    ("delete", "/v1/releases/{version}", "Revoke a release: never served again, its files dropped", "admin", None, "200", _ref("Revoked")),
    (
        "put", "/v1/releases/{version}/files/{name}", "Upload one file of a release (raw body, exactly the manifest's size)",
        "admin", "RawFile", "200", _ref("ReleaseFileStored"),
    ),
    (
        "get", "/v1/releases/{version}/files/{name}", "Download one file of a published release", "mtls", None, "200",
        {"type": "string", "format": "binary"},
    ),
    ("get", "/v1/updates", "The newest release for this connector, or the one asked for", "mtls", None, "200", _ref("Updates")),
]


# -- rollout: update leases and reports (connector), rollout status, pause/resume and
# group update settings (admin). See docs/architecture.md, "Rollout".


def _rollout_schemas() -> dict[str, dict[str, Any]]:

    token = {"type": "integer", "minimum": 1, "maximum": v.MAX_COUNTER}
    lease = _obj(
        ["group", "connector_id", "version", "token", "granted", "expires"],
        group=_S, connector_id=_S, version=_S, token=_I, granted=_N, expires=_N,
    )
    return {
        "ReportedVersion": {
            "type": "string",
            "minLength": 1,
            "maxLength": v.MAX_TEXT,
            "pattern": v.printable_pattern(),
            "description": "the release version the update is for",
        },
        "Window": {
            "type": ["string", "null"],
            "maxLength": v.MAX_WINDOW,
            "pattern": _whole(v.WINDOW_PATTERN),
            "description": (
                "maintenance window in UTC: DAYS HH:MM-HH:MM, days a comma list of Mon..Sun and ranges (Mon-Fri) "
                "or daily; ends on the next day when the end is not after the start; null for none"
            ),
        },
        "LeaseRequest": _obj(["version"], version=_ref("ReportedVersion")),
        "Lease": _obj(["token", "expires", "group"], token=_I, expires=_N, group=_S, renew_every=_N),
        "LeaseRefused": _obj(
            ["error", "detail", "reason"], error=_S, detail=_S, reason={"type": "string", "enum": list(LeaseRefused.REASONS)}
        ),
        "LeaseRenewRequest": _obj(["token"], token=token),
        "LeaseRenewed": _obj(["expires"], expires=_N),
        "UpdateReport": _obj(
            ["version", "step"],
            version=_ref("ReportedVersion"),
            step={"type": "string", "enum": list(UPDATE_STEPS)},
            reason=_TEXT,
            token={**token, "type": ["integer", "null"]},
        ),
        "UpdateReportListed": _obj(
            ["connector_id", "group", "version", "step", "reason", "token", "at"],
            connector_id=_S, group=_S, version=_S, step=_S, reason=_S, token=_NULLABLE_I, at=_N,
        ),
        "UpdateReportAnswer": _obj(["status", "released", "halted"], status=_S, released=_B, halted=_B),
        "RolloutTarget": {
            **_obj([], group=_NAME),
            "additionalProperties": False,
            "description": "the group to pause or resume; {} for every group",
        },
        "GroupUpdates": {
            **_obj([], allow_downtime=_B, window=_ref("Window")),
            "additionalProperties": False,
            "description": "fields not sent keep their value",
        },
        "GroupRollout": _obj(
            ["group", "allow_downtime", "window", "paused", "halted", "lease", "versions", "failures", "failures_total"],
            group=_S,
            allow_downtime=_B,
            window=_NULLABLE_S,
            paused=_B,
            halted={"type": ["string", "null"], "description": "why the rollout is halted (the failure's reason); null: not halted"},
            halted_connector=_NULLABLE_S,
            halted_version=_NULLABLE_S,
            halted_at={"type": ["number", "null"]},
            lease={"oneOf": [lease, _NULL]},
            versions={"type": "object", "additionalProperties": _I, "description": "version -> connectors of the group on it"},
            failures={
                "type": "array",
                "items": _obj(
                    ["connector_id", "connector", "version", "step", "reason", "at"],
                    connector_id=_S, connector=_S, version=_S, step=_S, reason=_S, at=_N,
                ),
            },
            failures_total=_I,
        ),
    }


def _changed(key: str) -> dict[str, Any]:
    """The answer of pause/resume: the groups whose state changed."""
    return _obj([key], **{key: {"type": "array", "items": _S}})


_ROUTES.extend(
    [
        ("post", "/v1/updates/lease", "Take the group's update lease (one connector per group updates at a time)", "mtls", "LeaseRequest", "200", _ref("Lease")),
        ("post", "/v1/updates/lease/renew", "Extend the update lease held with this fencing token", "mtls", "LeaseRenewRequest", "200", _ref("LeaseRenewed")),
        ("post", "/v1/updates/report", "Report a step of an update (healthy/refused/failed/rolled_back with the current token give the lease back)", "mtls", "UpdateReport", "200", _ref("UpdateReportAnswer")),
        ("get", "/v1/rollout", "Each group's rollout: paused, halted and why, lease holder, versions, failures", "admin", None, "200", {"type": "array", "items": _ref("GroupRollout")}),
        ("post", "/v1/rollout/pause", "Pause a group's rollout (or every group's)", "admin", "RolloutTarget", "200", _changed("paused")),
        ("post", "/v1/rollout/resume", "Resume a group's rollout (or every group's): clears its pause and its halt", "admin", "RolloutTarget", "200", _changed("resumed")),
        ("get", "/v1/connectors/{id}/updates", "A connector's newest update reports, oldest first", "admin", None, "200", {"type": "array", "items": _ref("UpdateReportListed")}),
        ("patch", "/v1/groups/{name}/updates", "Change a group's update settings (allow_downtime, maintenance window)", "admin", "GroupUpdates", "200", _ref("GroupRollout")),
    ]
)

#: Operations whose 409 is a refused lease, with its machine-readable reason.
_LEASE_OPERATIONS = {"/v1/updates/lease", "/v1/updates/lease/renew"}


def openapi_document(settings: ControlSettings = ControlSettings()) -> dict[str, Any]:
    """The whole OpenAPI document, with the limits of these settings."""
    paths: dict[str, dict[str, Any]] = {}
    for method, path, summary, auth, request, status, response in _ROUTES:
        op: dict[str, Any] = {"summary": summary, "responses": {status: {"description": "success", **_json(response)}}}
        if method == "get" and path == "/v1/connector/config":
            op["responses"]["304"] = {"description": "not modified since the ETag sent in If-None-Match"}
        if path == "/v1/enroll":
            op["responses"]["429"] = {
                "description": "too many refused enrollments from this address; see the Retry-After header",
                "headers": {"Retry-After": {"schema": {"type": "integer", "minimum": 1}, "description": "seconds to wait"}},
                **_json(_ref("Error")),
            }
        for code, text in _ERRORS.items():
            op["responses"][code] = {"description": text, **_json(_ref("Error"))}
        if path in _LEASE_OPERATIONS:
            op["responses"]["409"] = {"description": "lease refused; reason says why", **_json(_ref("LeaseRefused"))}
        if request:
            op["requestBody"] = {"required": True, **_json(_ref(request))}
            op["responses"]["413"] = {"description": f"the request body is larger than {settings.max_body} bytes", **_json(_ref("Error"))}
        if auth == "admin":
            # Or the admin center's session: its cookie, and for a change its page's CSRF token.
            op["security"] = [{"adminToken": []}, {"adminSession": [], "adminCsrf": []}]
        elif auth == "mtls":
            op["security"] = [{"connectorCertificate": []}]
        else:
            op["security"] = []
        params = [seg[1:-1] for seg in path.split("/") if seg.startswith("{")]
        if params:
            op["parameters"] = [{"name": p, "in": "path", "required": True, "schema": _S} for p in params]
        paths.setdefault(path, {})[method] = op
    _release_operations(paths, settings)
    return {
        "openapi": "3.1.0",
        "info": {"title": "backhaul control API", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": {**_schemas(settings), **_rollout_schemas()},
            "securitySchemes": {
                "adminToken": {"type": "http", "scheme": "bearer", "description": "the token in DATA_DIR/admin.token"},
                "connectorCertificate": {"type": "mutualTLS", "description": "the connector's client certificate"},
                "adminSession": {
                    "type": "apiKey", "in": "cookie", "name": "__Host-backhaul-admin",
                    "description": "the admin center's session cookie (sign in at /admin/); GET needs only this",
                },
                "adminCsrf": {
                    "type": "apiKey", "in": "header", "name": "X-CSRF-Token",
                    "description": "the session's CSRF token (the admin center page's csrf-token meta); every change "
                    "needs it, from the same origin (Origin / Sec-Fetch-Site)",
                },
            },
        },
    }


def _release_operations(paths: dict[str, dict[str, Any]], settings: ControlSettings) -> None:
    """What the release routes have beyond the common shape: raw bodies, 410, query parameters."""
    files = "/v1/releases/{version}/files/{name}"
    gone = {"description": "the release is revoked", **_json(_ref("Error"))}
    upload = paths[files]["put"]
    upload["requestBody"] = {"required": True, "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
    upload["responses"]["413"] = {"description": "the body is longer than the signed manifest says (nothing past that is read)", **_json(_ref("Error"))}
    download = paths[files]["get"]
    download["responses"]["200"] = {
        "description": "the file's bytes",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
    for op in (upload, download, paths["/v1/updates"]["get"]):
        op["responses"]["410"] = gone
    # A version or file name that is not one names no release: 404 (as an unknown one).
    for op in (upload, download, paths["/v1/releases/{version}"]["delete"]):
        schemas = {"version": _ref("Version"), "name": _ref("WheelName")}
        op["parameters"] = [{**param, "schema": schemas[param["name"]]} for param in op["parameters"]]
    paths["/v1/updates"]["get"]["parameters"] = [
        {"name": name, "in": "query", "required": False, "schema": _ref("Version"), "description": text}
        for name, text in (
            ("installed", "the version the connector runs: only newer releases are offered"),
            ("version", "this release (a manual update), newer or not"),
        )
    ]
