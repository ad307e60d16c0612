"""The OpenAPI 3.1 description of the control API, served at GET /v1/openapi.json."""

from __future__ import annotations

from typing import Any

from backhaul import __version__


def _obj(required: list[str], **props: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": props}


_S = {"type": "string"}
_I = {"type": "integer"}
_N = {"type": "number"}
_B = {"type": "boolean"}
_NULLABLE_S = {"type": ["string", "null"]}
_NULLABLE_I = {"type": ["integer", "null"]}

SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": _obj(["error", "detail"], error=_S, detail=_S),
    "Health": _obj(["status", "worker"], status=_S, worker=_I),
    "Ca": _obj(["ca", "ca_sha256"], ca=_S, ca_sha256=_S),
    "EnrollRequest": _obj(["token", "csr"], token=_S, csr=_S, name=_S, hostname=_S, version=_S),
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
    ),
    "Heartbeat": _obj(
        [],
        version=_S,
        cpu=_N,
        memory=_N,
        streams=_I,
        bytes_in=_I,
        bytes_out=_I,
        apps={"type": "object", "additionalProperties": _B, "description": "app name -> the connector can reach its origin"},
    ),
    "HeartbeatResponse": _obj(["status", "config_version", "refresh_interval"], status=_S, config_version=_I, refresh_interval=_I),
    "RenewRequest": _obj(["csr"], csr=_S),
    "RenewResponse": _obj(["certificate", "ca"], certificate=_S, ca=_S),
    "Group": _obj(["name"], name=_S, created=_N, apps=_I, connectors=_I),
    "GroupName": _obj(["name"], name=_S),
    "TokenRequest": _obj([], group=_S, ttl=_I, uses=_I),
    "Token": _obj(["token", "group", "expires", "uses"], token=_S, group=_S, expires=_N, uses=_I),
    "App": _obj(
        ["name", "group", "proto"],
        name=_S,
        group=_S,
        proto={"type": "string", "enum": ["tcp", "udp", "http"]},
        port=_NULLABLE_I,
        target=_NULLABLE_S,
        external_host=_NULLABLE_S,
        internal_url=_NULLABLE_S,
        preauth={"type": ["string", "null"], "enum": ["passthrough", "oidc", None]},
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
        ["id", "name", "group", "status", "version", "last_seen"],
        id=_S,
        name=_S,
        hostname=_S,
        version=_S,
        group=_S,
        status={"type": "string", "enum": ["active", "inactive"]},
        created=_N,
        last_seen=_N,
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
    "AssignRequest": _obj(["group"], group=_S),
    "Deleted": _obj(["deleted"], deleted=_S),
}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


_ERRORS = {
    "400": "malformed request",
    "401": "missing or wrong admin token",
    "403": "refused (token, certificate or revocation)",
    "404": "no such record",
    "409": "conflicts with existing records or a limit",
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
    (
        "get", "/v1/apps", "List published apps, with which active connectors can reach each", "admin", None, "200",
        {"type": "array", "items": {"allOf": [_ref("App"), _obj(["reachability"], reachability=_ref("Reachability"))]}},
    ),
    ("post", "/v1/apps", "Publish an app", "admin", "App", "201", _ref("App")),
    ("patch", "/v1/apps/{name}", "Change fields of an app", "admin", "App", "200", _ref("App")),
    ("delete", "/v1/apps/{name}", "Delete an app", "admin", None, "200", _ref("Deleted")),
    ("get", "/v1/connectors", "List connectors", "admin", None, "200", {"type": "array", "items": _ref("Connector")}),
    ("delete", "/v1/connectors/{id}", "Delete a connector and revoke its certificate", "admin", None, "200", _ref("Deleted")),
    ("put", "/v1/connectors/{id}/group", "Move a connector to another group", "admin", "AssignRequest", "200", _ref("Connector")),
]


def openapi_document() -> dict[str, Any]:
    """The whole OpenAPI document."""
    paths: dict[str, dict[str, Any]] = {}
    for method, path, summary, auth, request, status, response in _ROUTES:
        op: dict[str, Any] = {"summary": summary, "responses": {status: {"description": "success", **_json(response)}}}
        if method == "get" and path == "/v1/connector/config":
            op["responses"]["304"] = {"description": "not modified since the ETag sent in If-None-Match"}
        for code, text in _ERRORS.items():
            op["responses"][code] = {"description": text, **_json(_ref("Error"))}
        if request:
            op["requestBody"] = {"required": True, **_json(_ref(request))}
        if auth == "admin":
            op["security"] = [{"adminToken": []}]
        elif auth == "mtls":
            op["security"] = [{"connectorCertificate": []}]
        else:
            op["security"] = []
        params = [seg[1:-1] for seg in path.split("/") if seg.startswith("{")]
        if params:
            op["parameters"] = [{"name": p, "in": "path", "required": True, "schema": _S} for p in params]
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "backhaul control API", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "adminToken": {"type": "http", "scheme": "bearer", "description": "the token in DATA_DIR/admin.token"},
                "connectorCertificate": {"type": "mutualTLS", "description": "the connector's client certificate"},
            },
        },
    }
