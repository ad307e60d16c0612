"""The ``backhaul`` command: argparse front end. Each handler lives with the part it runs."""

from __future__ import annotations

import argparse
import importlib
import sys

from backhaul.config import ClusterSettings, LogFiles
from backhaul.errors import BackhaulError


def _handler(path: str):
    """Resolve ``module:function`` lazily so `backhaul admin` does not import uvloop and friends."""
    module, _, name = path.partition(":")

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), name)(args)

    return run


def _version() -> str:
    from backhaul import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="backhaul", description="Outbound-only private network connector and relay.")
    parser.add_argument(
        "--log-level", default=None, choices=["debug", "info", "warning", "error"], help="default info (or the settings file's)"
    )
    parser.add_argument("--version", action="version", version=f"backhaul {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    service = commands.add_parser("service", help="the relay service").add_subparsers(dest="action", required=True)
    p = service.add_parser("init", help="create the CA, service certificate, admin token and store")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--name", action="append", default=[], help="host name or IP the service is reached at (repeat)")
    p.add_argument(
        "--store", default=None, metavar="URL",
        help="keep the service in PostgreSQL (postgresql://...), shared by several relay nodes; default: SQLite in the data dir",
    )
    p.add_argument(
        "--cluster-key-file", default=None, metavar="FILE",
        help="add this node to the service already in --store: a copy of cluster.key from one of its nodes",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_handler("backhaul.control.init:service_init"))
    p = service.add_parser(
        "run", help="run the relay",
        description="Flags win over the --config file, which wins over the defaults. SIGTERM drains, SIGHUP reloads "
        "the file (what needs a restart is refused and logged).",
    )
    p.add_argument("--data-dir", required=True)
    p.add_argument("--config", default=None, metavar="FILE", help="TOML settings file, read again on SIGHUP (deploy/relay.toml.example)")
    p.add_argument("--listen", default=None, help="HOST:PORT connectors dial (control API + tunnels; default 127.0.0.1:8443)")
    p.add_argument(
        "--advertise", default=None, metavar="HOST:PORT",
        help="what connectors dial to reach this node (default: --listen, or the service certificate's first name "
        "and the listen port when --listen is a wildcard)",
    )
    p.add_argument(
        "--peer-advertise", default=None, metavar="HOST:PORT",
        help="what the other relay nodes dial to reach this one (default: the --advertise address)",
    )
    p.add_argument(
        "--drain-grace", type=float, default=None, metavar="SECONDS",
        help="on SIGTERM with other nodes up, how long the user ports stay open after the listen port closed, "
        "so a load balancer checking it moves users away first (default 2)",
    )
    p.add_argument("--http", default=None, help="HOST:PORT where users reach published HTTP apps")
    p.add_argument("--https", default=None, help="HOST:PORT where users reach published HTTP apps over TLS")
    p.add_argument("--https-cert", default=None, metavar="FILE", help="PEM certificate (chain) of the HTTPS edge")
    p.add_argument("--https-key", default=None, metavar="FILE", help="PEM private key of the HTTPS edge")
    p.add_argument(
        "--http-limit", action="append", default=[], metavar="NAME=VALUE",
        help="change one limit of the HTTP edge (repeat), e.g. header_timeout=5; see backhaul.config.HttpLimits",
    )
    p.add_argument(
        "--listen-limit", action="append", default=[], metavar="NAME=VALUE",
        help="change one limit of the listen port or the descriptor reserve (repeat), e.g. idle_timeout=30; "
        "see backhaul.config.ListenLimits",
    )
    p.add_argument(
        "--tls", action="append", default=[], metavar="NAME=VALUE",
        help="change one setting of the tunnels' TLS (repeat), e.g. rotate_records=1000000; see backhaul.config.TlsSettings",
    )
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: one per core)")
    p.add_argument("--metrics", default=None, metavar="HOST:PORT", help="serve Prometheus metrics here (e.g. 127.0.0.1:9465; default off)")
    p.add_argument(
        "--cert-validity", type=float, default=None, metavar="SECONDS",
        help="lifetime of the connector certificates this relay signs (default 90 days)",
    )
    p.add_argument(
        "--remove-inactive-after", type=float, default=None, metavar="SECONDS",
        help="remove a connector inactive and unseen (no heartbeat, no tunnel) this long, at the next "
        "housekeeping run (default 864000: 10 days; keep it well above the connectors' 30 s heartbeat)",
    )
    p.add_argument(
        "--inactive-grace", type=float, default=None, metavar="SECONDS",
        help="a connector stays active this long after its last tunnel went away, so a redial is not a "
        "status flap (default 30)",
    )
    p.add_argument(
        "--housekeeping-interval", type=float, default=None, metavar="SECONDS",
        help="seconds between two housekeeping runs, which remove long-inactive connectors, expired "
        "revocations and used-up tokens (default 3600; 0: never)",
    )
    p.add_argument(
        "--keepalive-interval", type=float, default=None, metavar="SECONDS",
        help="PING a tunnel silent for this long (default 10)",
    )
    p.add_argument(
        "--keepalive-timeout", type=float, default=None, metavar="SECONDS",
        help="a tunnel silent for this long is dead; its unanswered opens are retried elsewhere (default 20)",
    )
    p.add_argument(
        "--udp-max-flows", type=int, default=None, metavar="N",
        help="user addresses one UDP app holds at once, per worker (default 4096)",
    )
    p.add_argument(
        "--udp-idle-timeout", type=float, default=None, metavar="SECONDS",
        help="a UDP flow with no datagram either way for this long ends (default 60)",
    )
    p.add_argument("--oidc-issuer", default=None, metavar="URL", help="OpenID Connect issuer of --preauth oidc apps")
    p.add_argument("--oidc-client-id", default=None, metavar="ID", help="the relay's client id at the issuer")
    p.add_argument(
        "--oidc-client-secret-file", default=None, metavar="FILE", help="file holding the client secret (none: public client)"
    )
    p.add_argument("--oidc-ca", default=None, metavar="FILE", help="CA bundle the issuer's certificate must chain to")
    p.add_argument(
        "--oidc-session-lifetime", type=float, default=None, metavar="SECONDS",
        help="how long a browser stays signed in to an oidc app (default 8 hours)",
    )
    p.add_argument(
        "--admin-oidc-claim", default=None, metavar="NAME=VALUE",
        help="let users of --oidc-issuer whose id_token has this claim (or a list claim holding VALUE) "
        "sign in to the admin center, e.g. groups=backhaul-admins (default: admin token only)",
    )
    p.add_argument("--log-dir", default=None, metavar="DIR", help="the relay's admin log file (default DATA_DIR/logs)")
    p.add_argument(
        "--log-max-bytes", type=int, default=None, metavar="N",
        help=f"rotate the admin log at this size (default {LogFiles.max_bytes // (1024 * 1024)} MiB)",
    )
    p.add_argument("--log-backups", type=int, default=None, metavar="N", help=f"rotated admin log files kept (default {LogFiles.backups})")
    p.set_defaults(func=_handler("backhaul.relay.service:service_run"))

    connector = commands.add_parser("connector", help="the connector agent").add_subparsers(dest="action", required=True)
    p = connector.add_parser(
        "register", help="enroll this machine as a connector",
        description="The enrollment token comes from exactly one of --token, --token-file or the "
        "environment variable BACKHAUL_ENROLL_TOKEN. Prefer the last two: --token is visible to "
        "other users in the process list.",
    )
    p.add_argument("--service", required=True, help="https://HOST:PORT of the relay")
    p.add_argument(
        "--token", default=None,
        help="enrollment token from `backhaul admin token create` (visible to other users in the process list: "
        "prefer --token-file or BACKHAUL_ENROLL_TOKEN)",
    )
    p.add_argument("--token-file", default=None, metavar="FILE", help="file holding the enrollment token")
    p.add_argument("--ca-sha256", required=True, help="SHA-256 of the service CA certificate (from `service init`)")
    p.add_argument("--state-dir", required=True)
    p.add_argument("--name", default=None)
    p.add_argument(
        "--proxy", default=None, metavar="URL",
        help="reach the relay through this HTTP CONNECT proxy, http://[USER:PASSWORD@]HOST:PORT "
        "(default: HTTPS_PROXY unless NO_PROXY names the relay)",
    )
    p.add_argument(
        "--release-key", action="append", default=[], metavar="FILE",
        help="public key releases must be signed with (from `backhaul release keygen`; repeat for several); "
        "without one the updater installs nothing",
    )
    p.set_defaults(func=_handler("backhaul.connector.enroll:register"))
    p = connector.add_parser(
        "run", help="run the connector",
        description="Flags win over the --config file, which wins over the defaults. SIGTERM drains, SIGHUP reloads.",
    )
    p.add_argument("--state-dir", required=True)
    p.add_argument("--config", default=None, metavar="FILE", help="TOML settings file, read again on SIGHUP")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: one per core)")
    p.add_argument("--tunnels", type=int, default=None, help="tunnels per connector (default 4)")
    p.add_argument(
        "--relay-nodes", type=int, default=None, metavar="N",
        help=f"distinct relay nodes to hold tunnels to when the service has several (default {ClusterSettings.connector_nodes})",
    )
    p.add_argument(
        "--heartbeat", type=float, default=None, metavar="SECONDS",
        help="seconds between heartbeats and certificate renewal checks (default 30)",
    )
    p.add_argument(
        "--health-interval", type=float, default=None, metavar="SECONDS",
        help="seconds between two checks that the apps' origins are reachable (default 10)",
    )
    p.add_argument(
        "--drain-timeout", type=float, default=None, metavar="SECONDS",
        help="on SIGTERM, how long streams in flight may take to finish (default 30)",
    )
    p.add_argument(
        "--proxy", default=None, metavar="URL",
        help="reach the relay through this HTTP CONNECT proxy, http://[USER:PASSWORD@]HOST:PORT "
        "(default: HTTPS_PROXY unless NO_PROXY names the relay)",
    )
    p.add_argument("--metrics", default=None, metavar="HOST:PORT", help="serve Prometheus metrics here (e.g. 127.0.0.1:9464; default off)")
    p.add_argument("--log-dir", default=None, metavar="DIR", help="admin and session log files (default STATE_DIR/logs)")
    p.add_argument(
        "--log-max-bytes", type=int, default=LogFiles.max_bytes, metavar="N",
        help=f"rotate a log file at this size (default {LogFiles.max_bytes // (1024 * 1024)} MiB)",
    )
    p.add_argument(
        "--log-backups", type=int, default=LogFiles.backups, metavar="N",
        help=f"rotated files kept per log (default {LogFiles.backups})",
    )
    p.set_defaults(func=_handler("backhaul.connector.service:connector_run"))
    p = connector.add_parser("status", help="show this connector's state and live figures")
    p.add_argument("--state-dir", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_handler("backhaul.connector.service:connector_status"))
    p = connector.add_parser("doctor", help="check what this connector needs and say what to fix")
    p.add_argument("--state-dir", required=True)
    p.add_argument("--ca-sha256", default=None, help="expected SHA-256 of the service CA (from `service init`), checked too")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help="per network check (default 5)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_handler("backhaul.connector.doctor:doctor"))
    p = connector.add_parser("session-log", help="switch the running connector's session log on or off")
    p.add_argument("switch", choices=["on", "off"])
    p.add_argument("--state-dir", required=True)
    p.set_defaults(func=_handler("backhaul.connector.service:connector_session_log"))

    updater = commands.add_parser("updater", help="signed connector releases: check, install, switch, roll back").add_subparsers(
        dest="action", required=True
    )
    limit_help = "change one limit of the updater (repeat), e.g. ready_deadline=30; see backhaul.config.UpdaterLimits"
    p = updater.add_parser(
        "run", help="check for releases at start and on an interval; install, switch and health-gate them",
        description="SIGTERM stops it (with --supervise: the connector drains first).",
    )
    p.add_argument("--state-dir", required=True, help="the connector's state dir (its credentials and pinned release keys)")
    p.add_argument("--install-root", required=True, metavar="ROOT", help="versions/<version>/venv and the current link live here")
    p.add_argument("--check-interval", type=float, default=None, metavar="S", help="seconds between checks, jittered +-20%% (default 3600)")
    p.add_argument("--supervise", action="store_true", help="run the connector from ROOT/current as a child (no systemd)")
    p.add_argument("--connector-config", default=None, metavar="FILE", help="with --supervise: the connector's --config file")
    p.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE", help=limit_help)
    p.set_defaults(func=_handler("backhaul.updater.commands:updater_run"))
    p = updater.add_parser("apply", help="the manual update, now (the newest release, or --version)")
    p.add_argument("--state-dir", required=True)
    p.add_argument("--install-root", required=True, metavar="ROOT")
    p.add_argument("--version", default=None, metavar="V", help="this release (it must still be newer than the installed one)")
    p.add_argument("--force", action="store_true", help="do not take the group's update lease (the group may lose its last connector)")
    p.add_argument(
        "--wheelhouse", default=None, metavar="DIR",
        help="apply the signed release in DIR (release.manifest, release.sig and the wheels) instead of the relay's",
    )
    p.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE", help=limit_help)
    p.set_defaults(func=_handler("backhaul.updater.commands:updater_apply"))
    p = updater.add_parser("install", help="first install on a VM: lay out ROOT from a local wheelhouse, install the units")
    p.add_argument("--install-root", required=True, metavar="ROOT")
    p.add_argument("--wheelhouse", required=True, metavar="DIR", help="the backhaul wheel and the wheels it depends on")
    p.add_argument("--state-dir", default=None, help="a state dir with pinned keys: the wheelhouse's signed manifest is checked")
    p.add_argument("--no-systemd", action="store_true", help="do not write and enable the systemd units")
    p.set_defaults(func=_handler("backhaul.updater.commands:updater_install"))

    demo = commands.add_parser("demo", help="the whole system on loopback, one command")
    demo.add_argument("--seconds", type=float, default=None, help="stop after this long (default: until Ctrl-C)")
    demo.add_argument(
        "--dir", default=None, metavar="DIR",
        help="new or empty work dir for the demo's keys, state and logs, kept after it stops (default: a new one in /tmp)",
    )
    demo.set_defaults(func=_handler("backhaul.demo:demo"))

    release = commands.add_parser("release", help="signed connector releases (the publisher's side)").add_subparsers(
        dest="action", required=True
    )
    p = release.add_parser("keygen", help="make an Ed25519 release signing key pair")
    p.add_argument("--private", required=True, metavar="FILE", help="the private key (0600; keep it off the relay)")
    p.add_argument("--public", required=True, metavar="FILE", help="the public key, to pin on connectors")
    p.set_defaults(func=_handler("backhaul.release.publish:keygen"))

    admin = commands.add_parser("admin", help="administer the relay service")
    importlib.import_module("backhaul.admin.commands").add_parser(admin)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``backhaul`` script."""
    args = build_parser().parse_args(argv)
    from backhaul.logs import setup_logging

    setup_logging(args.log_level or "info")
    try:
        return int(args.func(args) or 0)
    except BackhaulError as exc:
        print(f"backhaul: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
