"""Private-app stand-ins for end-to-end tests, run as their own processes.

    python backend.py MODE PORTFILE [--port PORT] [--name NAME]

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
    parser.add_argument("mode", choices=sorted([*MODES, *UDP_MODES]))
    parser.add_argument("portfile")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", default="backend")
    args = parser.parse_args()
    Greet.name = args.name.encode()
    asyncio.run(main(args.mode, args.portfile, args.port))
