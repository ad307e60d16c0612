"""The CONNECT handshake against scripted proxies on 127.0.0.1, and which proxy is chosen.

Each scripted proxy is a real socket server that reads the CONNECT request and answers
with fixed bytes, so every answer a real proxy might give (or garble) is covered; the
end-to-end tests run the same code through tinyproxy.
"""

from __future__ import annotations

import asyncio
import base64
import ssl

import pytest
import uvloop

from backhaul.errors import ConfigError, ProxyError
from backhaul.transport import proxy_connect
from backhaul.transport.proxy_connect import MAX_ANSWER, Proxy, choose_proxy, parse_proxy

pytestmark = pytest.mark.codec_independent


async def scripted_proxy(answer: bytes | None, requests: list[bytes]):
    """A server that records each request head and answers ``answer`` (None: just closes)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await reader.readuntil(b"\r\n\r\n"))
        if answer is not None:
            writer.write(answer)
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


def attempt(answer: bytes | None, proxy_user: str | None = None, password: str | None = None) -> tuple[BaseException | None, list]:
    """Dial relay.example:8443 through a scripted proxy; the error raised and the requests it saw."""
    requests: list[bytes] = []

    async def main():
        server = await scripted_proxy(answer, requests)
        port = server.sockets[0].getsockname()[1]
        proxy = Proxy("127.0.0.1", port, proxy_user, password)
        try:
            await proxy_connect.open_tunnel(
                asyncio.Protocol, proxy, "relay.example", 8443,
                ssl_context=ssl.create_default_context(), server_hostname="relay.example",
            )
        except Exception as exc:  # returned to the test, which checks its type and words
            return exc
        finally:
            server.close()
        return None

    return uvloop.run(asyncio.wait_for(main(), 10)), requests


def test_connect_request_names_the_relay_and_carries_basic_credentials():
    error, requests = attempt(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n", "us er", "p:ss")
    head = requests[0].decode()
    assert head.startswith("CONNECT relay.example:8443 HTTP/1.1\r\n")
    assert "\r\nHost: relay.example:8443\r\n" in head
    assert f"\r\nProxy-Authorization: Basic {base64.b64encode(b'us er:p:ss').decode()}\r\n" in head
    assert isinstance(error, ProxyError) and "check the user and password" in str(error)


def test_407_without_credentials_says_to_add_them():
    error, requests = attempt(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n\r\n")
    assert "Proxy-Authorization" not in requests[0].decode()
    assert isinstance(error, ProxyError)
    assert "wants authentication (HTTP 407 Proxy Authentication Required)" in str(error)
    assert "put a user and password in the proxy URL" in str(error)


def test_403_names_the_refused_target():
    error, _ = attempt(b"HTTP/1.0 403 Forbidden\r\nContent-Type: text/html\r\nContent-Length: 9\r\n\r\nforbidden")
    assert isinstance(error, ProxyError)
    assert "refuses CONNECT to relay.example:8443 (HTTP 403 Forbidden)" in str(error)


@pytest.mark.parametrize("status", [b"502 Bad Gateway", b"503 Service Unavailable", b"500 Unable to connect"])
def test_gateway_errors_say_the_proxy_could_not_reach_the_relay(status):
    error, _ = attempt(b"HTTP/1.1 " + status + b"\r\n\r\n")
    assert isinstance(error, ProxyError) and "could not reach the relay at relay.example:8443" in str(error)


def test_a_proxy_that_closes_without_answering():
    error, _ = attempt(None)
    assert isinstance(error, ProxyError)
    assert "closed the connection without answering CONNECT to relay.example:8443" in str(error)


def test_an_endless_answer_head_is_cut_at_the_bound():
    endless = b"HTTP/1.1 200 OK\r\n" + b"X-Filler: " + b"a" * (MAX_ANSWER + 4096) + b"\r\n"
    error, _ = attempt(endless)
    assert isinstance(error, ProxyError) and f"over {MAX_ANSWER} bytes" in str(error)


def test_a_non_http_answer_is_refused():
    error, _ = attempt(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
    assert isinstance(error, ProxyError) and "did not answer CONNECT in HTTP" in str(error)


def test_bytes_after_a_200_are_refused_since_tls_has_not_started():
    error, _ = attempt(b"HTTP/1.1 200 Connection established\r\n\r\nsurprise")
    assert isinstance(error, ProxyError) and "sent bytes after its answer" in str(error)


def test_an_unreachable_proxy():
    async def main():
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        with pytest.raises(ProxyError, match=f"cannot reach the proxy at http://127.0.0.1:{port}"):
            await proxy_connect.open_tunnel(
                asyncio.Protocol, Proxy("127.0.0.1", port), "relay.example", 8443,
                ssl_context=ssl.create_default_context(), server_hostname="relay.example",
            )

    uvloop.run(asyncio.wait_for(main(), 10))


# ---------------------------------------------------------------------------- choosing a proxy


def test_parse_proxy_urls():
    assert parse_proxy("http://proxy.corp:3128") == Proxy("proxy.corp", 3128)
    assert parse_proxy("http://proxy.corp") == Proxy("proxy.corp", 80)
    assert parse_proxy("http://a%40b:p%3Ass@[::1]:8080/") == Proxy("::1", 8080, "a@b", "p:ss")
    assert Proxy("::1", 8080, "u", "p").url == "http://[::1]:8080"


@pytest.mark.parametrize("url", ["https://proxy:3128", "socks5://proxy:1080", "proxy:3128", "http://proxy:3128/path", "http://proxy:99999"])
def test_parse_proxy_refuses_what_it_cannot_use(url):
    with pytest.raises(ConfigError):
        parse_proxy(url)


def test_explicit_proxy_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://env-proxy:1")
    monkeypatch.setenv("NO_PROXY", "relay.example")
    assert choose_proxy("http://flag-proxy:2", "relay.example") == Proxy("flag-proxy", 2)


def test_https_proxy_from_the_environment_honours_no_proxy(monkeypatch):
    for name in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert choose_proxy(None, "relay.example") is None
    monkeypatch.setenv("https_proxy", "http://env-proxy:3128")
    assert choose_proxy(None, "relay.example") == Proxy("env-proxy", 3128)
    monkeypatch.setenv("no_proxy", "other.example,.example")
    assert choose_proxy(None, "relay.example") is None
    monkeypatch.setenv("no_proxy", "other.example")
    assert choose_proxy(None, "relay.example") == Proxy("env-proxy", 3128)
    monkeypatch.setenv("no_proxy", "*")
    assert choose_proxy(None, "relay.example") is None
