"""The control API: enrollment, connector config/heartbeat/renewal, admin endpoints.

``build_app`` returns an aiohttp Application that owns no socket: the relay hands it
the TLS connections whose ALPN is http/1.1 (tests may serve it with a TCPSite).
Connector calls authenticate with the client certificate of the TLS connection,
admin calls with a bearer token, enrollment with an enrollment token.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime
import functools
import hashlib
import hmac
import logging
import re
import secrets
from typing import Any, Awaitable, Callable

import orjson
from aiohttp import web
from packaging.version import Version

from backhaul import pki, tlsconfig
from backhaul.control import validate
from backhaul.control.context import ControlContext
from backhaul.control.openapi import openapi_document
from backhaul.control.ratelimit import AddressLimiter
from backhaul.config import ReleaseLimits
from backhaul.errors import CertificateError, ConfigError
from backhaul.release import keys as release_keys, manifest as release_manifest
from backhaul.release.manifest import ReleaseRefused
from backhaul.store import (
    App,
    Conflict,
    Connector,
    ConnectorStats,
    InvalidToken,
    LimitReached,
    NotFound,
    OriginReport,
    Release,
    ReleaseFile,
    StoreError,
    StoreLimits,
    Unavailable,
)

# -- rollout
from backhaul.config import RolloutSettings
from backhaul.store import HALTING_STEPS, UPDATE_STEPS, LeaseRefused

log = logging.getLogger(__name__)

CONTEXT = web.AppKey("backhaul_control_context", ControlContext)
#: Refused enrollments per client address, this worker's table (see config.EnrollLimits).
ENROLL_LIMITER = web.AppKey("backhaul_enroll_limiter", AddressLimiter)
ENROLLMENT_TOKEN_PREFIX = "bht_"
ADMIN_TOKEN_PREFIX = "bha_"
MAX_TOKEN = validate.MAX_TOKEN
#: Connectors listed by name under each app's reachability (the counts cover them all).
MAX_LISTED_CONNECTORS = 100


class ApiError(Exception):
    """An error answer: HTTP status, short code, and what the caller should do."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


def token_hash(token: str) -> str:
    """The stored form of an enrollment or admin token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_enrollment_token() -> str:
    return ENROLLMENT_TOKEN_PREFIX + secrets.token_urlsafe(32)


def new_admin_token() -> str:
    return ADMIN_TOKEN_PREFIX + secrets.token_urlsafe(32)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


def error_response(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    return json_response({"error": code, "detail": detail}, status=status, headers=headers)


_STORE_STATUS: list[tuple[type[StoreError], int, str]] = [
    (NotFound, 404, "not_found"),
    (Conflict, 409, "conflict"),
    (LimitReached, 409, "limit_reached"),
    (InvalidToken, 403, "enrollment_refused"),
    (Unavailable, 503, "store_unavailable"),
]


@web.middleware
async def _errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Turn every failure into the one JSON error shape."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.detail)
    except validate.Invalid as exc:
        return error_response(400, "bad_request", str(exc))
    except CertificateError as exc:
        return error_response(400, "bad_certificate_request", str(exc))
    except StoreError as exc:
        for kind, status, code in _STORE_STATUS:
            if isinstance(exc, kind):
                return error_response(status, code, str(exc))
        return error_response(409, "refused", str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        details = {
            404: "no such endpoint; see GET /v1/openapi.json",
            405: f"{request.method} is not allowed here; see GET /v1/openapi.json",
            413: "the request body is too large",
        }
        return error_response(exc.status, exc.reason.lower().replace(" ", "_"), details.get(exc.status, exc.reason))
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("control API request failed", extra={"path": request.path, "method": request.method})
        return error_response(500, "internal", "the service failed to handle the request; see the relay log")


def _ctx(request: web.Request) -> ControlContext:
    return request.app[CONTEXT]


async def _run(request: web.Request, fn: Callable[..., Any], *args: Any) -> Any:
    """Run a short blocking store call off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "bad_json", f"the request body is not valid JSON ({exc})") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "bad_json", "the request body must be a JSON object")
    return body


# -- authentication


def _require_admin(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        stored = await _run(request, _ctx(request).store.admin_token_hash)
        if scheme.lower() != "bearer" or not presented.strip() or len(presented) > MAX_TOKEN or stored is None:
            raise ApiError(401, "unauthorized", "send the admin token as 'Authorization: Bearer TOKEN' (it is in DATA_DIR/admin.token)")
        if not hmac.compare_digest(token_hash(presented.strip()), stored):
            raise ApiError(401, "unauthorized", "the admin token is wrong; use the one in DATA_DIR/admin.token")
        return await handler(request)

    return wrapped


async def _connector_identity(request: web.Request) -> Connector:
    """The connector named by the verified client certificate of this connection."""
    connector, _ = await _identity(request)
    return connector


async def _identity(request: web.Request) -> tuple[Connector, int]:
    """The connector of this connection's client certificate, and that certificate's serial."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    connector_id = tlsconfig.peer_connector_id(ssl_object)
    serial = tlsconfig.peer_cert_serial(ssl_object)
    if connector_id is None:
        raise ApiError(403, "no_client_certificate", "connector calls need the connector's client certificate; register the connector first")
    ctx = _ctx(request)
    connector = await _run(request, ctx.store.get_connector, connector_id)
    if connector is None:
        raise ApiError(403, "unknown_connector", f"connector {connector_id} is not known to the service; re-register it with a new token")
    if connector.revoked:
        raise ApiError(403, "connector_revoked", f"connector {connector_id} was deleted by an admin; re-register it with a new token")
    now = ctx.clock()
    if not connector.accepts_serial(serial, now):
        raise ApiError(403, "certificate_replaced", "this certificate was replaced by a newer one; use the current certificate or re-register")
    grace_end = now + ctx.settings.replaced_cert_grace
    if (
        serial == connector.cert_serial
        and connector.previous_serial is not None
        and connector.previous_expires is not None
        and connector.previous_expires > grace_end
    ):
        # The first call with the renewed certificate: the connector has it, so the old
        # one is good only for the grace its other workers need to switch over.
        await _run(request, ctx.store.retire_previous_cert, connector.id, serial, grace_end)
        log.info(
            "connector uses its renewed certificate; the previous one is refused after the grace",
            extra={"connector_id": connector.id, "grace_seconds": ctx.settings.replaced_cert_grace},
        )
    return connector, serial


def _peer(request: web.Request) -> str:
    return request.remote or ""


# -- public endpoints


async def health(request: web.Request) -> web.Response:
    return json_response({"status": "ok", "worker": _ctx(request).worker})


async def ca_certificate(request: web.Request) -> web.Response:
    """The service CA, for a new connector to compare with its pinned fingerprint."""
    ca = _ctx(request).ca
    return json_response({"ca": ca.cert_pem.decode("ascii"), "ca_sha256": pki.fingerprint_sha256(ca.cert)})


async def openapi(request: web.Request) -> web.Response:
    return json_response(openapi_document(_ctx(request).settings))


def _expires(cert) -> float:
    return cert.not_valid_after_utc.timestamp()


async def enroll(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    limiter = request.app[ENROLL_LIMITER]
    peer = _peer(request)
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
    body = await _body(request)
    token = body.get("token")
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN:
        _enrollment_refused(request, limiter, "malformed", None)
        raise ApiError(400, "bad_request", "token must be the enrollment token from `backhaul admin token create`")
    hashed = token_hash(token)
    # Check first so a bad token costs no CSR parsing nor signature; enroll() re-checks atomically.
    try:
        await _run(request, ctx.store.check_token, hashed)
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
        source_addr=_peer(request),
        cert_serial=cert.serial_number,
        cert_expires=_expires(cert),
    )
    try:
        stored = await _run(request, ctx.store.enroll, hashed, record)
    except InvalidToken as exc:
        # Used up (or revoked) by a concurrent enrollment since the check above.
        _enrollment_refused(request, limiter, exc.reason, exc.token_id)
        raise
    log.info("connector enrolled", extra={"connector_id": connector_id, "group": stored.group, "peer": _peer(request)})
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
    peer = _peer(request)
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
    connector = await _connector_identity(request)
    ctx = _ctx(request)
    config = await _run(request, ctx.store.connector_config, connector.id, ctx.settings.refresh_interval)
    etag = config["etag"]
    headers = {"ETag": f'"{etag}"', "Cache-Control": "no-cache"}
    if _etag_matches(request.headers.get("If-None-Match", ""), etag):
        return web.Response(status=304, headers=headers)
    return json_response(config, headers=headers)


async def connector_heartbeat(request: web.Request) -> web.Response:
    connector = await _connector_identity(request)
    ctx = _ctx(request)
    body = await _body(request)
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
    await _run(request, ctx.store.heartbeat, connector.id, stats, _peer(request))
    if apps is not None:
        await _run(request, ctx.store.set_app_health, connector.id, apps)
    version = await _run(request, ctx.store.config_version)
    return json_response({"status": "ok", "config_version": version, "refresh_interval": ctx.settings.refresh_interval})


async def connector_renew(request: web.Request) -> web.Response:
    connector, presented = await _identity(request)
    ctx = _ctx(request)
    body = await _body(request)
    csr_pem = body.get("csr")
    if not isinstance(csr_pem, str):
        raise ApiError(400, "bad_request", "csr must be a PEM certificate signing request")
    csr = pki.load_csr(csr_pem)
    cert = pki.sign_csr(ctx.ca, csr, connector.id, datetime.timedelta(seconds=ctx.settings.cert_validity))
    await _run(request, ctx.store.renew_connector_cert, connector.id, cert.serial_number, _expires(cert), presented)
    log.info("connector certificate renewed", extra={"connector_id": connector.id})
    return json_response({"certificate": pki.cert_to_pem(cert).decode("ascii"), "ca": ctx.ca.cert_pem.decode("ascii")})


# -- admin endpoints (bearer token)


def _group_dict(group) -> dict[str, Any]:
    return {"name": group.name, "created": group.created, "apps": group.apps, "connectors": group.connectors}


@_require_admin
async def list_groups(request: web.Request) -> web.Response:
    groups = await _run(request, _ctx(request).store.list_groups)
    return json_response([_group_dict(g) for g in groups])


@_require_admin
async def create_group(request: web.Request) -> web.Response:
    body = await _body(request)
    group = await _run(request, _ctx(request).store.create_group, validate.name(body.get("name"), "group name"))
    log.info("group created", extra={"group": group.name})
    return json_response(_group_dict(group), status=201)


@_require_admin
async def delete_group(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    await _run(request, _ctx(request).store.delete_group, name)
    log.info("group deleted", extra={"group": name})
    return json_response({"deleted": name})


@_require_admin
async def rename_group(request: web.Request) -> web.Response:
    body = await _body(request)
    new = validate.name(body.get("name"), "new group name")
    group = await _run(request, _ctx(request).store.rename_group, request.match_info["name"], new)
    log.info("group renamed", extra={"group": new, "old": request.match_info["name"]})
    return json_response(_group_dict(group))


@_require_admin
async def create_token(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    body = await _body(request)
    group = validate.name(body.get("group", "default"), "group")
    ttl = validate.integer(body.get("ttl", 3600), "ttl", 1, ctx.settings.token_max_ttl)
    uses = validate.integer(body.get("uses", 1), "uses", 1, ctx.settings.token_max_uses)
    token = new_enrollment_token()
    expires = ctx.clock() + ttl
    token_id = await _run(request, ctx.store.create_token, token_hash(token), group, expires, uses)
    log.info("enrollment token created", extra={"token_id": token_id, "group": group, "ttl": ttl, "uses": uses})
    return json_response({"token": token, "id": token_id, "group": group, "expires": expires, "uses": uses}, status=201)


@_require_admin
async def list_tokens(request: web.Request) -> web.Response:
    tokens = await _run(request, _ctx(request).store.list_tokens)
    return json_response([t.to_dict() for t in tokens])


@_require_admin
async def revoke_token(request: web.Request) -> web.Response:
    token_id = request.match_info["id"]
    await _run(request, _ctx(request).store.revoke_token, token_id)
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


@_require_admin
async def list_apps(request: web.Request) -> web.Response:
    store = _ctx(request).store
    apps = await _run(request, store.list_apps)
    health = await _run(request, store.origin_health)
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


@_require_admin
async def create_app(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    app = _published(ctx, await _body(request))
    await _run(request, ctx.store.create_app, app)
    log.info("app published", extra={"app": app.name, "group": app.group, "proto": app.proto})
    return json_response(app.to_dict(), status=201)


@_require_admin
async def update_app(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    name = request.match_info["name"]
    current: App | None = await _run(request, ctx.store.get_app, name)
    if current is None:
        raise ApiError(404, "not_found", f"there is no app {name!r}; see `backhaul admin app list`")
    changes = await _body(request)
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
    await _run(request, ctx.store.update_app, name, app)
    log.info("app changed", extra={"app": app.name})
    return json_response(app.to_dict())


@_require_admin
async def delete_app(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    await _run(request, _ctx(request).store.delete_app, name)
    log.info("app deleted", extra={"app": name})
    return json_response({"deleted": name})


def connector_dict(connector: Connector, settings) -> dict[str, Any]:
    data = connector.to_dict()
    data["cpu_warning"] = connector.cpu > settings.cpu_warning
    return data


@_require_admin
async def list_connectors(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    connectors = await _run(request, ctx.store.list_connectors)
    return json_response([connector_dict(c, ctx.settings) for c in connectors])


@_require_admin
async def delete_connector(request: web.Request) -> web.Response:
    connector_id = request.match_info["id"]
    await _run(request, _ctx(request).store.revoke_connector, connector_id)
    log.info("connector deleted and its certificate revoked", extra={"connector_id": connector_id})
    return json_response({"deleted": connector_id})


@_require_admin
async def assign_connector(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    body = await _body(request)
    group = validate.name(body.get("group"), "group")
    connector = await _run(request, ctx.store.assign_connector, request.match_info["id"], group)
    log.info("connector assigned", extra={"connector_id": connector.id, "group": group})
    return json_response(connector_dict(connector, ctx.settings))


# -- releases (signed connector releases: backhaul.release; the relay stores and serves them,
# it checks each signature with the public key sent along, and holds no signing key)

#: Longest PEM public key accepted with an upload (an Ed25519 one is 113 bytes).
MAX_PUBLIC_KEY = 4096
_RELEASE_FIELDS = {"manifest", "signature", "public_key", "auto"}
_VERSION_RE = re.compile(release_manifest.VERSION_PATTERN)


def _b64_limit(size: int) -> int:
    """Length of the base64 text of ``size`` bytes."""
    return (size + 2) // 3 * 4


def _b64(value: Any, field: str, limit: int) -> bytes:
    if not isinstance(value, str) or len(value) > _b64_limit(limit):
        raise ApiError(400, "bad_request", f"{field} must be base64 text of at most {limit} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "bad_request", f"{field} is not valid base64") from None


def _release_refused(request: web.Request, exc: ReleaseRefused, **extra: Any) -> web.Response:
    log.warning("release refused", extra={"reason": exc.reason, "detail": str(exc), "peer": _peer(request), **extra})
    return json_response({"error": "release_refused", "reason": exc.reason, "detail": str(exc)}, status=400)


def _check_release_limits(manifest: release_manifest.Manifest, limits: ReleaseLimits) -> None:
    if len(manifest.files) > limits.max_files:
        raise ReleaseRefused("too_large", f"a release has at most {limits.max_files} files on this relay, this one {len(manifest.files)}")
    for entry in manifest.files:
        if entry.size > limits.max_file_size:
            raise ReleaseRefused("too_large", f"{entry.name} is {entry.size} bytes; files of a release are at most {limits.max_file_size}")
    total = sum(f.size for f in manifest.files)
    if total > limits.max_release_size:
        raise ReleaseRefused("too_large", f"the release is {total} bytes in all; at most {limits.max_release_size}")


@_require_admin
async def create_release(request: web.Request) -> web.Response:
    """Store a signed manifest; its files follow, one PUT each (a wheelhouse is tens of MB)."""
    ctx = _ctx(request)
    limits = ctx.settings.releases
    body = await _body(request)
    unknown = set(body) - _RELEASE_FIELDS
    if unknown:
        raise ApiError(400, "bad_request", f"unknown fields {', '.join(sorted(unknown))}; see GET /v1/openapi.json")
    manifest_bytes = _b64(body.get("manifest"), "manifest", limits.max_manifest)
    signature = _b64(body.get("signature"), "signature", release_manifest.SIGNATURE_SIZE)
    pem = body.get("public_key")
    if not isinstance(pem, str) or len(pem) > MAX_PUBLIC_KEY:
        raise ApiError(400, "bad_request", "public_key must be the publisher's PEM public key (`backhaul release keygen --public`)")
    auto = body.get("auto", False)
    if not isinstance(auto, bool):
        raise ApiError(400, "bad_request", "auto must be true or false")
    if len(manifest_bytes) > limits.max_manifest:
        raise ApiError(400, "bad_request", f"the manifest is larger than {limits.max_manifest} bytes")
    try:
        public = release_keys.parse_public(pem.encode("ascii", "replace"), "public_key")
    except ConfigError as exc:
        return _release_refused(request, ReleaseRefused("bad_key", str(exc)))
    sent_id = release_manifest.key_id(public)
    try:
        manifest = release_manifest.Manifest.from_bytes(manifest_bytes)
        if manifest.key_id != sent_id:
            raise ReleaseRefused(
                "unknown_key", f"the manifest names signing key {manifest.key_id}, but the public key sent is {sent_id}"
            )
        # The same checks a connector makes (but the version: the relay has no installed one).
        manifest = release_manifest.verify(manifest_bytes, signature, [public], now=ctx.clock(), installed=None)
        release_manifest.check_project_wheel(manifest)
        _check_release_limits(manifest, limits)
    except ReleaseRefused as exc:
        return _release_refused(request, exc, key_id=sent_id)
    record = Release(
        version=manifest.version,
        manifest=manifest_bytes,
        signature=signature,
        public_key=release_keys.public_pem(public).decode("ascii"),
        key_id=manifest.key_id,
        issued=manifest.issued,
        expires=manifest.expires,
        auto=auto,
        state="incomplete",
        created=ctx.clock(),
        files=tuple(ReleaseFile(f.name, f.sha256, f.size) for f in manifest.files),
    )
    stored, created = await _run(
        request, functools.partial(ctx.store.create_release, record, max_stored=limits.max_stored, max_records=limits.max_records)
    )
    log.info(
        "release stored; waiting for its files" if created else "release upload resumed",
        extra={"version": stored.version, "key_id": stored.key_id, "auto": stored.auto, "files": len(stored.files), "size": stored.size},
    )
    return json_response(stored.to_dict(), status=201 if created else 200)


@_require_admin
async def list_releases(request: web.Request) -> web.Response:
    store = _ctx(request).store
    releases = await _run(request, store.list_releases)
    groups = await _run(request, release_groups, store, [r.version for r in releases])
    return json_response([{**r.to_dict(), "groups": groups[r.version]} for r in releases])


@_require_admin
async def revoke_release(request: web.Request) -> web.Response:
    version = request.match_info["version"]
    release = await _run(request, _ctx(request).store.revoke_release, version)
    log.warning("release revoked: it is never served again", extra={"version": release.version})
    return json_response({"revoked": release.version})


async def _refuse_upload(request: web.Request, status: int, payload: dict[str, Any]) -> web.StreamResponse:
    """Answer, then close the connection: aiohttp would otherwise read (and drop) the rest
    of the body to keep the connection, and nothing past the manifest's size is read."""
    response = web.Response(body=orjson.dumps(payload), status=status, content_type="application/json")
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()
    return response


@_require_admin
async def upload_release_file(request: web.Request) -> web.StreamResponse:
    """One file of an incomplete release, as a raw body of exactly the manifest's size."""
    ctx = _ctx(request)
    version, name = request.match_info["version"], request.match_info["name"]
    release: Release | None = await _run(request, ctx.store.get_release, version)
    entry = next((f for f in release.files if f.name == name), None) if release is not None else None
    if release is None or entry is None:
        raise ApiError(404, "not_found", f"there is no release {version!r} with a file {name!r}; POST /v1/releases with its manifest first")
    if release.state == "revoked":
        raise ApiError(410, "revoked", f"release {version} is revoked")
    declared = request.content_length
    if declared is not None and declared != entry.size:
        refused = ReleaseRefused("bad_size", f"{name} is {entry.size} bytes in the signed manifest; the upload says {declared}")
        log.warning("release file refused", extra={"version": version, "file": name, "reason": "bad_size", "sent": declared})
        status = 413 if declared > entry.size else 400
        return await _refuse_upload(request, status, {"error": "release_refused", "reason": refused.reason, "detail": str(refused)})
    upload = await _run(request, ctx.store.begin_file_upload, version, name)
    chunk_size = ctx.settings.releases.chunk_size
    digest = hashlib.sha256()
    received, seq = 0, 0
    buffer = bytearray()
    try:
        while True:
            # Never more than one byte past the size: that byte alone proves the body is too long.
            want = min(chunk_size - len(buffer), entry.size + 1 - received)
            piece = await request.content.read(want) if want > 0 else b""
            if piece:
                received += len(piece)
                buffer += piece
            if received > entry.size:
                await _run(request, ctx.store.abort_file_upload, version, name, upload)
                log.warning("release file refused", extra={"version": version, "file": name, "reason": "bad_size", "sent": received})
                detail = f"{name} is longer than the {entry.size} bytes the signed manifest says; nothing past that was read"
                return await _refuse_upload(request, 413, {"error": "release_refused", "reason": "bad_size", "detail": detail})
            if buffer and (len(buffer) >= chunk_size or not piece):
                digest.update(buffer)
                await _run(request, ctx.store.put_file_chunk, version, name, upload, seq, bytes(buffer))
                seq += 1
                buffer.clear()
            if not piece:
                break
    except BaseException:
        # A broken connection, a store error: drop what came so far; the next PUT starts over.
        with contextlib.suppress(StoreError):
            await asyncio.shield(_run(request, ctx.store.abort_file_upload, version, name, upload))
        raise
    try:
        if received != entry.size:
            raise ReleaseRefused("bad_size", f"{name} came with {received} bytes; the signed manifest says {entry.size}")
        if digest.hexdigest() != entry.sha256:
            raise ReleaseRefused("bad_hash", f"{name} has sha256 {digest.hexdigest()}; the signed manifest says {entry.sha256}")
    except ReleaseRefused as exc:
        await _run(request, ctx.store.abort_file_upload, version, name, upload)
        return _release_refused(request, exc, version=version, file=name)
    stored = await _run(request, ctx.store.finish_file_upload, version, name, upload)
    log.info("release file stored", extra={"version": version, "file": name, "size": entry.size, "state": stored.state})
    if stored.state == "published":
        log.info("release published", extra={"version": version, "auto": stored.auto, "files": len(stored.files)})
    return json_response({"version": version, "name": name, "state": stored.state, "missing": stored.missing})


def _query_version(request: web.Request, key: str) -> str | None:
    value = request.query.get(key)
    if value is None:
        return None
    if len(value) > release_manifest.MAX_VERSION or not _VERSION_RE.fullmatch(value):
        raise ApiError(400, "bad_request", f"{key} must be a PEP 440 version in normal form, e.g. 1.2.0")
    return value


def _newest(releases: list[Release], installed: str | None, now: float) -> Release | None:
    """The newest published, unexpired release newer than ``installed`` (PEP 440 order)."""
    floor = Version(installed) if installed is not None else None
    best: Release | None = None
    for release in releases:
        if release.state != "published" or release.expires <= now:
            continue
        version = Version(release.version)
        if floor is not None and version <= floor:
            continue
        if best is None or version > Version(best.version):
            best = release
    return best


async def _updates_answer(request: web.Request, connector: Connector, release: Release | None) -> dict[str, Any]:
    """The answer of GET /v1/updates for ``connector``: the release it should look at, if any.

    Everything a connector needs to decide is in it (the signed manifest and signature, which
    it checks against its own pinned keys); ``auto`` is the admin's choice of rolling it out
    without a person. The rollout state of the connector's group is added here too.
    """
    answer: dict[str, Any] = {"release": None}
    if release is not None:
        answer["release"] = {
            "version": release.version,
            "manifest": base64.b64encode(release.manifest).decode("ascii"),
            "signature": base64.b64encode(release.signature).decode("ascii"),
            "auto": release.auto,
            "files": [{"name": f.name, "sha256": f.sha256, "size": f.size} for f in release.files],
        }
    answer["rollout"] = await _run(request, rollout_for_group, _ctx(request).store, connector.group)
    return answer


async def connector_updates(request: web.Request) -> web.Response:
    connector = await _connector_identity(request)
    ctx = _ctx(request)
    wanted = _query_version(request, "version")
    installed = _query_version(request, "installed")
    if wanted is not None:
        release = await _run(request, ctx.store.get_release, wanted)
        if release is None or release.state == "incomplete":
            raise ApiError(404, "not_found", f"there is no published release {wanted}")
        if release.state == "revoked":
            raise ApiError(410, "revoked", f"release {wanted} is revoked: do not install it")
    else:
        release = _newest(await _run(request, ctx.store.list_releases), installed, ctx.clock())
    return json_response(await _updates_answer(request, connector, release), headers={"Cache-Control": "no-cache"})


async def connector_release_file(request: web.Request) -> web.StreamResponse:
    """The bytes of one file of a published release, a stored chunk at a time."""
    await _connector_identity(request)
    ctx = _ctx(request)
    version, name = request.match_info["version"], request.match_info["name"]
    release: Release | None = await _run(request, ctx.store.get_release, version)
    entry = next((f for f in release.files if f.name == name), None) if release is not None else None
    if release is not None and release.state == "revoked":
        raise ApiError(410, "revoked", f"release {version} is revoked: do not install it")
    if release is None or entry is None or release.state != "published":
        raise ApiError(404, "not_found", f"there is no published release {version!r} with a file {name!r}")
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream", "Cache-Control": "no-cache"})
    response.content_length = entry.size
    await response.prepare(request)
    sent, seq = 0, 0
    while sent < entry.size:
        chunk = await _run(request, ctx.store.read_file_chunk, version, name, seq)
        if chunk is None or sent + len(chunk) > entry.size:
            # Revoked while it was being sent: cut the body short, so the client cannot take
            # it for whole (it checks the size and SHA-256 anyway).
            log.warning("release file cut short: revoked while it was served", extra={"version": version, "file": name})
            request.protocol.force_close()
            return response
        await response.write(chunk)
        sent += len(chunk)
        seq += 1
    await response.write_eof()
    return response


# -- rollout: update leases, update reports, pause/resume/halt, group update settings
# (docs/architecture.md, "Rollout"). Connector calls authenticate with the client
# certificate, as the config pull does; the rest with the admin token.

#: The rollout's limits (config.RolloutSettings).
ROLLOUT = web.AppKey("backhaul_rollout_settings", RolloutSettings)
#: Update reports by step, this worker's: the relay publishes them as metrics (relay.metrics).
UPDATE_REPORTS = web.AppKey("backhaul_update_reports", dict)
#: Largest fencing token a request may name (the store's counter starts at 1 and grows by one per grant).
MAX_LEASE_TOKEN = validate.MAX_COUNTER


def rollout_for_group(store, group: str) -> dict[str, Any]:
    """The ``"rollout"`` part of GET /v1/updates for a connector of ``group`` (a blocking store call):
    whether its group's rollout is paused, and why it is halted (None: it is not)."""
    state = store.group_rollout(group, listed_failures=1)
    return {"paused": state.paused, "halted": state.halted}


def release_groups(store, versions: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """The rollout of each release per group, for GET /v1/releases (a blocking store call):
    ``{version: {group: {connectors, on, updating, failed, rolled_back, halted}}}``.

    ``on`` counts the group's connectors that run the version, ``updating`` names the one
    holding the group's update lease for it, ``failed``/``rolled_back`` count the connectors
    where it failed, ``halted`` is the halt reason when this version halted the group.
    A group is listed when it has connectors or a failure of that version.
    """
    failures = store.update_failure_counts()
    names: dict[str, str] = {}
    out: dict[str, dict[str, dict[str, Any]]] = {v: {} for v in versions}
    for state in store.list_rollouts(0):
        holder = None
        if state.lease is not None:
            if state.lease.connector_id not in names:
                record = store.get_connector(state.lease.connector_id)
                names[state.lease.connector_id] = record.name if record is not None else state.lease.connector_id
            holder = names[state.lease.connector_id]
        connectors = sum(state.versions.values())
        for version in versions:
            failed = failures.get((state.group, version, "failed"), 0)
            rolled_back = failures.get((state.group, version, "rolled_back"), 0)
            if not connectors and not failed and not rolled_back:
                continue
            out[version][state.group] = {
                "connectors": connectors,
                "on": state.versions.get(version, 0),
                "updating": holder if state.lease is not None and state.lease.version == version else None,
                "failed": failed,
                "rolled_back": rolled_back,
                "halted": state.halted if state.halted is not None and state.halted_version == version else None,
            }
    return out


def _lease_refused(exc: LeaseRefused) -> web.Response:
    return json_response({"error": "lease_refused", "detail": str(exc), "reason": exc.reason}, status=409)


def _report_version(body: dict[str, Any]) -> str:
    version = validate.text(body.get("version"), "version")
    if not version:
        raise ApiError(400, "bad_request", "version must name the release the update is for, e.g. \"1.4.0\"")
    return version


def _lease_token(value: Any) -> int:
    return validate.integer(value, "token", 1, MAX_LEASE_TOKEN)


async def update_lease(request: web.Request) -> web.Response:
    connector = await _connector_identity(request)
    ctx = _ctx(request)
    version = _report_version(await _body(request))
    seconds = request.app[ROLLOUT].lease_seconds
    try:
        lease = await _run(request, ctx.store.acquire_update_lease, connector.id, version, seconds)
    except LeaseRefused as exc:
        log.info(
            "update lease refused",
            extra={"connector_id": connector.id, "group": connector.group, "version": version, "reason": exc.reason, "detail": str(exc)},
        )
        return _lease_refused(exc)
    log.info(
        "update lease granted",
        extra={"connector_id": connector.id, "group": lease.group, "version": version, "token": lease.token, "expires": lease.expires},
    )
    return json_response(
        {"token": lease.token, "expires": lease.expires, "group": lease.group, "renew_every": request.app[ROLLOUT].renew_every}
    )


async def update_lease_renew(request: web.Request) -> web.Response:
    connector = await _connector_identity(request)
    ctx = _ctx(request)
    token = _lease_token((await _body(request)).get("token"))
    try:
        lease = await _run(request, ctx.store.renew_update_lease, connector.id, token, request.app[ROLLOUT].lease_seconds)
    except LeaseRefused as exc:
        log.warning(
            "update lease renewal refused: the lease is not held any more",
            extra={"connector_id": connector.id, "group": connector.group, "token": token, "reason": exc.reason},
        )
        return _lease_refused(exc)
    log.debug("update lease renewed", extra={"connector_id": connector.id, "token": token, "expires": lease.expires})
    return json_response({"expires": lease.expires})


async def update_report(request: web.Request) -> web.Response:
    connector = await _connector_identity(request)
    ctx = _ctx(request)
    body = await _body(request)
    version = _report_version(body)
    step = body.get("step")
    if step not in UPDATE_STEPS:
        raise ApiError(400, "bad_request", f"step must be one of {', '.join(UPDATE_STEPS)}, not {step!r}")
    reason = validate.text(body.get("reason"), "reason")
    token = None if body.get("token") is None else _lease_token(body.get("token"))
    settings = request.app[ROLLOUT]
    outcome = await _run(
        request,
        functools.partial(
            ctx.store.report_update, keep=settings.reports_per_connector, keep_failures=settings.failures_per_connector
        ),
        connector.id, version, step, reason, token,
    )
    counts = request.app[UPDATE_REPORTS]
    counts[step] = counts.get(step, 0) + 1
    # Every step goes to the relay's log, so the admin log tells each update's story.
    level = logging.WARNING if step in HALTING_STEPS or step == "refused" else logging.INFO
    log.log(
        level,
        "update step reported",
        extra={
            "connector_id": connector.id, "connector": connector.name, "group": outcome.group, "version": version,
            "step": step, "reason": reason, "token": token, "lease_released": outcome.released,
        },
    )
    if outcome.halted:
        log.warning(
            "rollout halted: an update failed",
            extra={"group": outcome.group, "connector_id": connector.id, "version": version, "step": step, "reason": reason},
        )
    return json_response({"status": "ok", "released": outcome.released, "halted": outcome.halted})


@_require_admin
async def rollout_status(request: web.Request) -> web.Response:
    listed = request.app[ROLLOUT].listed_failures
    states = await _run(request, _ctx(request).store.list_rollouts, listed)
    return json_response([s.to_dict() for s in states])


def _rollout_target(body: dict[str, Any]) -> str | None:
    unknown = set(body) - {"group"}
    if unknown:
        raise ApiError(400, "bad_request", f"unknown fields {', '.join(sorted(unknown))}; send {{\"group\": NAME}} or {{}} for every group")
    group = body.get("group")
    return None if group is None else validate.name(group, "group")


@_require_admin
async def rollout_pause(request: web.Request) -> web.Response:
    group = _rollout_target(await _body(request))
    changed = await _run(request, _ctx(request).store.pause_rollout, group)
    log.info("rollout paused", extra={"group": group or "*", "groups": changed})
    return json_response({"paused": changed})


@_require_admin
async def rollout_resume(request: web.Request) -> web.Response:
    group = _rollout_target(await _body(request))
    changed = await _run(request, _ctx(request).store.resume_rollout, group)
    log.info("rollout resumed (pause and halt cleared)", extra={"group": group or "*", "groups": changed})
    return json_response({"resumed": changed})


@_require_admin
async def group_updates(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    body = await _body(request)
    unknown = set(body) - {"allow_downtime", "window"}
    if unknown:
        raise ApiError(400, "bad_request", f"unknown fields {', '.join(sorted(unknown))}; a group's update settings are allow_downtime and window")
    changes: dict[str, Any] = {}
    if "allow_downtime" in body:
        changes["allow_downtime"] = validate.boolean(body["allow_downtime"], "allow_downtime")
    if "window" in body:
        changes["window"] = validate.window(body["window"])
    state = await _run(request, _ctx(request).store.set_group_updates, name, changes)
    log.info("group update settings changed", extra={"group": name, **changes})
    return json_response(state.to_dict())


@_require_admin
async def connector_update_reports(request: web.Request) -> web.Response:
    store = _ctx(request).store
    connector_id = request.match_info["id"]
    record = await _run(request, store.get_connector, connector_id)
    if record is None or record.revoked:
        raise ApiError(404, "not_found", f"there is no connector {connector_id!r}; see `backhaul admin connector list`")
    reports = await _run(request, store.update_reports, connector_id)
    return json_response([r.to_dict() for r in reports])


def _add_rollout_routes(app: web.Application, settings: RolloutSettings, update_reports: dict[str, int] | None) -> None:
    app[ROLLOUT] = settings
    app[UPDATE_REPORTS] = update_reports if update_reports is not None else {}
    r = app.router
    r.add_post("/v1/updates/lease", update_lease)
    r.add_post("/v1/updates/lease/renew", update_lease_renew)
    r.add_post("/v1/updates/report", update_report)
    r.add_get("/v1/rollout", rollout_status)
    r.add_post("/v1/rollout/pause", rollout_pause)
    r.add_post("/v1/rollout/resume", rollout_resume)
    r.add_patch("/v1/groups/{name}/updates", group_updates)
    r.add_get("/v1/connectors/{id}/updates", connector_update_reports)


# -- housekeeping


async def _housekeeping(app: web.Application):
    """Remove long-unseen connectors, expired revocations and dead tokens, periodically."""
    ctx = app[CONTEXT]
    interval = ctx.settings.housekeeping_interval

    async def loop() -> None:
        while True:
            try:
                removed = await asyncio.get_running_loop().run_in_executor(
                    None, ctx.store.prune, ctx.settings.remove_unseen_after
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
    ctx: ControlContext, *, rollout: RolloutSettings = RolloutSettings(), update_reports: dict[str, int] | None = None
) -> web.Application:
    """The control API as an aiohttp Application (no socket of its own).

    ``update_reports`` is where update reports are counted by step (the relay's metrics);
    None: a table of the app's own."""
    app = web.Application(middlewares=[_errors], client_max_size=ctx.settings.max_body)
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
    r.add_delete("/v1/connectors/{id}", delete_connector)
    r.add_put("/v1/connectors/{id}/group", assign_connector)
    # -- releases
    r.add_post("/v1/releases", create_release)
    r.add_get("/v1/releases", list_releases)
    r.add_delete("/v1/releases/{version}", revoke_release)
    r.add_put("/v1/releases/{version}/files/{name}", upload_release_file)
    r.add_get("/v1/releases/{version}/files/{name}", connector_release_file)
    r.add_get("/v1/updates", connector_updates)
    _add_rollout_routes(app, rollout, update_reports)
    app.cleanup_ctx.append(_housekeeping)
    return app
