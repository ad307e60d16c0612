"""OIDC pre-authentication through `backhaul service run`: flags, keys, warm-up (real processes)."""

from __future__ import annotations

import os
import re
import stat

import pytest

from backhaul.cli import build_parser
from backhaul.errors import ConfigError

from .harness import System, wait_until
from .oidc_issuer import OidcIssuer

pytestmark = pytest.mark.e2e


def oidc_flags(issuer: OidcIssuer) -> list[str]:
    return [
        "--oidc-issuer", issuer.issuer,
        "--oidc-client-id", issuer.client_id,
        "--oidc-client-secret-file", str(issuer.secret_path),
        "--oidc-ca", str(issuer.ca_path),
    ]


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
    # The whole CLI once in a process of its own: exit status 2, one line on stderr ...
    result = system.cli(*run, "--oidc-client-id", "x", check=False, timeout=30)
    assert result.returncode == 2 and result.stderr.strip() == "backhaul: --oidc-client-id needs --oidc-issuer URL"
    # ... and every case through the same parser and handler in this process (spawning each is slow).
    for flags, message in cases.items():
        args = build_parser().parse_args([*run, *flags])
        with pytest.raises(ConfigError, match=re.escape(message)):
            args.func(args)


@pytest.mark.codec_independent
def test_relay_with_an_issuer_creates_its_keys_once_and_warms_up(tmp_path):
    with OidcIssuer(tmp_path) as issuer:
        system = System(tmp_path)
        try:
            system.init()
            system.start_relay(workers=2, extra=tuple(oidc_flags(issuer)))
            # Each worker fetches discovery and keys at start, before any user asks.
            wait_until(lambda: issuer.hits["/jwks"] >= 2, 20, "both relay workers to fetch the issuer's JWKS")
            assert issuer.hits["/.well-known/openid-configuration"] >= 2
            keys = {name: (system.data_dir / name).read_bytes() for name in ("identity.key", "session.key")}
            for name in keys:
                assert stat.S_IMODE(os.stat(system.data_dir / name).st_mode) == 0o600
            system.relay.stop()
            system.start_relay(extra=tuple(oidc_flags(issuer)))
            wait_until(lambda: issuer.hits["/jwks"] >= 3, 20, "the restarted relay to fetch the JWKS")
            assert keys == {name: (system.data_dir / name).read_bytes() for name in keys}, "keys are kept across restarts"
        finally:
            system.stop()
