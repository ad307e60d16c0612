"""The control API's request plumbing, shared by its endpoint modules: the one JSON error
shape, request context, blocking store calls off the loop, admin and connector authentication."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import secrets
from typing import Any, Awaitable, Callable

import orjson
from aiohttp import web

from backhaul import tlsconfig
from backhaul.center import guard, sessions
from backhaul.control import validate
from backhaul.control.context import ControlContext
from backhaul.errors import CertificateError
from backhaul.store import (
    Conflict,
    Connector,
    InvalidToken,
    LimitReached,
    NotFound,
    StoreError,
    Unavailable,
)

log = logging.getLogger("backhaul.control.api")

CONTEXT = web.AppKey("backhaul_control_context", ControlContext)
ENROLLMENT_TOKEN_PREFIX = "bht_"
ADMIN_TOKEN_PREFIX = "bha_"
MAX_TOKEN = validate.MAX_TOKEN


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
async def errors_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
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


def context_of(request: web.Request) -> ControlContext:
    return request.app[CONTEXT]


async def blocking(request: web.Request, fn: Callable[..., Any], *args: Any) -> Any:
    """Run a short blocking store call off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))


async def read_json(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "bad_json", f"the request body is not valid JSON ({exc})") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "bad_json", "the request body must be a JSON object")
    return body


# -- authentication


def require_admin(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        if not header and sessions.COOKIE in request.cookies:
            await admin_session(request)
            return await handler(request)
        scheme, _, presented = header.partition(" ")
        stored = await blocking(request, context_of(request).store.admin_token_hash)
        if scheme.lower() != "bearer" or not presented.strip() or len(presented) > MAX_TOKEN or stored is None:
            raise ApiError(401, "unauthorized", "send the admin token as 'Authorization: Bearer TOKEN' (it is in DATA_DIR/admin.token)")
        if not hmac.compare_digest(token_hash(presented.strip()), stored):
            raise ApiError(401, "unauthorized", "the admin token is wrong; use the one in DATA_DIR/admin.token")
        return await handler(request)

    return wrapped


async def admin_session(request: web.Request, form_csrf: str | None = None) -> tuple[sessions.Session, bytes]:
    """The admin-center session of this request's cookie (and its key), or ApiError: the
    second way to call an admin endpoint, for the page's script (center/guard.py)."""
    ctx = context_of(request)
    state = await blocking(request, ctx.store.center_state)
    stored = await blocking(request, ctx.store.admin_token_hash)
    try:
        return guard.authorize(
            state, stored, request.cookies.get(sessions.COOKIE, ""), request.method, request.headers,
            request.host, ctx.clock(), form_csrf,
        )
    except sessions.Refused as exc:
        # A change from another site or without the page's token is worth a warning; an
        # expired or signed-out session (a tab left open) is routine.
        level = logging.WARNING if exc.status == 403 else logging.INFO
        log.log(level, "admin center request refused", extra={"peer": peer_of(request), "path": request.path, "reason": exc.code})
        raise ApiError(exc.status, exc.code, exc.detail) from None


async def connector_identity(request: web.Request) -> Connector:
    """The connector named by the verified client certificate of this connection."""
    connector, _ = await identity(request)
    return connector


async def identity(request: web.Request) -> tuple[Connector, int]:
    """The connector of this connection's client certificate, and that certificate's serial."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    connector_id = tlsconfig.peer_connector_id(ssl_object)
    serial = tlsconfig.peer_cert_serial(ssl_object)
    if connector_id is None:
        raise ApiError(403, "no_client_certificate", "connector calls need the connector's client certificate; register the connector first")
    ctx = context_of(request)
    connector = await blocking(request, ctx.store.get_connector, connector_id)
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
        await blocking(request, ctx.store.retire_previous_cert, connector.id, serial, grace_end)
        log.info(
            "connector uses its renewed certificate; the previous one is refused after the grace",
            extra={"connector_id": connector.id, "grace_seconds": ctx.settings.replaced_cert_grace},
        )
    return connector, serial


def peer_of(request: web.Request) -> str:
    return request.remote or ""


