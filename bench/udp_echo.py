"""UDP apps: echoed datagrams per second through relay -> tunnel -> connector -> echo, one table.

    PYTHONPATH=src .venv/bin/python bench/udp_echo.py [--seconds 5] [--clients 1,16] [--sizes 64,512,1400]

Everything is set up through the CLI, as in the e2e tests (tests/e2e/harness.py): a relay
with one worker, one connector with one worker, a UDP echo backend. Each client keeps
``--window`` datagrams in flight; a datagram not echoed within 1 s counts as lost (UDP:
the relay, the tunnel and the connector drop rather than queue without bound, and count
it). Read the table's rows against each other; absolute figures depend on the machine.
"""

from __future__ import annotations

import argparse
import selectors
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.e2e.harness import Backend, System, wait_until  # noqa: E402


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(port: int, clients: int, size: int, window: int, seconds: float) -> tuple[float, float]:
    """(echoed datagrams per second, fraction lost) for ``clients`` sockets, ``window`` in flight each."""
    selector = selectors.DefaultSelector()
    socks = []
    payload = b"x" * size
    for _ in range(clients):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        sock.connect(("127.0.0.1", port))
        selector.register(sock, selectors.EVENT_READ)
        socks.append(sock)
    in_flight = {sock: 0 for sock in socks}
    last_reply = {sock: time.monotonic() for sock in socks}
    sent = received = 0
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            now = time.monotonic()
            for sock in socks:
                if now - last_reply[sock] > 1.0:  # what is still out after 1 s is lost
                    in_flight[sock] = 0
                    last_reply[sock] = now
                while in_flight[sock] < window:
                    try:
                        sock.send(payload)
                    except BlockingIOError:
                        break
                    in_flight[sock] += 1
                    sent += 1
            for key, _ in selector.select(0.05):
                sock = key.fileobj
                while True:
                    try:
                        sock.recv(65536)
                    except BlockingIOError:
                        break
                    received += 1
                    in_flight[sock] = max(0, in_flight[sock] - 1)
                    last_reply[sock] = time.monotonic()
    finally:
        for sock in socks:
            selector.unregister(sock)
            sock.close()
    return received / seconds, 1 - received / sent if sent else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", default="1,16")
    parser.add_argument("--sizes", default="64,512,1400")
    parser.add_argument("--window", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-udp-") as tmp:
        workdir = Path(tmp)
        system = System(workdir)
        procs: list = []
        try:
            system.init()
            system.start_relay(workers=1)
            echo = Backend("udpecho", workdir, procs)
            system.start_connector("bench", workers=1, tunnels=1)
            port = free_udp_port()
            system.admin("app", "publish", "echo", "--udp", str(port), "--target", echo.target)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.settimeout(0.5)

                def answers() -> bool:
                    probe.sendto(b"probe", ("127.0.0.1", port))
                    try:
                        return probe.recv(100) == b"probe"
                    except socket.timeout:
                        return False

                wait_until(answers, 60, "the udp app to echo")
            print(f"| clients | size (B) | window | echoed datagrams/s | MB/s each way | lost |")
            print("| ---: | ---: | ---: | ---: | ---: | ---: |")
            for clients in (int(c) for c in args.clients.split(",")):
                for size in (int(s) for s in args.sizes.split(",")):
                    rate, lost = measure(port, clients, size, args.window, args.seconds)
                    print(f"| {clients} | {size} | {args.window} | {rate:,.0f} | {rate * size / 1e6:.1f} | {lost:.1%} |")
        finally:
            for proc in procs:
                proc.stop()
            system.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
