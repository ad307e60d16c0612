"""The connector's local control socket: live status and the session-log switch.

An HTTP/JSON API (aiohttp) on a unix socket, ``<state dir>/run/control.sock``: the
socket file is 0600 in a 0700 run dir, and every request's peer is checked with
SO_PEERCRED, so only the connector's own user (or root) can use it. The supervisor
makes the listening socket before any worker starts (a second `connector run` on the
same state dir is refused there); worker 0 serves it.

    GET /v1/status             -> {"running": true, "figures": {...}, "info": {...}}
    PUT /v1/session-log        <- {"on": true|false}  -> {"on": ..., "workers": N, "confirmed": N, "path": ...}
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import aiohttp
from aiohttp import web

from backhaul.errors import ConfigError, ServiceError
from backhaul.jsonhttp import request_json

SOCKET = "control.sock"
#: Longest unix socket path bind() takes (sun_path is 108 bytes with its NUL).
_MAX_PATH = 107
#: Largest answer the CLI reads from the control socket.
MAX_ANSWER = 1024 * 1024
#: Seconds a CLI call on the control socket may take.
TIMEOUT = 10.0


@contextlib.contextmanager
def _address(path: Path) -> Iterator[str]:
    """An address that reaches ``path`` even when it is longer than a unix socket path may be.

    A long path is reached through /proc/self/fd/N of its open directory, which the kernel
    resolves like any path, permissions included.
    """
    text = str(path)
    if len(text.encode()) <= _MAX_PATH:
        yield text
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _answers(path: Path) -> bool:
    with _address(path) as address, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(address)
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        except OSError as exc:
            raise ConfigError(f"cannot check the control socket {path}: {exc.strerror}") from None
    return True


def listen(run_dir: Path) -> socket.socket:
    """The control socket, bound (0600) and listening; ConfigError if a connector already answers there."""
    path = Path(run_dir) / SOCKET
    if path.exists() or path.is_symlink():
        if _answers(path):
            raise ConfigError(
                f"a connector is already running with state dir {Path(run_dir).parent} (its control socket {path} answers); "
                "stop it first, or use another --state-dir"
            )
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _address(path) as address:
            old_umask = os.umask(0o177)
            try:
                sock.bind(address)
            finally:
                os.umask(old_umask)
        os.chmod(path, 0o600)
        sock.listen(16)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot make the control socket {path}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def peer_uid(transport: asyncio.BaseTransport) -> int | None:
    """The uid of the process at the other end of a unix socket (SO_PEERCRED)."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)[1]


@web.middleware
async def _owner_only(request: web.Request, handler):
    uid = peer_uid(request.transport)
    if uid is None or uid not in (os.geteuid(), 0):
        return web.json_response({"detail": "only the connector's own user (or root) may use its control socket"}, status=403)
    return await handler(request)


async def serve(
    sock: socket.socket,
    status: Callable[[], dict],
    set_session_log: Callable[[bool], Awaitable[dict]],
) -> web.AppRunner:
    """Serve the control API on ``sock`` (see the module docstring); returns the runner to clean up."""

    async def get_status(request: web.Request) -> web.Response:
        return web.json_response(status())

    async def put_session_log(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("on"), bool):
            return web.json_response({"detail": 'the body must be {"on": true} or {"on": false}'}, status=400)
        try:
            return web.json_response(await set_session_log(body["on"]))
        except ValueError as exc:
            return web.json_response({"detail": str(exc)}, status=409)

    app = web.Application(middlewares=[_owner_only], client_max_size=4096)
    app.router.add_get("/v1/status", get_status)
    app.router.add_put("/v1/session-log", put_session_log)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner


class NotRunning(Exception):
    """Nothing answers on the control socket: the connector is not running."""


async def call(run_dir: Path, method: str, path: str, body: Any = None) -> Any:
    """One request to a running connector's control socket; NotRunning if none answers."""
    sock_path = Path(run_dir) / SOCKET
    if not sock_path.exists():
        raise NotRunning(f"no control socket at {sock_path}")
    with _address(sock_path) as address:
        session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=address), timeout=aiohttp.ClientTimeout(total=TIMEOUT)
        )
        async with session:
            try:
                answer = await request_json(session, method, f"http://connector{path}", body, limit=MAX_ANSWER)
            except aiohttp.ClientConnectorError as exc:
                raise NotRunning(f"nothing answers on {sock_path} ({exc.os_error.strerror or exc})") from None
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise ServiceError(f"the connector's control socket {sock_path} failed: {exc.__class__.__name__}: {exc}") from None
    if answer.status >= 400:
        detail = answer.body.get("detail") if isinstance(answer.body, dict) else f"HTTP {answer.status}"
        raise ServiceError(f"the connector refused: {detail}")
    return answer.body
