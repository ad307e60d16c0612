"""What the OIDC gate costs per request, by kind of request; one table.

    PYTHONPATH=src .venv/bin/python bench/oidc_gate_table.py [--seconds 1]

The gate runs against the test issuer (tests/e2e/oidc_issuer.py) on loopback HTTPS;
its discovery and keys are fetched once before measuring, so every row is the gate's
own CPU cost on one core: cookie and token checks, signing, building the answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backhaul.config import OidcSettings
from backhaul.relay.preauth.identity import User
from backhaul.relay.preauth.oidc import JWKS_PATH, OidcGate
from backhaul.relay.preauth.contract import Allow, RequestHead
from backhaul.store.base import App
from tests.e2e.oidc_issuer import OidcIssuer

HOST = "app.example.test"
APP = App(name="web", group="default", proto="http", external_host=HOST, internal_url="http://127.0.0.1:9/", preauth="oidc")


def head(*headers: tuple[str, str], target: str = "/page") -> RequestHead:
    return RequestHead("GET", target, (("host", HOST), *headers), "https", HOST, "127.0.0.1")


async def rate(gate: OidcGate, request: RequestHead, seconds: float) -> float:
    count, started = 0, time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        for _ in range(100):
            await gate.check(APP, request)
        count += 100
    return count / (time.perf_counter() - started)


async def measure(issuer: OidcIssuer, data_dir: Path, seconds: float) -> list[tuple[str, float]]:
    settings = OidcSettings(
        issuer=issuer.issuer, client_id=issuer.client_id, client_secret=issuer.client_secret, ca_file=str(issuer.ca_path)
    )
    gate = OidcGate.create(data_dir, settings)
    try:
        await gate.client.prefetch()
        token = issuer.mint(lifetime=3600)
        allowed = await gate.check(APP, head(("authorization", f"Bearer {token}")))
        assert isinstance(allowed, Allow)
        user = User(sub="user-0001", idp=issuer.issuer, email="alice@example.test", username="alice")
        session = gate.cookies.issue_session(HOST, user, time.time())
        cases = {
            "session cookie -> Allow": head(("cookie", f"other=1; backhaul_session={session}")),
            "bearer RS256 -> Allow": head(("authorization", f"Bearer {token}")),
            "bearer, unknown key id -> 401": head(("authorization", f"Bearer {issuer.mint(kid='unknown')}")),
            "browser, no session -> 302 login": head(("accept", "text/html")),
            "API, no credentials -> 401": head(("accept", "application/json")),
            "GET /.backhaul/jwks.json": head(target=JWKS_PATH),
        }
        return [(name, await rate(gate, request, seconds)) for name, request in cases.items()]
    finally:
        await gate.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per row")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "relay").mkdir()
        (work / "relay" / "service.json").write_text(json.dumps({"ca_sha256": "00" * 32}))
        with OidcIssuer(work) as issuer:
            rows = asyncio.run(measure(issuer, work / "relay", args.seconds))
    width = max(len(name) for name, _ in rows)
    print(f"{'request':<{width}}  {'checks/s':>10}  {'us/check':>9}")
    for name, per_second in rows:
        print(f"{name:<{width}}  {per_second:>10.0f}  {1e6 / per_second:>9.1f}")


if __name__ == "__main__":
    main()
