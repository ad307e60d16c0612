"""Origin health: whether this connector can reach each app's target, checked and reported.

Every app of the pulled configuration is checked in rounds, one every
``HealthChecks.interval`` seconds (jittered, so connectors and workers do not check in
step), at most ``concurrency`` checks at once, each bounded by ``timeout``:

- tcp apps, and http apps without a ``health_path``: a TCP connect to the target;
- http apps with a ``health_path``: an HTTP GET of that path on the app's origin (the
  scheme, host and port of its internal URL), over TLS for https verified exactly as the
  app's streams are (connector/http_target.py: the app's ``backend_ca``, or none with
  ``backend_insecure``, else the system's CAs); a 2xx or 3xx answer means reachable;
- udp apps are not checked (nothing to connect to proves anything): their state stays
  unknown.

The health path is checked again here before anything is dialed, whatever the relay
sent (an older relay took ``//host:port/x``, which made the connector GET another host
of the private network): a path that is not a plain path on the origin (two leading
slashes, a backslash, a scheme, spaces or control characters, too long) leaves the app
unchecked (unknown, so routing goes on as if reachable), logged once as an error, and
the check URL is built from the origin's parts so that no path can carry an authority.

A state only flips after ``fall`` failed checks in a row (down) or ``rise`` good ones
(up), so one lost SYN does not move traffic. Unknown (never checked yet, or the app's
target just changed) is reported as absent, and the relay routes as if reachable, so a
connector that does not check (an older one) keeps working.

Each change is handed to ``on_change`` at once as ``{app: True | False | None}`` (None:
unknown again, e.g. the app was removed); the agent sends it to the relay over every
tunnel (``control_messages``) and the whole known state in every new tunnel and in
each heartbeat.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import socket
import ssl
import time
from typing import Any, Callable

import aiohttp
import orjson
import yarl

from backhaul import __version__
from backhaul.config import HealthChecks
from backhaul.connector.http_target import BackendTls
from backhaul.errors import ConfigError
from backhaul.transport.sockets import parse_hostport

log = logging.getLogger("backhaul.connector.health")

#: Longest health path the connector GETs: the control API's bound (control/validate.py).
MAX_HEALTH_PATH = 1024
#: One "/", then anything printable but "/" or "\\", then printable ASCII without
#: space, "#" or "\\" (the control API's HEALTH_PATH_PATTERN, read again here).
_HEALTH_PATH = re.compile(r"/(?![/\\])[\x21\x22\x24-\x5b\x5d-\x7e]*")

#: Type of the CONTROL message that carries origin health (protocol.md).
HEALTH_MESSAGE = "health"
#: Bytes of app entries in one CONTROL message; well under MAX_CONTROL_PAYLOAD (16 KiB).
MESSAGE_BUDGET = 12 * 1024
#: Bytes of app entries in one heartbeat; the control API reads bodies of at most 64 KiB.
HEARTBEAT_BUDGET = 48 * 1024


class OriginState:
    """Hysteresis of one app's reachability: ``up`` is None (unknown), True or False."""

    __slots__ = ("fall", "rise", "up", "failures", "successes", "reason")

    def __init__(self, fall: int, rise: int) -> None:
        self.fall = fall
        self.rise = rise
        self.up: bool | None = None
        self.failures = 0
        self.successes = 0
        self.reason = ""

    def observe(self, ok: bool, reason: str = "") -> bool:
        """Record one check's result; True when ``up`` changed."""
        self.reason = reason
        if ok:
            self.failures = 0
            self.successes += 1
            if self.up is not True and self.successes >= self.rise:
                self.up = True
                return True
        else:
            self.successes = 0
            self.failures += 1
            if self.up is not False and self.failures >= self.fall:
                self.up = False
                return True
        return False


def checked(app: dict[str, Any]) -> bool:
    """Whether an app of the pulled config gets checked at all."""
    return app.get("proto") in ("tcp", "http") and isinstance(app.get("target"), str)


def _check_key(app: dict[str, Any]) -> tuple:
    """What a check depends on: a change of any of it makes the state unknown again."""
    return (
        app.get("proto"), app.get("target"), app.get("internal_url"), app.get("health_path"),
        app.get("backend_ca"), bool(app.get("backend_insecure")),
    )


class UnsafeHealthPath(ValueError):
    """A health path that could make the check GET something else than the app's origin."""


def health_path_problem(path: Any) -> str | None:
    """Why this health path is not GET on the app's origin (None: it is a plain path)."""
    if not isinstance(path, str):
        return "the health path is not text"
    if len(path) > MAX_HEALTH_PATH:
        return f"the health path is longer than {MAX_HEALTH_PATH} characters"
    if not _HEALTH_PATH.fullmatch(path):
        return (
            "the health path is not a plain path on the app's origin (one leading '/', not '//', "
            "no scheme, no '\\', '#', space or control character)"
        )
    return None


def health_url(app: dict[str, Any]) -> str | None:
    """The URL an http app's check GETs, or None when the check is a TCP connect.

    Built from the internal URL's scheme and authority and the path's own characters,
    never by resolving the path against the URL (a reference could name another host).
    Raises UnsafeHealthPath for a path health_path_problem() refuses.
    """
    path = app.get("health_path")
    if app.get("proto") != "http" or not path or not app.get("internal_url"):
        return None
    problem = health_path_problem(path)
    if problem is not None:
        raise UnsafeHealthPath(f"{problem}: {str(path)[:80]!r}")
    origin = yarl.URL(app["internal_url"]).origin()
    raw_path, _, query = path.partition("?")
    url = yarl.URL.build(
        scheme=origin.scheme, authority=origin.raw_authority, path=raw_path, query_string=query, encoded=True
    )
    if url.origin() != origin:  # cannot happen with a path the pattern took; never dial elsewhere
        raise UnsafeHealthPath(f"the health path {str(path)[:80]!r} would leave the app's origin")
    return str(url)


def control_messages(states: dict[str, bool | None], budget: int = MESSAGE_BUDGET) -> list[dict[str, Any]]:
    """``states`` as CONTROL messages of type ``health``, each within ``budget`` bytes of entries."""
    messages: list[dict[str, Any]] = []
    chunk: dict[str, bool | None] = {}
    size = 0
    for name, up in states.items():
        entry = len(orjson.dumps(name)) + 7  # ':' + 'false' + ','
        if chunk and size + entry > budget:
            messages.append({"type": HEALTH_MESSAGE, "apps": chunk})
            chunk, size = {}, 0
        chunk[name] = up
        size += entry
    if chunk:
        messages.append({"type": HEALTH_MESSAGE, "apps": chunk})
    return messages


def heartbeat_report(states: dict[str, bool], budget: int = HEARTBEAT_BUDGET) -> dict[str, bool]:
    """The known states for a heartbeat, unreachable apps first, cut at ``budget`` bytes.

    Apps left out (only in groups of thousands of apps) show as unchecked in `admin app
    list`; routing is not affected, it uses the tunnel messages, which carry everything.
    """
    report: dict[str, bool] = {}
    size = 0
    for name in sorted(states, key=lambda n: (states[n], n)):
        size += len(orjson.dumps(name)) + 7
        if size > budget:
            break
        report[name] = states[name]
    return report


async def check_tcp(target: str, timeout: float) -> str | None:
    """None when a TCP connection to ``target`` opens within ``timeout``, else why not."""
    try:
        host, port = parse_hostport(target, "target")
    except ConfigError as exc:
        return str(exc)
    loop = asyncio.get_running_loop()
    try:
        transport, _ = await asyncio.wait_for(loop.create_connection(asyncio.Protocol, host, port), timeout)
    except (asyncio.TimeoutError, TimeoutError):
        return f"no TCP answer from {target} within {timeout:g} s"
    except socket.gaierror as exc:
        return f"the name of {target} did not resolve: {exc}"
    except OSError as exc:
        return f"TCP connect to {target} failed: {os.strerror(exc.errno) if exc.errno else exc}"
    transport.close()
    return None


async def check_http(
    session: aiohttp.ClientSession, url: str, ssl_context: ssl.SSLContext | None, timeout: float
) -> str | None:
    """None when GET ``url`` answers 2xx or 3xx within ``timeout``, else why not.

    ``ssl_context`` verifies an https origin (None: the system's default verification)."""
    try:
        # encoded: the URL health_url() built is sent as it is, not parsed and normalised again.
        async with session.get(
            yarl.URL(url, encoded=True), ssl=ssl_context if ssl_context is not None else True, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as response:
            if 200 <= response.status < 400:
                return None
            return f"GET {url} answered HTTP {response.status}"
    except (asyncio.TimeoutError, TimeoutError):
        return f"GET {url}: no answer within {timeout:g} s"
    except aiohttp.ClientError as exc:
        return f"GET {url} failed: {exc.__class__.__name__}: {exc}"


class HealthMonitor:
    """Checks the origins of one connector worker's apps and reports changes."""

    def __init__(
        self,
        settings: HealthChecks,
        on_change: Callable[[dict[str, bool | None]], None],
        backend_tls: BackendTls | None = None,
    ) -> None:
        """``backend_tls``: the TLS contexts the app's streams use (the agent's, which it
        clears with each configuration); without it the monitor keeps its own."""
        self.settings = settings
        self._on_change = on_change
        self._apps: dict[str, dict[str, Any]] = {}
        self._states: dict[str, OriginState] = {}
        #: apps to check before the next round: new ones, and ones a stream failed to reach
        self._due: set[str] = set()
        self._last_check: dict[str, float] = {}
        self._wake = asyncio.Event()
        #: apps left unchecked for a health path refused here, with that path (logged once)
        self._refused: dict[str, Any] = {}
        self._own_tls = backend_tls is None
        self._tls = BackendTls() if backend_tls is None else backend_tls

    # ------------------------------------------------------------------ what the agent calls

    def set_apps(self, apps: dict[str, dict[str, Any]]) -> None:
        """Follow a new configuration: new or changed apps are unknown and checked at once."""
        wanted = {}
        refused: dict[str, Any] = {}
        for name, app in apps.items():
            if not checked(app):
                continue
            path = app.get("health_path")
            problem = health_path_problem(path) if app.get("proto") == "http" and path else None
            if problem is None:
                wanted[name] = app
                continue
            # Unknown, not down: routing goes on as before, and nothing is dialed for it.
            refused[name] = path
            if name not in self._refused or self._refused[name] != path:
                log.error(
                    "health path refused: the app is not checked",
                    extra={"app": name, "health_path": str(path)[:200], "reason": problem},
                )
        self._refused = refused
        if self._own_tls:
            self._tls.clear()
        changes: dict[str, bool | None] = {}
        for name, app in list(self._apps.items()):
            if name not in wanted or _check_key(wanted[name]) != _check_key(app):
                del self._apps[name]
                self._last_check.pop(name, None)
                self._due.discard(name)
                if self._states.pop(name).up is not None:
                    changes[name] = None
        for name, app in wanted.items():
            if name not in self._apps:
                self._apps[name] = app
                self._states[name] = OriginState(self.settings.fall, self.settings.rise)
                self._due.add(name)
        if self._due:
            self._wake.set()
        if changes:
            self._on_change(changes)

    def recheck(self, name: str) -> None:
        """A stream could not reach this app's target: check it now (rate-limited)."""
        last = self._last_check.get(name)
        if name in self._apps and (last is None or time.monotonic() - last >= self.settings.recheck_gap):
            self._due.add(name)
            self._wake.set()

    def snapshot(self) -> dict[str, bool]:
        """Every app whose state is known: True reachable, False not."""
        return {name: state.up for name, state in self._states.items() if state.up is not None}

    def state(self, name: str) -> OriginState | None:
        return self._states.get(name)

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Check forever: a round of every app per interval, due apps in between."""
        connector = aiohttp.TCPConnector(force_close=True, limit=self.settings.concurrency)
        headers = {"User-Agent": f"backhaul-health-check/{__version__}"}
        async with aiohttp.ClientSession(connector=connector, headers=headers, auto_decompress=False) as session:
            semaphore = asyncio.Semaphore(self.settings.concurrency)
            next_round = time.monotonic()
            while True:
                wait = next_round - time.monotonic()
                if not self._due and wait > 0:
                    try:
                        await asyncio.wait_for(self._wake.wait(), wait)
                    except asyncio.TimeoutError:
                        pass
                self._wake.clear()
                if time.monotonic() >= next_round:
                    names = list(self._apps)
                    spread = self.settings.interval * self.settings.jitter
                    next_round = time.monotonic() + self.settings.interval + random.uniform(-spread, spread)
                else:
                    names = [name for name in self._due if name in self._apps]
                self._due.clear()
                await asyncio.gather(*(self._check(session, semaphore, name) for name in names))

    async def _check(self, session: aiohttp.ClientSession, semaphore: asyncio.Semaphore, name: str) -> None:
        app = self._apps.get(name)
        if app is None:
            return
        async with semaphore:
            self._last_check[name] = time.monotonic()
            try:
                failure = await self._probe(session, app)
            except Exception as exc:
                # A bug in one check must not stop the others: it counts as a failure, logged.
                log.exception("origin check crashed", extra={"app": name})
                failure = f"the check crashed: {exc!r}"
        if self._apps.get(name) is not app:
            return  # the app changed or went away while it was being checked
        state = self._states[name]
        if failure is not None:
            log.debug("origin check failed", extra={"app": name, "reason": failure, "failures": state.failures + 1})
        if not state.observe(failure is None, failure or ""):
            return
        extra = {"app": name, "target": app.get("target"), "check": health_url(app) or "tcp connect"}
        if state.up:
            log.info("origin reachable", extra=extra)
        else:
            log.warning("origin unreachable", extra={**extra, "reason": failure, "failures": state.failures})
        self._on_change({name: state.up})

    async def _probe(self, session: aiohttp.ClientSession, app: dict[str, Any]) -> str | None:
        url = health_url(app)
        timeout = self.settings.timeout
        if url is None:
            return await check_tcp(app["target"], timeout)
        # The health URL is the internal URL's origin: same scheme and host, so the same TLS.
        return await check_http(session, url, self._tls.options(app).get("ssl"), timeout)
