"""How long the admin center takes to render at fleet size: 1,000 connectors, 5,000 apps.

Seeds a fresh SQLite data dir (``backhaul service init``, then the store's own calls:
groups, connectors enrolled with tokens, apps, heartbeats), serves the control API's app
(the same build_app the relay serves) on 127.0.0.1, signs a session cookie with the store's
key, and times GET of the overview and each list page (the first page of 50 rows, and a
filtered one). Prints a table of the median and worst of ``--repeat`` renders.

    PYTHONPATH=src .venv/bin/python bench/admin_center.py [--connectors 1000] [--apps 5000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from backhaul.center import sessions
from backhaul.control.api import build_app
from backhaul.control.context import ControlContext
from backhaul.store import App, Connector, ConnectorStats, open_store

PAGES = [
    "/admin/",
    "/admin/connectors",
    "/admin/connectors?status=active&q=conn-9",
    "/admin/connectors?page=20",
    "/admin/apps",
    "/admin/apps?kind=http&q=app-4",
    "/admin/apps?page=100",
    "/admin/groups",
    "/admin/tokens",
    "/admin/releases",
    "/admin/log",
]


def seed(data_dir: Path, connectors: int, apps: int, groups: int) -> None:
    subprocess.run([sys.executable, "-m", "backhaul", "service", "init", "--data-dir", str(data_dir)], check=True, capture_output=True)
    store = open_store(data_dir)
    try:
        names = [f"site-{g}" for g in range(groups)]
        for name in names:
            store.create_group(name)
        now = time.time()
        for i in range(connectors):
            group = names[i % groups]
            secret = f"bench-{i}"
            hashed = hashlib.sha256(secret.encode()).hexdigest()
            store.create_token(hashed, group, now + 3600, 1)
            cid = f"c-bench{i:05d}"
            store.enroll(hashed, Connector(
                id=cid, name=f"conn-{i}", hostname=f"host-{i}", version="0.1.0", group="", created=now,
                last_seen=now, source_addr="10.0.0.1", cert_serial=i + 1, cert_expires=now + 86400,
            ))
            store.heartbeat(cid, ConnectorStats(version="0.1.0", streams=i % 7, bytes_in=i * 1000, bytes_out=i * 2000), "10.0.0.1")
        for i in range(apps):
            group = names[i % groups]
            if i % 2:
                app = App(name=f"app-{i}", group=group, proto="http", target=f"10.1.{i // 250}.{i % 250}:80",
                          external_host=f"app-{i}.example.com", internal_url=f"http://10.1.{i // 250}.{i % 250}/", preauth="passthrough")
            else:
                app = App(name=f"app-{i}", group=group, proto="tcp" if i % 4 else "udp", port=20000 + i, target=f"10.2.{i // 250}.{i % 250}:22")
            store.create_app(app)
    finally:
        store.close()


async def measure(data_dir: Path, repeat: int) -> list[tuple[str, float, float, int]]:
    ctx = ControlContext.load(data_dir)
    app = build_app(ctx)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    key_hex, _ = ctx.store.center_state()
    _, cookie = sessions.issue(sessions.mac_key(key_hex, ctx.store.admin_token_hash()), "bench", time.time(), 3600)
    rows = []
    try:
        async with aiohttp.ClientSession(headers={"Cookie": f"{sessions.COOKIE}={cookie}"}) as client:
            for page in PAGES:
                times = []
                size = 0
                for _ in range(repeat):
                    start = time.perf_counter()
                    async with client.get(f"http://127.0.0.1:{port}{page}", allow_redirects=False) as response:
                        body = await response.read()
                        if response.status != 200:
                            raise SystemExit(f"{page}: {response.status} {body[:200]!r}")
                    times.append(time.perf_counter() - start)
                    size = len(body)
                rows.append((page, statistics.median(times) * 1000, max(times) * 1000, size))
    finally:
        await runner.cleanup()
        ctx.store.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connectors", type=int, default=1000)
    parser.add_argument("--apps", type=int, default=5000)
    parser.add_argument("--groups", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "service"
        start = time.perf_counter()
        seed(data_dir, args.connectors, args.apps, args.groups)
        print(f"seeded {args.connectors} connectors, {args.apps} apps, {args.groups} groups in {time.perf_counter() - start:.1f} s")
        rows = asyncio.run(measure(data_dir, args.repeat))
    print(f"{'page':45} {'median ms':>10} {'worst ms':>10} {'bytes':>8}")
    for page, median, worst, size in rows:
        print(f"{page:45} {median:10.1f} {worst:10.1f} {size:8d}")


if __name__ == "__main__":
    main()
