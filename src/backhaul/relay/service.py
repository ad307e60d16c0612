"""`backhaul service run`: the relay's supervisor and its worker processes."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from backhaul import tlsconfig
from backhaul.config import HttpLimits, OidcSettings, default_workers
from backhaul.errors import ConfigError
from backhaul.relay.worker import RelaySettings, run_worker
from backhaul.supervisor import supervise
from backhaul.transport.sockets import parse_hostport


def _run(settings: RelaySettings, index: int) -> None:
    import dataclasses

    run_worker(dataclasses.replace(settings, worker=index))


def oidc_settings(args: argparse.Namespace) -> OidcSettings | None:
    """The --oidc-* flags as settings (None without --oidc-issuer), checked before any worker starts."""
    given = [flag for flag in ("oidc_client_id", "oidc_client_secret_file", "oidc_ca", "oidc_session_lifetime") if getattr(args, flag) is not None]
    if args.oidc_issuer is None:
        if given:
            raise ConfigError(f"--{given[0].replace('_', '-')} needs --oidc-issuer URL")
        return None
    if not args.oidc_client_id:
        raise ConfigError("--oidc-issuer needs --oidc-client-id ID (the relay's client at the issuer)")
    secret = None
    if args.oidc_client_secret_file is not None:
        try:
            secret = Path(args.oidc_client_secret_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read --oidc-client-secret-file {args.oidc_client_secret_file}: {exc}") from exc
        if not secret:
            raise ConfigError(f"--oidc-client-secret-file {args.oidc_client_secret_file} is empty; put the client secret in it")
    if args.oidc_ca is not None and not Path(args.oidc_ca).is_file():
        raise ConfigError(f"--oidc-ca {args.oidc_ca} is not a file; pass the PEM CA bundle of the issuer")
    changes = {}
    if args.oidc_session_lifetime is not None:
        if args.oidc_session_lifetime < 60:
            raise ConfigError("--oidc-session-lifetime must be at least 60 seconds")
        changes["session_lifetime"] = args.oidc_session_lifetime
    try:
        return OidcSettings(
            issuer=args.oidc_issuer, client_id=args.oidc_client_id, client_secret=secret, ca_file=args.oidc_ca, **changes
        )
    except ValueError as exc:
        raise ConfigError(f"--oidc-issuer: {exc}") from exc


def service_run(args: argparse.Namespace) -> int:
    """Run the relay until SIGTERM."""
    data_dir = Path(args.data_dir)
    if not (data_dir / "service.json").is_file():
        raise ConfigError(f"{data_dir} is not an initialized data dir; run `backhaul service init --data-dir {data_dir}`")
    parse_hostport(args.listen, "--listen")
    if args.http:
        parse_hostport(args.http, "--http")
    https_cert = https_key = None
    if args.https:
        parse_hostport(args.https, "--https")
        if not args.https_cert or not args.https_key:
            raise ConfigError("--https needs --https-cert FILE and --https-key FILE (the certificate users see)")
        https_cert, https_key = Path(args.https_cert), Path(args.https_key)
        tlsconfig.edge_context(https_cert, https_key)  # refuse a bad pair now, not in every worker
    elif args.https_cert or args.https_key:
        raise ConfigError("--https-cert and --https-key are for the HTTPS edge; add --https HOST:PORT")
    try:
        http_limits = HttpLimits().replace_from(args.http_limit or [])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    workers = args.workers or default_workers()
    if workers < 1:
        raise ConfigError("--workers must be at least 1")
    if args.cert_validity is not None and args.cert_validity < 10:
        raise ConfigError("--cert-validity must be at least 10 seconds")
    settings = RelaySettings(
        data_dir=data_dir, listen=args.listen, http=args.http, workers=workers, cert_validity=args.cert_validity,
        https=args.https, https_cert=https_cert, https_key=https_key, http_limits=http_limits,
        oidc=oidc_settings(args),
    )
    return supervise(functools.partial(_run, settings), workers, "relay")
