"""Private-app stand-ins for end-to-end tests, run as their own processes.

    python backend.py MODE PORTFILE [--port PORT] [--name NAME]
    python backend.py http PORTFILE [CERT KEY]

binds 127.0.0.1:PORT (default 0: any), writes the port to PORTFILE (readiness), and
serves until killed:
  echo      every byte back, EOF passed on (half-close aware)
  reply     read until EOF, then send "<length> <sha256>\\n" and close
  hold      accept and keep connections open, never read nor write
  sink      accept and never read (a reader that never reads)
  source    send an endless stream of bytes, never read
  greet     send NAME and a newline, then echo (tells which backend a connection reached)
  udpecho   (UDP) every datagram back to its sender
  udpwho    (UDP) answer each datagram with "<datagram> <sender ip:port>", so a test sees
            which connector socket a flow came through
  http      a web app (aiohttp), over TLS with CERT and KEY; its routes are in http_app()
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import resource


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)

    def eof_received(self):
        self.transport.write_eof()
        return True


class Reply(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.size = 0
        self.digest = hashlib.sha256()

    def data_received(self, data):
        self.size += len(data)
        self.digest.update(data)

    def eof_received(self):
        self.transport.write(f"{self.size} {self.digest.hexdigest()}\n".encode())
        self.transport.close()


class Hold(asyncio.Protocol):
    held: list = []

    def connection_made(self, transport):
        self.held.append(transport)


class Sink(Hold):
    def connection_made(self, transport):
        super().connection_made(transport)
        transport.pause_reading()


class Source(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.chunk = os.urandom(64 * 1024)
        self.paused = False
        self.pump()

    def pump(self):
        while not self.paused and not self.transport.is_closing():
            self.transport.write(self.chunk)

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        asyncio.get_running_loop().call_soon(self.pump)

    def connection_lost(self, exc):
        self.paused = True


class Greet(Echo):
    name = b""

    def connection_made(self, transport):
        super().connection_made(transport)
        transport.write(self.name + b"\n")


def pattern(size: int):
    """``size`` bytes of a fixed pattern, in blocks; both the app and the tests can make it."""
    block = bytes(i % 251 for i in range(256 * 1024))
    while size > 0:
        yield block[: min(size, len(block))]
        size -= len(block)


def http_app():
    """A web app with a route for each behaviour the HTTP edge tests need."""
    import json

    from aiohttp import WSMsgType, web

    routes = web.RouteTableDef()

    def info(request, **extra):
        peer = request.transport.get_extra_info("peername") if request.transport else None
        return {
            "method": request.method,
            "path": request.path_qs,
            "headers": [[k, v] for k, v in request.headers.items()],
            "peer_port": peer[1] if peer else None,
            **extra,
        }

    @routes.route("*", "/upload")
    async def upload(request):
        digest, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_chunked(256 * 1024):
            digest.update(chunk)
            size += len(chunk)
        return web.json_response(info(request, size=size, sha256=digest.hexdigest()))

    @routes.get("/download")
    async def download(request):
        size = int(request.query.get("size", "0"))
        response = web.StreamResponse()
        if request.query.get("chunked"):
            response.enable_chunked_encoding()
        else:
            response.content_length = size
        await response.prepare(request)
        for block in pattern(size):
            await response.write(block)
        await response.write_eof()
        return response

    @routes.get("/redirect")
    @routes.get("/base/redirect")
    async def redirect(request):
        # An absolute URL of its own, under the path it was reached at (/ or /base/).
        base = f"{request.scheme}://{request.host}{request.path[: -len('/redirect')]}"
        return web.Response(
            status=302, headers={"Location": f"{base}/landed?x=1", "Content-Location": f"{base}/here"}
        )

    @routes.get("/cookie")
    async def cookie(request):
        response = web.json_response(info(request))
        host = request.host.split(":")[0]
        response.headers.add("Set-Cookie", f"sid=abc; Domain={host}; Path=/; HttpOnly")
        response.headers.add("Set-Cookie", "plain=1; Path=/")
        return response

    @routes.get("/slow")
    async def slow(request):
        await asyncio.sleep(float(request.query.get("seconds", "1")))
        return web.json_response(info(request))

    @routes.post("/early")
    async def early(request):
        return web.Response(status=413, text="too large, not reading it\n")

    @routes.get("/ws")
    async def websocket(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                await ws.send_str("echo: " + message.data)
            elif message.type == WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        return ws

    @routes.route("*", "/{tail:.*}")
    async def anything(request):
        body = await request.read()
        return web.json_response(info(request, body=body.decode("latin-1")), dumps=json.dumps)

    app = web.Application(client_max_size=1024**3)
    app.add_routes(routes)
    return app


async def serve_http(portfile: str, cert: str | None, key: str | None, port: int = 0) -> None:
    import ssl

    from aiohttp import web

    ctx = None
    if cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
    runner = web.AppRunner(http_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    tmp = portfile + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(port))
    os.replace(tmp, portfile)
    await asyncio.Event().wait()




class UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data, addr)


class UdpWho(UdpEcho):
    def datagram_received(self, data, addr):
        self.transport.sendto(data + f" {addr[0]}:{addr[1]}".encode(), addr)


MODES = {"echo": Echo, "reply": Reply, "hold": Hold, "sink": Sink, "source": Source, "greet": Greet}
UDP_MODES = {"udpecho": UdpEcho, "udpwho": UdpWho}


async def main(mode: str, portfile: str, port: int = 0) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = asyncio.get_running_loop()
    if mode in UDP_MODES:
        transport, _ = await loop.create_datagram_endpoint(UDP_MODES[mode], local_addr=("127.0.0.1", port))
        port = transport.get_extra_info("sockname")[1]
    else:
        server = await loop.create_server(MODES[mode], "127.0.0.1", port, backlog=4096)
        port = server.sockets[0].getsockname()[1]
    tmp = portfile + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(port))
    os.replace(tmp, portfile)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=sorted([*MODES, *UDP_MODES, "http"]))
    parser.add_argument("portfile")
    parser.add_argument("cert", nargs="?", help="http mode: serve TLS with this certificate")
    parser.add_argument("key", nargs="?")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", default="backend")
    args = parser.parse_args()
    Greet.name = args.name.encode()
    if args.mode == "http":
        asyncio.run(serve_http(args.portfile, args.cert, args.key, args.port))
    else:
        asyncio.run(main(args.mode, args.portfile, args.port))
