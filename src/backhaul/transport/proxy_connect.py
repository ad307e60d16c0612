"""Reaching the relay through an HTTP CONNECT proxy: which proxy to use, and the handshake.

The connector asks the proxy for a raw TCP path to the relay (``CONNECT host:port``),
reads the proxy's answer head with httptools (at most ``MAX_ANSWER`` bytes), then runs
TLS over that same connection with ``loop.start_tls``: mutual TLS is end to end, the
proxy sees only the relay's name and port. The control API's aiohttp sessions use the
same proxy (aiohttp does its own CONNECT); ``from_aiohttp`` words their proxy errors
the same way.

Which proxy: ``--proxy URL`` when given, else ``HTTPS_PROXY`` / ``https_proxy`` from
the environment unless ``NO_PROXY`` / ``no_proxy`` names the relay's host (the
standard library's reading of those variables, as curl and requests do).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import ssl
import urllib.parse
import urllib.request
from typing import Callable

import httptools

from backhaul import __version__
from backhaul.errors import ConfigError, ProxyError

#: Largest answer head read from a proxy; a longer one is not a CONNECT answer.
MAX_ANSWER = 16 * 1024


@dataclasses.dataclass(frozen=True)
class Proxy:
    """An HTTP proxy: where it is, and the credentials its URL carried (if any)."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @property
    def url(self) -> str:
        """The proxy's URL without credentials (safe to log)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def authorization(self) -> str | None:
        """The Proxy-Authorization value (basic), when the URL carried a user."""
        if self.username is None:
            return None
        pair = f"{self.username}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")


def parse_proxy(url: str, what: str = "--proxy") -> Proxy:
    """A Proxy from ``http://[user:password@]host[:port]``; ConfigError saying what is wrong."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{what} {url!r} is not a URL ({exc}); use http://HOST:PORT") from None
    if parts.scheme != "http" or not parts.hostname:
        raise ConfigError(
            f"{what} {url!r} must be an http:// proxy URL (http://[USER:PASSWORD@]HOST:PORT); "
            "TLS to the proxy itself is not supported, the tunnel inside is TLS end to end"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{what} {url!r} must be just http://[USER:PASSWORD@]HOST:PORT, without a path or query")
    return Proxy(
        host=parts.hostname,
        port=port or 80,
        username=urllib.parse.unquote(parts.username) if parts.username is not None else None,
        password=urllib.parse.unquote(parts.password) if parts.password is not None else None,
    )


def choose_proxy(explicit: str | None, host: str) -> Proxy | None:
    """The proxy to reach ``host`` through: ``explicit``, else HTTPS_PROXY unless NO_PROXY matches."""
    if explicit:
        return parse_proxy(explicit)
    env = urllib.request.getproxies_environment()
    url = env.get("https")
    if not url or urllib.request.proxy_bypass_environment(host, env):
        return None
    return parse_proxy(url, "HTTPS_PROXY")


def refusal(status: int, reason: str, proxy: Proxy | str, target: str) -> str:
    """What a non-2xx answer to CONNECT means, in words a person can act on (``proxy``: the
    Proxy, or its URL when only that is known)."""
    where = proxy.url if isinstance(proxy, Proxy) else proxy
    answer = f"HTTP {status} {reason}".strip()
    if status in (401, 407):  # 407 is the standard; tinyproxy answers wrong credentials with 401
        if not isinstance(proxy, Proxy):
            hint = "give the proxy URL a user and password it accepts (http://USER:PASSWORD@HOST:PORT)"
        elif proxy.username is not None:
            hint = "check the user and password in the proxy URL"
        else:
            hint = "put a user and password in the proxy URL (http://USER:PASSWORD@HOST:PORT)"
        return f"the proxy at {where} wants authentication ({answer}); {hint}"
    if status == 403:
        return (
            f"the proxy at {where} refuses CONNECT to {target} ({answer}); "
            "ask its administrator to allow that host and port"
        )
    if status in (500, 502, 503, 504):  # tinyproxy says 500, squid 503, most others 502
        return (
            f"the proxy at {where} could not reach the relay at {target} ({answer}); "
            "check the service URL and that the relay is up and reachable from the proxy"
        )
    return f"the proxy at {where} refused CONNECT to {target} ({answer})"


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _ConnectHandshake(asyncio.Protocol):
    """Sends CONNECT and reads the answer head; ``answered`` resolves once it is a 2xx."""

    def __init__(self, proxy: Proxy, target: str, loop: asyncio.AbstractEventLoop) -> None:
        self.proxy = proxy
        self.target = target
        self.answered: asyncio.Future = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._size = 0
        self._reason = b""
        self._status: int | None = None
        self._extra = 0  # bytes after a 2xx head: TLS has not started, so there must be none

    def request(self) -> bytes:
        lines = [f"CONNECT {self.target} HTTP/1.1", f"Host: {self.target}", f"User-Agent: backhaul/{__version__}"]
        authorization = self.proxy.authorization()
        if authorization is not None:
            lines.append(f"Proxy-Authorization: {authorization}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    # asyncio

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.write(self.request())

    def data_received(self, data: bytes) -> None:
        if self.answered.done():
            self._fail(f"the proxy at {self.proxy.url} sent bytes after its answer to CONNECT; is it an HTTP proxy?")
            return
        self._size += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"the proxy at {self.proxy.url} did not answer CONNECT in HTTP ({exc}); is it an HTTP proxy?")
            return
        if self._status is None:
            if self._size > MAX_ANSWER:
                self._fail(f"the proxy at {self.proxy.url} sent an answer head over {MAX_ANSWER} bytes; is it an HTTP proxy?")
            return
        if not 200 <= self._status < 300:
            self._fail(refusal(self._status, self._reason.decode("latin-1", "replace"), self.proxy, self.target))
        elif self._extra:
            self._fail(f"the proxy at {self.proxy.url} sent bytes after its answer to CONNECT; is it an HTTP proxy?")
        else:
            self.answered.set_result(None)

    def eof_received(self) -> bool:
        self._closed()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed()

    # httptools callbacks

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self._status is not None and 200 <= self._status < 300:
            self._extra += len(body)

    # helpers

    def _closed(self) -> None:
        self._fail(f"the proxy at {self.proxy.url} closed the connection without answering CONNECT to {self.target}")

    def _fail(self, reason: str) -> None:
        if not self.answered.done():
            self.answered.set_exception(ProxyError(reason))
        if self.transport is not None:
            self.transport.abort()


async def open_tunnel(
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    proxy: Proxy,
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext,
    server_hostname: str,
) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
    """Like ``loop.create_connection(..., ssl=...)`` to host:port, through ``proxy``.

    Raises ProxyError when the proxy cannot be reached or refuses; TLS errors as
    ``create_connection`` would. The caller bounds the whole with a timeout.
    """
    loop = asyncio.get_running_loop()
    target = _hostport(host, port)
    try:
        raw, handshake = await loop.create_connection(lambda: _ConnectHandshake(proxy, target, loop), proxy.host, proxy.port)
    except OSError as exc:
        raise ProxyError(
            f"cannot reach the proxy at {proxy.url} ({exc.strerror or exc}); check --proxy or HTTPS_PROXY"
        ) from exc
    try:
        await handshake.answered
        protocol = protocol_factory()
        transport = await loop.start_tls(raw, protocol, ssl_context, server_hostname=server_hostname)
    except BaseException:
        raw.abort()
        raise
    # start_tls hands over a transport without calling connection_made; the protocol needs it.
    protocol.connection_made(transport)
    return transport, protocol


def aiohttp_options(proxy: Proxy | None) -> dict:
    """ClientSession keyword arguments that send every request through ``proxy`` (none: direct).

    The environment is not read again here (no ``trust_env``): ``choose_proxy`` already
    decided, so tunnels and API calls always take the same way.
    """
    if proxy is None:
        return {}
    import aiohttp

    auth = aiohttp.BasicAuth(proxy.username, proxy.password or "") if proxy.username is not None else None
    return {"proxy": proxy.url, "proxy_auth": auth}


def from_aiohttp(exc: BaseException, target: str, proxy: Proxy | None = None) -> ProxyError | None:
    """The ProxyError for an aiohttp failure at a proxy (refused, unreachable, or, when the
    caller knows it went through ``proxy``, closed without an answer), or None for any other."""
    import aiohttp

    if proxy is not None and isinstance(exc, aiohttp.ServerDisconnectedError):
        return ProxyError(
            f"the proxy at {proxy.url} (or the relay behind it) closed the connection without answering; "
            f"check that the proxy lets CONNECT through to {target}"
        )

    if isinstance(exc, aiohttp.ClientHttpProxyError):
        where: Proxy | str = proxy or (str(exc.request_info.real_url) if exc.request_info is not None else "on the way")
        return ProxyError(refusal(exc.status, exc.message or "", where, target))
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        return ProxyError(
            f"cannot reach the proxy at http://{_hostport(exc.host, exc.port)} ({exc.strerror or exc}); "
            "check --proxy or HTTPS_PROXY"
        )
    return None
