"""The admin center's routes on the control API's aiohttp app: sign-in (admin token or
OpenID Connect), sign-out, the pages (their data: pages.py), their static files, and the
security headers every answer under /admin/ carries."""

from __future__ import annotations

import datetime
import hmac
import logging
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import quote

import aiohttp_jinja2
import jinja2
from aiohttp import web

from backhaul.center import adminlog, csrf, oidc, pages, sessions
from backhaul.center.keys import OIDC, RECORDS, SAMPLES, SETTINGS, SIGN_IN_LIMITER, LOG_DIR, TRAFFIC
from backhaul.center.samples import HEIGHT, WIDTH, ByteSamples
from backhaul.config import AdminCenterSettings, OidcSettings
from backhaul.control.ratelimit import AddressLimiter
from backhaul.errors import IdentityProviderError
from backhaul.control.web import CONTEXT, ApiError, admin_session, blocking, context_of, peer_of, token_hash

log = logging.getLogger("backhaul.center")

STATIC = Path(__file__).parent / "static"
PREFIX = "/admin/"

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}
#: The pages: path under /admin/, template, title (the navigation, in order).
PAGES = (
    ("", "overview.html", "Overview"),
    ("connectors", "connectors.html", "Connectors"),
    ("apps", "apps.html", "Apps"),
    ("groups", "groups.html", "Groups"),
    ("tokens", "tokens.html", "Tokens"),
    ("releases", "releases.html", "Releases"),
    ("log", "log.html", "Admin log"),
)


@web.middleware
async def security_headers(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """CSP and friends on everything under /admin/; pages (not the static files) are never cached."""
    response = await handler(request)
    if request.path == "/admin" or request.path.startswith(PREFIX):
        response.headers.update(SECURITY_HEADERS)
        if not request.path.startswith(PREFIX + "static/"):
            response.headers["Cache-Control"] = "no-store"
    return response


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


# -- formatting for the templates


def _when(value: Any) -> str:
    if value is None:
        return "—"
    return datetime.datetime.fromtimestamp(float(value), datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _rate(value: float | None) -> str:
    if value is None:
        return "—"
    for unit in ("B/s", "KB/s", "MB/s", "GB/s"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B/s" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB/s"


def _segment(value: Any) -> str:
    """A value as one URL path segment (nothing left that would end it)."""
    return quote(str(value), safe="")


def _environment(app: web.Application) -> None:
    env = aiohttp_jinja2.setup(
        app,
        loader=jinja2.PackageLoader("backhaul.center", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(when=_when, rate=_rate, segment=_segment)
    env.globals.update(PAGES=PAGES, CHART_WIDTH=WIDTH, CHART_HEIGHT=HEIGHT)


# -- sign-in and sign-out


def _signin_page(request: web.Request, error: str = "", status: int = 200) -> web.Response:
    return aiohttp_jinja2.render_template("signin.html", request, {"error": error, "title": "Sign in", "oidc": request.app[OIDC].settings.issuer if OIDC in request.app else ""}, status=status)


async def signin_form(request: web.Request) -> web.Response:
    return _signin_page(request)


def _set_cookie(response: web.StreamResponse, value: str, max_age: int) -> None:
    response.set_cookie(sessions.COOKIE, value, max_age=max_age, path="/", secure=True, httponly=True, samesite="Strict")


async def _key(request: web.Request) -> bytes | None:
    """The center's signing key now (None: the relay has no admin token)."""
    ctx = context_of(request)
    state = await blocking(request, ctx.store.center_state)
    stored = await blocking(request, ctx.store.admin_token_hash)
    return None if stored is None else sessions.mac_key(state[0], stored)


async def start_session(request: web.Request, subject: str, *, cross_site: bool = False) -> web.Response:
    """Sign ``subject`` in: the session cookie, and on to the overview. After a cross-site
    redirect (the issuer's) a page leads on instead of a redirect: a SameSite=Strict cookie
    set there would not be sent with the redirect's request."""
    ctx = context_of(request)
    settings = request.app[SETTINGS]
    key = await _key(request)
    if key is None:
        return _signin_page(request, "the relay has no admin token; run `backhaul service init`", 503)
    _, cookie = sessions.issue(key, subject, ctx.clock(), settings.session_lifetime)
    log.info("admin center: signed in", extra={"subject": subject, "peer": peer_of(request)})
    if cross_site:
        response = aiohttp_jinja2.render_template("signed_in.html", request, {"title": "Signed in", "subject": subject})
        oidc.flow_cookie(response, "", 0)
    else:
        response = _see_other(PREFIX)
    _set_cookie(response, cookie, int(settings.session_lifetime))
    return response


async def signin(request: web.Request) -> web.StreamResponse:
    limiter = request.app[SIGN_IN_LIMITER]
    peer = peer_of(request)
    wait = limiter.retry_after(peer)
    if wait:
        if limiter.should_log(peer):
            log.warning("admin center sign-ins refused from this address for a while: too many wrong tokens", extra={"peer": peer, "retry_after": wait})
        response = _signin_page(request, f"too many failed sign-ins from this address; retry in {wait} s", 429)
        response.headers["Retry-After"] = str(wait)
        return response
    try:
        csrf.check_origin(request.headers, request.host)
    except sessions.Refused as exc:
        log.warning("admin center sign-in refused", extra={"peer": peer, "reason": exc.code})
        return _signin_page(request, exc.detail, exc.status)
    form = await request.post()
    token = form.get("token")
    stored = await blocking(request, context_of(request).store.admin_token_hash)
    if (
        not isinstance(token, str) or not token.strip() or len(token) > 512 or stored is None
        or not hmac.compare_digest(token_hash(token.strip()), stored)
    ):
        limiter.failed(peer)
        log.warning("admin center sign-in refused: wrong admin token", extra={"peer": peer})
        return _signin_page(request, "that is not the admin token (it is in DATA_DIR/admin.token)", 401)
    return await start_session(request, "admin token")


async def signout(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    field = form.get("csrf")
    session, _ = await admin_session(request, field if isinstance(field, str) else None)
    settings = request.app[SETTINGS]
    rotated = await blocking(request, context_of(request).store.center_sign_out, session.id, session.expires, settings.max_signed_out)
    if rotated:
        log.warning(
            "admin center: the signed-out list was full, so the session key was replaced and every session ended",
            extra={"most": settings.max_signed_out},
        )
    log.info("admin center: signed out", extra={"subject": session.subject, "peer": peer_of(request)})
    response = _see_other(PREFIX + "signin")
    response.del_cookie(sessions.COOKIE, path="/", secure=True, httponly=True, samesite="Strict")
    return response


async def _oidc_key(request: web.Request) -> bytes | web.Response:
    """The signing key for an OIDC step, or the page that says why there is none."""
    if OIDC not in request.app:
        raise web.HTTPNotFound()
    key = await _key(request)
    if key is None:
        return _signin_page(request, "the relay has no admin token; run `backhaul service init`", 503)
    return key


async def oidc_login(request: web.Request) -> web.StreamResponse:
    key = await _oidc_key(request)
    if isinstance(key, web.Response):
        return key
    try:
        location, flow = await request.app[OIDC].login(key, request.host, context_of(request).clock())
    except IdentityProviderError as exc:
        log.error("admin center: cannot start an OIDC sign-in", extra={"error": str(exc)})
        return _signin_page(request, f"the identity provider cannot be reached: {exc}", 502)
    response = web.Response(status=302, headers={"Location": location})
    oidc.flow_cookie(response, flow, int(request.app[OIDC].settings.login_lifetime))
    return response


async def oidc_callback(request: web.Request) -> web.StreamResponse:
    key = await _oidc_key(request)
    if isinstance(key, web.Response):
        return key
    try:
        subject = await request.app[OIDC].finish(
            key, request.query, request.cookies.get(oidc.FLOW_COOKIE, ""), context_of(request).clock()
        )
    except sessions.Refused as exc:
        log.warning("admin center: OIDC sign-in refused", extra={"peer": peer_of(request), "reason": exc.code})
        response = _signin_page(request, exc.detail, exc.status)
        oidc.flow_cookie(response, "", 0)
        return response
    return await start_session(request, subject, cross_site=True)


# -- pages


def _page(path: str, template: str, title: str, build: Callable[[web.Request], Awaitable[dict[str, Any]]]):
    async def handler(request: web.Request) -> web.StreamResponse:
        fragment = request.query.get("fragment") == "1"
        if sessions.COOKIE not in request.cookies and not fragment:
            return _see_other(PREFIX + "signin")  # no session at all: not worth a log line
        try:
            session, key = await admin_session(request)
        except ApiError as exc:
            if fragment or exc.status != 401:
                raise
            return _see_other(PREFIX + "signin")
        data = await build(request)
        data.update(
            title=title, here=path, fragment=fragment, subject=session.subject,
            csrf_token=sessions.csrf_token(key, session), refresh=request.app[SETTINGS].refresh_seconds,
            query=dict(request.query),
        )
        return aiohttp_jinja2.render_template(template, request, data)

    return handler


async def to_center(request: web.Request) -> web.StreamResponse:
    return _see_other(PREFIX)


async def _records(app: web.Application):
    """This worker's log records for the log view, while the app runs."""
    ring = app[RECORDS]
    logger = logging.getLogger("backhaul")
    logger.addHandler(ring)
    yield
    logger.removeHandler(ring)


async def _close_oidc(app: web.Application):
    yield
    await app[OIDC].close()


def setup(
    app: web.Application,
    settings: AdminCenterSettings,
    issuer: OidcSettings | None = None,
    traffic: Callable[[], dict[str, int]] | None = None,
    log_dir: Path | None = None,
) -> None:
    """Mount the admin center on the control API's app (before it starts); with ``issuer``
    and ``settings.oidc_claim`` it also signs admins in through OpenID Connect. ``traffic``
    (blocking) gives each connector's bytes from the relay's own counters for the charts;
    ``log_dir`` is where the relay writes its admin log, for the log view."""
    app[SETTINGS] = settings
    app[SIGN_IN_LIMITER] = AddressLimiter(settings.sign_in, app[CONTEXT].clock)
    app[SAMPLES] = ByteSamples(settings)
    if traffic is not None:
        app[TRAFFIC] = traffic
    if log_dir is not None:
        app[LOG_DIR] = log_dir
    app[RECORDS] = adminlog.RecordRing(settings.log_records)
    app.middlewares.insert(0, security_headers)
    _environment(app)
    r = app.router
    r.add_get("/", to_center)
    r.add_get("/admin", to_center)
    r.add_get(PREFIX + "signin", signin_form)
    r.add_post(PREFIX + "signin", signin)
    r.add_post(PREFIX + "signout", signout)
    r.add_static(PREFIX + "static/", STATIC)
    if issuer is not None and settings.oidc_claim is not None:
        app[OIDC] = oidc.AdminOidc(issuer, settings.oidc_claim)
        app.cleanup_ctx.append(_close_oidc)
    r.add_get(PREFIX + "oidc/login", oidc_login)
    r.add_get(oidc.CALLBACK_PATH, oidc_callback)
    for path, template, title in PAGES:
        r.add_get(PREFIX + path, _page(path, template, title, pages.BUILDERS[path]))
    app.cleanup_ctx.append(_records)
