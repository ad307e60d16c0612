"""The control API: enrollment, connector config/heartbeat/renewal, admin endpoints.

``build_app`` returns an aiohttp Application that owns no socket: the relay hands it
the TLS connections whose ALPN is http/1.1 (tests may serve it with a TCPSite).
Connector calls authenticate with the client certificate of the TLS connection,
admin calls with a bearer token, enrollment with an enrollment token.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from pathlib import Path
from typing import Any, Callable

from aiohttp import web

from backhaul import pki
from backhaul.center import routes as center
from backhaul.config import AdminCenterSettings, OidcSettings, RolloutSettings
from backhaul.control import releases_api, rollout_api, validate
from backhaul.control.context import ControlContext
from backhaul.control.openapi import openapi_document
from backhaul.control.ratelimit import AddressLimiter
from backhaul.control.web import (
    CONTEXT,
    MAX_TOKEN,
    ApiError,
    blocking,
    connector_identity,
    context_of,
    error_response,
    errors_middleware,
    identity,
    json_response,
    new_enrollment_token,
    peer_of,
    read_json,
    require_admin,
    token_hash,
)
from backhaul.store import (
    App,
    Connector,
    ConnectorStats,
    InvalidToken,
    OriginReport,
    StoreError,
    StoreLimits,
)


log = logging.getLogger(__name__)

#: Refused enrollments per client address, this worker's table (see config.EnrollLimits).
ENROLL_LIMITER = web.AppKey("backhaul_enroll_limiter", AddressLimiter)
#: Connectors listed by name under each app's reachability (the counts cover them all).
MAX_LISTED_CONNECTORS = 100


# -- public endpoints


async def health(request: web.Request) -> web.Response:
    return json_response({"status": "ok", "worker": context_of(request).worker})


async def ca_certificate(request: web.Request) -> web.Response:
    """The service CA, for a new connector to compare with its pinned fingerprint."""
    ca = context_of(request).ca
    return json_response({"ca": ca.cert_pem.decode("ascii"), "ca_sha256": pki.fingerprint_sha256(ca.cert)})


async def openapi(request: web.Request) -> web.Response:
    return json_response(openapi_document(context_of(request).settings))


def _expires(cert) -> float:
    return cert.not_valid_after_utc.timestamp()


async def enroll(request: web.Request) -> web.Response:
    ctx = context_of(request)
    limiter = request.app[ENROLL_LIMITER]
    peer = peer_of(request)
    wait = limiter.retry_after(peer)
    if wait:
        if limiter.should_log(peer):
            log.warning(
                "enrollments refused from this address for a while: too many bad tokens",
                extra={"peer": peer, "retry_after": wait, "burst": ctx.settings.enroll.burst},
            )
        return error_response(
            429, "too_many_attempts", f"too many refused enrollments from this address; retry in {wait} s",
            {"Retry-After": str(wait)},
        )
    body = await read_json(request)
    token = body.get("token")
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN:
        _enrollment_refused(request, limiter, "malformed", None)
        raise ApiError(400, "bad_request", "token must be the enrollment token from `backhaul admin token create`")
    hashed = token_hash(token)
    # Check first so a bad token costs no CSR parsing nor signature; enroll() re-checks atomically.
    try:
        await blocking(request, ctx.store.check_token, hashed)
    except InvalidToken as exc:
        _enrollment_refused(request, limiter, exc.reason, exc.token_id)
        raise
    csr_pem = body.get("csr")
    if not isinstance(csr_pem, str):
        raise ApiError(400, "bad_request", "csr must be a PEM certificate signing request")
    csr = pki.load_csr(csr_pem)
    hostname = validate.text(body.get("hostname"), "hostname")
    name = validate.text(body.get("name"), "name") or hostname
    version = validate.text(body.get("version"), "version")
    connector_id = pki.new_connector_id()
    cert = pki.sign_csr(ctx.ca, csr, connector_id, datetime.timedelta(seconds=ctx.settings.cert_validity))
    record = Connector(
        id=connector_id,
        name=name or connector_id,
        hostname=hostname,
        version=version,
        group="",
        created=ctx.clock(),
        last_seen=ctx.clock(),
        source_addr=peer_of(request),
        cert_serial=cert.serial_number,
        cert_expires=_expires(cert),
    )
    try:
        stored = await blocking(request, ctx.store.enroll, hashed, record)
    except InvalidToken as exc:
        # Used up (or revoked) by a concurrent enrollment since the check above.
        _enrollment_refused(request, limiter, exc.reason, exc.token_id)
        raise
    log.info("connector enrolled", extra={"connector_id": connector_id, "group": stored.group, "peer": peer_of(request)})
    return json_response(
        {
            "connector_id": connector_id,
            "certificate": pki.cert_to_pem(cert).decode("ascii"),
            "ca": ctx.ca.cert_pem.decode("ascii"),
            "group": stored.group,
        },
        status=201,
    )


def _enrollment_refused(request: web.Request, limiter: AddressLimiter, reason: str, token_id: str | None) -> None:
    """Log a refused enrollment (never the token: at most its public id) and charge the address."""
    peer = peer_of(request)
    limiter.failed(peer)
    extra: dict[str, Any] = {"peer": peer, "reason": reason}
    if token_id is not None:
        extra["token_id"] = token_id
    log.warning("enrollment refused: bad, expired or used-up token", extra=extra)


# -- connector endpoints (mTLS)


def _etag_matches(header: str, etag: str) -> bool:
    for candidate in header.split(","):
        candidate = candidate.strip()
        if candidate == "*":
            return True
        if candidate.startswith("W/"):
            candidate = candidate[2:]
        if candidate.strip('"') == etag:
            return True
    return False


async def connector_config(request: web.Request) -> web.Response:
    connector = await connector_identity(request)
    ctx = context_of(request)
    config = await blocking(request, ctx.store.connector_config, connector.id, ctx.settings.refresh_interval)
    etag = config["etag"]
    headers = {"ETag": f'"{etag}"', "Cache-Control": "no-cache"}
    if _etag_matches(request.headers.get("If-None-Match", ""), etag):
        return web.Response(status=304, headers=headers)
    return json_response(config, headers=headers)


async def connector_heartbeat(request: web.Request) -> web.Response:
    connector = await connector_identity(request)
    ctx = context_of(request)
    body = await read_json(request)
    big = validate.MAX_COUNTER
    stats = ConnectorStats(
        version=validate.text(body.get("version"), "version", default=connector.version),
        cpu=validate.number(body.get("cpu", 0.0), "cpu", 0.0, validate.MAX_CPU),
        memory=validate.number(body.get("memory", 0.0), "memory", 0.0, float(big)),
        streams=validate.integer(body.get("streams", 0), "streams", 0, big),
        bytes_in=validate.integer(body.get("bytes_in", 0), "bytes_in", 0, big),
        bytes_out=validate.integer(body.get("bytes_out", 0), "bytes_out", 0, big),
    )
    apps = validate.health_map(body.get("apps"), StoreLimits.max_apps)
    await blocking(request, ctx.store.heartbeat, connector.id, stats, peer_of(request))
    if apps is not None:
        await blocking(request, ctx.store.set_app_health, connector.id, apps)
    version = await blocking(request, ctx.store.config_version)
    return json_response({"status": "ok", "config_version": version, "refresh_interval": ctx.settings.refresh_interval})


async def connector_renew(request: web.Request) -> web.Response:
    connector, presented = await identity(request)
    ctx = context_of(request)
    body = await read_json(request)
    csr_pem = body.get("csr")
    if not isinstance(csr_pem, str):
        raise ApiError(400, "bad_request", "csr must be a PEM certificate signing request")
    csr = pki.load_csr(csr_pem)
    cert = pki.sign_csr(ctx.ca, csr, connector.id, datetime.timedelta(seconds=ctx.settings.cert_validity))
    await blocking(request, ctx.store.renew_connector_cert, connector.id, cert.serial_number, _expires(cert), presented)
    log.info("connector certificate renewed", extra={"connector_id": connector.id})
    return json_response({"certificate": pki.cert_to_pem(cert).decode("ascii"), "ca": ctx.ca.cert_pem.decode("ascii")})


# -- admin endpoints (bearer token)


def _group_dict(group) -> dict[str, Any]:
    return {"name": group.name, "created": group.created, "apps": group.apps, "connectors": group.connectors}


@require_admin
async def list_groups(request: web.Request) -> web.Response:
    groups = await blocking(request, context_of(request).store.list_groups)
    return json_response([_group_dict(g) for g in groups])


@require_admin
async def create_group(request: web.Request) -> web.Response:
    body = await read_json(request)
    group = await blocking(request, context_of(request).store.create_group, validate.name(body.get("name"), "group name"))
    log.info("group created", extra={"group": group.name})
    return json_response(_group_dict(group), status=201)


@require_admin
async def delete_group(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    await blocking(request, context_of(request).store.delete_group, name)
    log.info("group deleted", extra={"group": name})
    return json_response({"deleted": name})


@require_admin
async def rename_group(request: web.Request) -> web.Response:
    body = await read_json(request)
    new = validate.name(body.get("name"), "new group name")
    group = await blocking(request, context_of(request).store.rename_group, request.match_info["name"], new)
    log.info("group renamed", extra={"group": new, "old": request.match_info["name"]})
    return json_response(_group_dict(group))


@require_admin
async def create_token(request: web.Request) -> web.Response:
    ctx = context_of(request)
    body = await read_json(request)
    group = validate.name(body.get("group", "default"), "group")
    ttl = validate.integer(body.get("ttl", 3600), "ttl", 1, ctx.settings.token_max_ttl)
    uses = validate.integer(body.get("uses", 1), "uses", 1, ctx.settings.token_max_uses)
    token = new_enrollment_token()
    expires = ctx.clock() + ttl
    token_id = await blocking(request, ctx.store.create_token, token_hash(token), group, expires, uses)
    log.info("enrollment token created", extra={"token_id": token_id, "group": group, "ttl": ttl, "uses": uses})
    return json_response({"token": token, "id": token_id, "group": group, "expires": expires, "uses": uses}, status=201)


@require_admin
async def list_tokens(request: web.Request) -> web.Response:
    tokens = await blocking(request, context_of(request).store.list_tokens)
    return json_response([t.to_dict() for t in tokens])


@require_admin
async def revoke_token(request: web.Request) -> web.Response:
    token_id = request.match_info["id"]
    await blocking(request, context_of(request).store.revoke_token, token_id)
    log.info("enrollment token revoked", extra={"token_id": token_id})
    return json_response({"revoked": token_id})


def _app_listed(app: App, reports: list[OriginReport]) -> dict[str, Any]:
    """An app as listed: its fields and which active connectors of its group can reach it."""
    data = app.to_dict()
    data["reachability"] = {
        "active": len(reports),
        "reachable": sum(r.reachable is True for r in reports),
        "unreachable": sum(r.reachable is False for r in reports),
        "connectors": [
            {"id": r.connector_id, "name": r.connector, "reachable": r.reachable, "since": r.since}
            for r in reports[:MAX_LISTED_CONNECTORS]
        ],
    }
    return data


@require_admin
async def list_apps(request: web.Request) -> web.Response:
    store = context_of(request).store
    apps = await blocking(request, store.list_apps)
    health = await blocking(request, store.origin_health)
    return json_response([_app_listed(a, health.get(a.name, [])) for a in apps])


def _app_summary(app: App) -> str:
    if app.proto == "http":
        return f"internal URL {app.internal_url}"
    return f"port {app.port}, target {app.target}"


def _published(ctx: ControlContext, body: dict[str, Any]) -> App:
    """The app a request body describes, if the relay can publish it."""
    app = validate.app(body)
    # A conflict, like a port another app holds, not a malformed request: the same body
    # is fine on a relay listening elsewhere (and so the document cannot refuse it).
    if app.port in ctx.settings.reserved_ports:
        raise ApiError(409, "conflict", f"port {app.port} is used by the relay itself; pick another port")
    return app


@require_admin
async def create_app(request: web.Request) -> web.Response:
    ctx = context_of(request)
    app = _published(ctx, await read_json(request))
    await blocking(request, ctx.store.create_app, app)
    log.info("app published", extra={"app": app.name, "group": app.group, "proto": app.proto})
    return json_response(app.to_dict(), status=201)


@require_admin
async def update_app(request: web.Request) -> web.Response:
    ctx = context_of(request)
    name = request.match_info["name"]
    current: App | None = await blocking(request, ctx.store.get_app, name)
    if current is None:
        raise ApiError(404, "not_found", f"there is no app {name!r}; see `backhaul admin app list`")
    changes = await read_json(request)
    unknown = set(changes) - set(current.to_dict())
    if unknown:
        raise ApiError(400, "bad_request", f"unknown fields {', '.join(sorted(unknown))}; see GET /v1/openapi.json")
    validate.app_changes(changes, current.proto)
    # From here the changes are well-formed (the document says as much): what still
    # refuses them is the app they are for, a conflict with its current state.
    merged = {**current.to_dict(), **changes}
    if current.proto != merged["proto"]:
        raise ApiError(409, "conflict", "an app's proto cannot change; delete the app and publish it again")
    if current.proto == "http" and "target" not in changes:
        # An http app's target is derived from its internal URL, never set directly.
        merged["target"] = None
    try:
        app = _published(ctx, merged)
    except validate.Invalid as exc:
        raise ApiError(409, "conflict", f"{exc} (app {name!r} is a {current.proto} app: {_app_summary(current)})") from None
    await blocking(request, ctx.store.update_app, name, app)
    log.info("app changed", extra={"app": app.name})
    return json_response(app.to_dict())


@require_admin
async def delete_app(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    await blocking(request, context_of(request).store.delete_app, name)
    log.info("app deleted", extra={"app": name})
    return json_response({"deleted": name})


def connector_dict(connector: Connector, settings, now: float | None = None) -> dict[str, Any]:
    """A connector as the admin API shows it at ``now`` (default: the wall clock): its status
    with ``settings.inactive_grace``, ``inactive_since`` and ``removal_at``."""
    data = connector.lifecycle_dict(
        time.time() if now is None else now, settings.inactive_grace, settings.remove_inactive_after
    )
    data["cpu_warning"] = connector.cpu > settings.cpu_warning
    return data


@require_admin
async def list_connectors(request: web.Request) -> web.Response:
    ctx = context_of(request)
    connectors = await blocking(request, ctx.store.list_connectors)
    now = ctx.clock()
    return json_response([connector_dict(c, ctx.settings, now) for c in connectors])


@require_admin
async def delete_connector(request: web.Request) -> web.Response:
    connector_id = request.match_info["id"]
    await blocking(request, context_of(request).store.revoke_connector, connector_id)
    log.info("connector deleted and its certificate revoked", extra={"connector_id": connector_id})
    return json_response({"deleted": connector_id})


@require_admin
async def assign_connector(request: web.Request) -> web.Response:
    ctx = context_of(request)
    body = await read_json(request)
    group = validate.name(body.get("group"), "group")
    connector = await blocking(request, ctx.store.assign_connector, request.match_info["id"], group)
    log.info("connector assigned", extra={"connector_id": connector.id, "group": group})
    return json_response(connector_dict(connector, ctx.settings, ctx.clock()))


# -- relay nodes


@require_admin
async def list_nodes(request: web.Request) -> web.Response:
    store = context_of(request).store
    nodes = await blocking(request, store.list_nodes, store.cluster.node_fresh)
    return json_response([node.to_dict() for node in nodes])


@require_admin
async def delete_node(request: web.Request) -> web.Response:
    node_id = request.match_info["id"]
    await blocking(request, context_of(request).store.remove_node, node_id)
    log.info("relay node removed", extra={"node": node_id})
    return json_response({"deleted": node_id})


# -- housekeeping


async def _housekeeping(app: web.Application):
    """Remove long-unseen connectors, expired revocations and dead tokens, periodically."""
    ctx = app[CONTEXT]
    interval = ctx.settings.housekeeping_interval

    async def loop() -> None:
        while True:
            try:
                removed = await asyncio.get_running_loop().run_in_executor(
                    None, ctx.store.prune, ctx.settings.remove_inactive_after
                )
                if removed:
                    log.info("removed unseen connectors", extra={"connectors": removed})
            except StoreError:
                log.exception("housekeeping failed; retrying at the next interval")
            await asyncio.sleep(interval)

    task = asyncio.create_task(loop()) if interval > 0 and ctx.worker == 0 else None
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def build_app(
    ctx: ControlContext,
    *,
    rollout: RolloutSettings = RolloutSettings(),
    update_reports: dict[str, int] | None = None,
    admin_center: AdminCenterSettings = AdminCenterSettings(),
    oidc: OidcSettings | None = None,
    traffic: Callable[[], dict[str, int]] | None = None,
    admin_log_dir: Path | None = None,
) -> web.Application:
    """The control API as an aiohttp Application (no socket of its own).

    ``update_reports`` is where update reports are counted by step (the relay's metrics);
    None: a table of the app's own. The admin center (backhaul.center) is mounted at /admin/;
    ``oidc``: the relay's issuer, for its OpenID Connect sign-in; ``traffic``: bytes per
    connector from the relay's own counters, for the admin center's charts (None: the
    connectors' heartbeat counters in the store); ``admin_log_dir``: where the relay writes
    its admin log, which the admin center shows."""
    app = web.Application(middlewares=[errors_middleware], client_max_size=ctx.settings.max_body)
    app[CONTEXT] = ctx
    app[ENROLL_LIMITER] = AddressLimiter(ctx.settings.enroll, ctx.clock)
    r = app.router
    r.add_get("/v1/health", health)
    r.add_get("/v1/ca", ca_certificate)
    r.add_get("/v1/openapi.json", openapi)
    r.add_post("/v1/enroll", enroll)
    r.add_get("/v1/connector/config", connector_config)
    r.add_post("/v1/connector/heartbeat", connector_heartbeat)
    r.add_post("/v1/connector/renew", connector_renew)
    r.add_get("/v1/groups", list_groups)
    r.add_post("/v1/groups", create_group)
    r.add_delete("/v1/groups/{name}", delete_group)
    r.add_patch("/v1/groups/{name}", rename_group)
    r.add_post("/v1/tokens", create_token)
    r.add_get("/v1/tokens", list_tokens)
    r.add_delete("/v1/tokens/{id}", revoke_token)
    r.add_get("/v1/apps", list_apps)
    r.add_post("/v1/apps", create_app)
    r.add_patch("/v1/apps/{name}", update_app)
    r.add_delete("/v1/apps/{name}", delete_app)
    r.add_get("/v1/connectors", list_connectors)
    r.add_get("/v1/nodes", list_nodes)
    r.add_delete("/v1/nodes/{id}", delete_node)
    r.add_delete("/v1/connectors/{id}", delete_connector)
    r.add_put("/v1/connectors/{id}/group", assign_connector)
    releases_api.add_routes(app)
    rollout_api.add_routes(app, rollout, update_reports)
    center.setup(app, admin_center, oidc, traffic, admin_log_dir)
    app.cleanup_ctx.append(_housekeeping)
    return app
