"""OIDC pre-authentication through `backhaul service run`: flags, keys, warm-up (real processes)."""

from __future__ import annotations

import os
import stat

import pytest

from .harness import BACKHAUL, Proc, System, wait_until
from .oidc_issuer import OidcIssuer

pytestmark = pytest.mark.e2e


def oidc_flags(issuer: OidcIssuer) -> list[str]:
    return [
        "--oidc-issuer", issuer.issuer,
        "--oidc-client-id", issuer.client_id,
        "--oidc-client-secret-file", str(issuer.secret_path),
        "--oidc-ca", str(issuer.ca_path),
    ]


def start_relay(system: System, *args: str, workers: int = 1) -> Proc:
    """The relay of ``system`` with extra `service run` flags, up and healthy."""
    system.relay = Proc(
        f"relay-{len(system.procs)}",
        BACKHAUL + ["service", "run", "--data-dir", str(system.data_dir), "--listen", f"127.0.0.1:{system.port}",
                    "--workers", str(workers), *args],
        system.workdir,
        system.env,
    )
    system.procs.append(system.relay)
    system.wait_healthy()
    return system.relay


@pytest.mark.codec_independent
def test_service_run_refuses_incomplete_or_bad_oidc_flags(tmp_path):
    system = System(tmp_path)
    system.init()
    secret = tmp_path / "secret"
    secret.write_text("")
    run = ["service", "run", "--data-dir", str(system.data_dir)]
    cases = {
        ("--oidc-client-id", "x"): "needs --oidc-issuer",
        ("--oidc-issuer", "https://127.0.0.1:1"): "needs --oidc-client-id",
        ("--oidc-issuer", "http://127.0.0.1:1", "--oidc-client-id", "x"): "https://",
        ("--oidc-issuer", "https://127.0.0.1:1", "--oidc-client-id", "x", "--oidc-client-secret-file", str(secret)): "is empty",
        ("--oidc-issuer", "https://127.0.0.1:1", "--oidc-client-id", "x", "--oidc-client-secret-file", str(tmp_path / "none")): "cannot read",
        ("--oidc-issuer", "https://127.0.0.1:1", "--oidc-client-id", "x", "--oidc-ca", str(tmp_path / "none.pem")): "--oidc-ca",
    }
    for flags, message in cases.items():
        result = system.cli(*run, *flags, check=False, timeout=30)
        assert result.returncode == 2 and message in result.stderr, (flags, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.codec_independent
def test_relay_with_an_issuer_creates_its_keys_once_and_warms_up(tmp_path):
    with OidcIssuer(tmp_path) as issuer:
        system = System(tmp_path)
        try:
            system.init()
            start_relay(system, *oidc_flags(issuer), workers=2)
            # Each worker fetches discovery and keys at start, before any user asks.
            wait_until(lambda: issuer.hits["/jwks"] >= 2, 20, "both relay workers to fetch the issuer's JWKS")
            assert issuer.hits["/.well-known/openid-configuration"] >= 2
            keys = {name: (system.data_dir / name).read_bytes() for name in ("identity.key", "session.key")}
            for name in keys:
                assert stat.S_IMODE(os.stat(system.data_dir / name).st_mode) == 0o600
            system.relay.stop()
            start_relay(system, *oidc_flags(issuer))
            wait_until(lambda: issuer.hits["/jwks"] >= 3, 20, "the restarted relay to fetch the JWKS")
            assert keys == {name: (system.data_dir / name).read_bytes() for name in keys}, "keys are kept across restarts"
        finally:
            system.stop()
