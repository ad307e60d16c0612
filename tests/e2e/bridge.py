"""A byte forwarder between a TCP port on 127.0.0.1 and a unix socket, run as its own process.

    python bridge.py inner --port PORT --unix PATH --ready FILE   # 127.0.0.1:PORT -> PATH
    python bridge.py outer --unix PATH --port PORT --ready FILE   # PATH -> 127.0.0.1:PORT

Filesystem unix sockets are not scoped by network namespace, so an ``inner`` bridge in
a namespace of its own (see netns.py) and an ``outer`` one in the host's namespace
carry a connection from one 127.0.0.1 to the other. ``inner`` first brings up the
namespace's loopback. Both write FILE once listening (readiness) and serve until killed.
Every connection is forwarded byte for byte, half-closes included, with backpressure.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import os
import socket
import struct

SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def loopback_up() -> None:
    """``ip link set lo up``, without needing iproute2."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sh22x", b"lo", 0)
        flags = struct.unpack("16sh22x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sh22x", b"lo", flags | IFF_UP))


class Half(asyncio.Protocol):
    """One side of a forwarded connection; ``peer`` is the other side."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Half | None = None
        self.pending: list[bytes] = []  # bytes that arrived before the other side connected
        self.eof = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.peer is None or self.peer.transport is None:
            self.pending.append(data)
            self.transport.pause_reading()
        else:
            self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.peer is not None and self.peer.transport is not None and self.peer.transport.can_write_eof():
            self.peer.transport.write_eof()
        return True

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def attach(self, peer: "Half") -> None:
        """The other side is connected: flush what waited and carry on both ways."""
        self.peer = peer
        for data in self.pending:
            peer.transport.write(data)
        self.pending.clear()
        if self.eof and peer.transport.can_write_eof():
            peer.transport.write_eof()
        if not self.transport.is_closing():
            self.transport.resume_reading()


def serve(connect) -> type[Half]:
    """A protocol for accepted connections that forwards each through ``connect()``."""

    class Accepted(Half):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            asyncio.get_running_loop().create_task(self._dial())

        async def _dial(self) -> None:
            try:
                _, outgoing = await connect(Half)
            except OSError:
                self.transport.abort()  # the far side is not there: as if refused
                return
            outgoing.peer = self
            self.attach(outgoing)

    return Accepted


async def main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    if args.side == "inner":
        loopback_up()
        protocol = serve(lambda factory: loop.create_unix_connection(factory, args.unix))
        await loop.create_server(protocol, "127.0.0.1", args.port, backlog=1024)
    else:
        protocol = serve(lambda factory: loop.create_connection(factory, "127.0.0.1", args.port))
        await loop.create_unix_server(protocol, args.unix, backlog=1024)
    tmp = args.ready + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, args.ready)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("side", choices=["inner", "outer"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--unix", required=True)
    parser.add_argument("--ready", required=True)
    asyncio.run(main(parser.parse_args()))
