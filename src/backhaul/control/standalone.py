"""The control API on its own TLS listener, in a background thread.

The relay serves the API behind its ALPN dispatcher; this runner is for tests and
tools that need the API without the data path.
"""

from __future__ import annotations

import asyncio
import threading

from aiohttp import web

from backhaul import tlsconfig
from backhaul.control.api import build_app
from backhaul.control.context import ControlContext

#: Seconds to wait for the listener to come up or go down.
START_TIMEOUT = 10.0


class ThreadedControlServer:
    """Serve the control API of ``ctx`` on ``host``:``port`` (0 = any free port) with the
    relay's server TLS context, in a daemon thread with its own event loop."""

    def __init__(self, ctx: ControlContext, host: str = "127.0.0.1", port: int = 0) -> None:
        self.ctx = ctx
        self.host = host
        self.port = port
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="control-api", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    def start(self) -> "ThreadedControlServer":
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            raise RuntimeError("the control API did not start in time")
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(START_TIMEOUT)

    def __enter__(self) -> "ThreadedControlServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start() or re-raised by it
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        runner = web.AppRunner(build_app(self.ctx))
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port, ssl_context=tlsconfig.server_context(self.ctx.data_dir))
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()
