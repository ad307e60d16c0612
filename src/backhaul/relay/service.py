"""`backhaul service run`: the relay's supervisor and its worker processes."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
from pathlib import Path

from backhaul import tlsconfig
from backhaul.config import (
    AdminCenterSettings, ClusterSettings, FloodLimits, HttpLimits, Keepalive, ListenLimits, LogFiles, OidcSettings, TlsSettings,
    UdpLimits, _replace_from, default_workers,
)
from backhaul.center.oidc import parse_claim
from backhaul.errors import ConfigError
from backhaul.logs import RELAY_PER_CONNECTION, add_admin_log
from backhaul.relay.settings import SettingsFile, apply_log_level
from backhaul.relay.worker import RelaySettings, register_node, run_worker
from backhaul.supervisor import instance_lock, supervise
from backhaul.transport.sockets import parse_hostport

log = logging.getLogger("backhaul.relay")

def _run(settings: RelaySettings, index: int) -> None:
    # The child's logging was set up anew (stderr only): the admin log file again.
    add_admin_log(settings.log_files, quiet=RELAY_PER_CONNECTION)
    run_worker(dataclasses.replace(settings, worker=index))


def udp_limits(max_flows: int | None, idle_timeout: float | None) -> UdpLimits:
    """UdpLimits from `service run` flags; ConfigError, in words, on a bad value."""
    given = {"max_flows": max_flows, "idle_timeout": idle_timeout}
    changes = {key: value for key, value in given.items() if value is not None}
    if changes.get("max_flows", 1) < 1 or changes.get("idle_timeout", 1) <= 0:
        raise ConfigError("--udp-max-flows must be at least 1 and --udp-idle-timeout above 0")
    return UdpLimits(**changes)


def admin_center_settings(args: argparse.Namespace) -> AdminCenterSettings:
    """The admin center's settings from --admin-oidc-claim (which needs --oidc-issuer)."""
    claim = getattr(args, "admin_oidc_claim", None)
    if claim is None:
        return AdminCenterSettings()
    if args.oidc_issuer is None:
        raise ConfigError("--admin-oidc-claim needs --oidc-issuer URL (the issuer admins sign in with)")
    try:
        return AdminCenterSettings(oidc_claim=parse_claim(claim))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


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


_WILDCARDS = ("", "0.0.0.0", "::")


def _refuse_shared_ports(addresses: dict[str, str | None]) -> None:
    """ConfigError when two of the relay's listeners would share an address: every port is
    bound with SO_REUSEPORT, so they would both bind and split the connections between them."""
    seen: list[tuple[str, str, int]] = []
    for flag, value in addresses.items():
        if not value:
            continue
        host, port = parse_hostport(value, flag)
        for other_flag, other_host, other_port in seen:
            if port and port == other_port and (host == other_host or host in _WILDCARDS or other_host in _WILDCARDS):
                raise ConfigError(f"{flag} {value} and {other_flag} use the same address; give each its own port")
        seen.append((flag, host, port))


#: Where the relay listens when neither --listen nor the settings file says.
DEFAULT_LISTEN = "127.0.0.1:8443"
#: The admin log's directory under the data dir when neither --log-dir nor the file says.
LOG_DIR = "logs"


def inactive_settings(args: argparse.Namespace) -> dict[str, float]:
    """The inactive-connector flags given (RelaySettings fields; the rest keep their defaults)."""
    given = {}
    for name, flag, least in (
        # Keep it well above the connectors' heartbeat interval (30 s): a connector that is up
        # without a tunnel is kept only by its heartbeats. Tests use a few seconds.
        ("remove_inactive_after", "--remove-inactive-after", 1.0),
        ("inactive_grace", "--inactive-grace", 0.0),
        ("housekeeping_interval", "--housekeeping-interval", 0.0),
    ):
        value = getattr(args, name, None)
        if value is None:
            continue
        if not value >= least:  # also refuses nan
            raise ConfigError(f"{flag} must be at least {least:g} seconds, not {value}")
        given[name] = float(value)
    return given


def service_run(args: argparse.Namespace) -> int:
    """Run the relay until SIGTERM; SIGHUP reads the settings file again."""
    source = SettingsFile(args, Path(args.config) if getattr(args, "config", None) else None)
    given = source.merged()  # a bad settings file fails here, before anything starts
    settings = build_settings(given)
    data_dir = settings.data_dir
    settings = dataclasses.replace(settings, settings_file=source, given=given, rebuild=build_settings)
    with instance_lock(data_dir / LOCK_FILE, f"a relay on data dir {data_dir}"):
        apply_log_level(given.log_level or "info")
        add_admin_log(settings.log_files, quiet=RELAY_PER_CONNECTION)
        _warn_loose_modes(data_dir)
        if settings.workers > 1:
            # Before any worker counts a tunnel on this node (worker 0 registers again at its
            # start, and says node_stopped at its clean stop).
            register_node(settings)
        return _supervise(given, data_dir, settings, settings.workers)


def build_settings(args: argparse.Namespace) -> RelaySettings:
    """RelaySettings from `service run`'s arguments (flags over the settings file); ConfigError,
    in words, on anything wrong, before any worker starts (and at a reload)."""
    data_dir = Path(args.data_dir)
    if not (data_dir / "service.json").is_file():
        raise ConfigError(f"{data_dir} is not an initialized data dir; run `backhaul service init --data-dir {data_dir}`")
    listen = args.listen or DEFAULT_LISTEN
    parse_hostport(listen, "--listen")
    if args.http:
        parse_hostport(args.http, "--http")
    _refuse_shared_ports({"--listen": listen, "--http": args.http, "--https": args.https})
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
        listen_limits = ListenLimits().replace_from(getattr(args, "listen_limit", None) or [])
        tls = TlsSettings().replace_from(getattr(args, "tls", None) or [])
        floods = _replace_from(FloodLimits(), getattr(args, "floods", None) or [], "[floods]")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    workers = args.workers or default_workers()
    if workers < 1:
        raise ConfigError("--workers must be at least 1")
    if args.cert_validity is not None and args.cert_validity < 10:
        raise ConfigError("--cert-validity must be at least 10 seconds")
    lifecycle = inactive_settings(args)
    keepalive = Keepalive()
    keepalive = Keepalive(
        interval=args.keepalive_interval if args.keepalive_interval is not None else keepalive.interval,
        timeout=args.keepalive_timeout if args.keepalive_timeout is not None else keepalive.timeout,
    )
    if not 0 < keepalive.interval < keepalive.timeout:
        raise ConfigError("--keepalive-interval must be above 0 and below --keepalive-timeout")
    from backhaul.control.init import ensure_node_id, read_service, store_location

    advertise = _advertise(listen, getattr(args, "advertise", None), read_service(data_dir).get("names") or [])
    peer_advertise = getattr(args, "peer_advertise", None) or advertise
    parse_hostport(peer_advertise, "--peer-advertise")
    cluster = ClusterSettings()
    if getattr(args, "drain_grace", None) is not None:
        if args.drain_grace < 0:
            raise ConfigError("--drain-grace must not be negative")
        cluster = dataclasses.replace(cluster, drain_grace=args.drain_grace)
    return RelaySettings(
        data_dir=data_dir, listen=listen, http=args.http, workers=workers, cert_validity=args.cert_validity,
        cluster=cluster, node_id=ensure_node_id(data_dir), store=store_location(data_dir), advertise=advertise, peer_advertise=peer_advertise,
        https=args.https, https_cert=https_cert, https_key=https_key, http_limits=http_limits, listen_limits=listen_limits,
        keepalive=keepalive, tls=tls, floods=floods,
        udp=udp_limits(args.udp_max_flows, args.udp_idle_timeout),
        oidc=oidc_settings(args),
        admin_center=admin_center_settings(args),
        log_files=log_files(args, data_dir),
        **lifecycle,
    )


def log_files(args: argparse.Namespace, data_dir: Path) -> LogFiles:
    """The relay's admin log: --log-dir (default DATA_DIR/logs), its rotation."""
    changes = {
        key: value
        for key, value in (("max_bytes", getattr(args, "log_max_bytes", None)), ("backups", getattr(args, "log_backups", None)))
        if value is not None
    }
    log_dir = getattr(args, "log_dir", None)
    try:
        return LogFiles(directory=Path(log_dir) if log_dir else data_dir / LOG_DIR, **changes)
    except ValueError as exc:
        raise ConfigError(f"--log-max-bytes / --log-backups: {exc}") from None


def _advertise(listen: str, given: str | None, names: list[str]) -> str:
    """What connectors dial: --advertise, else --listen, else (a wildcard --listen) the service
    certificate's first name with the listen port."""
    if given:
        parse_hostport(given, "--advertise")
        return given
    host, port = parse_hostport(listen, "--listen")
    if host not in _WILDCARDS:
        return listen
    if not names:
        raise ConfigError(f"--listen {listen} is a wildcard and the service has no name; pass --advertise HOST:PORT")
    name = names[0]
    return f"[{name}]:{port}" if ":" in name else f"{name}:{port}"


#: In the data dir: locked by the running relay (holds its PID), so a second `service run`
#: on the same dir refuses to start instead of sharing its ports through SO_REUSEPORT.
LOCK_FILE = "relay.lock"


def _warn_loose_modes(data_dir: Path) -> None:
    from backhaul.control.init import chmod_command, loose_modes

    loose = loose_modes(data_dir)
    if loose:
        log.warning(
            "the data dir or its secrets can be read by other users; make them private",
            extra={"files": [str(p) for p in loose], "fix": chmod_command(loose)},
        )


def _supervise(args: argparse.Namespace, data_dir: Path, settings: RelaySettings, workers: int) -> int:
    from backhaul import metrics
    from backhaul.relay.metrics import SPECS
    from backhaul.reporter import prepare_run_dir

    # Every worker publishes its figures to the run dir, --metrics or not: the admin
    # center's traffic charts read the relay's own counters from there (relay.metrics.node_traffic).
    run_dir = prepare_run_dir(data_dir, SPECS)
    settings = dataclasses.replace(settings, run_dir=run_dir)
    if not getattr(args, "metrics", None):
        return supervise(functools.partial(_run, settings), workers, "relay")
    with metrics.listen(args.metrics) as sock:
        settings = dataclasses.replace(settings, metrics_fd=sock.fileno())
        return supervise(functools.partial(_run, settings), workers, "relay")
