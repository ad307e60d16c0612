"""`backhaul connector run` and `backhaul connector status`."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import logging
import resource
import secrets
import sys
from pathlib import Path

import orjson

from backhaul.config import HealthChecks, default_workers
from backhaul.connector.agent import ConnectorSettings, run_agent
from backhaul.connector.settings import SettingsSource, apply_log_level
from backhaul.errors import BackhaulError, ConfigError
from backhaul.supervisor import supervise
from backhaul.transport.proxy_connect import choose_proxy

log = logging.getLogger("backhaul.connector")

#: The supervisor waits this much longer than the drain deadline before it kills a worker.
GRACE_MARGIN = 10.0
#: `connector run` flags that are settings, and the ConnectorSettings field each one sets.
_FLAGS = {
    "workers": "workers",
    "tunnels": "tunnels",
    "heartbeat": "heartbeat_interval",
    "drain_timeout": "drain_timeout",
    "log_level": "log_level",
}


def _run(source: SettingsSource, base: ConnectorSettings, index: int) -> None:
    fixed = {"worker": index, "boot_id": base.boot_id, "proxy": base.proxy}
    try:
        # A restarted worker picks up what the file says now (a reload may have changed it).
        settings = source.load(**fixed, workers=base.workers)
    except BackhaulError as exc:
        log.error("settings file unusable; this worker runs with the settings of the start", extra={"error": str(exc)})
        settings = dataclasses.replace(base, worker=index)
    apply_log_level(settings.log_level)
    run_agent(settings, functools.partial(source.load, **fixed))


def _raise_open_file_limit() -> None:
    """Every stream holds a socket: lift the soft limit on open files to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    log.debug("open-file limit", extra={"soft": hard, "was": soft})


def connector_run(args: argparse.Namespace) -> int:
    """Run the connector's workers until SIGTERM; SIGHUP reloads the settings."""
    from backhaul.connector.state import ConnectorState

    state = ConnectorState.load(args.state_dir)  # fails here, in words, on a missing or expired registration
    overrides = tuple((field, getattr(args, flag)) for flag, field in _FLAGS.items() if getattr(args, flag, None) is not None)
    if args.health_interval is not None:
        if not 0.1 <= args.health_interval <= 3600:
            raise ConfigError("--health-interval must be from 0.1 to 3600 seconds")
        interval = args.health_interval
        overrides += (("health", HealthChecks(interval=interval, timeout=min(HealthChecks.timeout, interval))),)
    source = SettingsSource(
        state_dir=Path(args.state_dir),
        config=Path(args.config) if args.config else None,
        overrides=overrides,
        default_workers=default_workers(),
    )
    settings = source.load(boot_id=secrets.token_hex(8), proxy=choose_proxy(args.proxy, state.host))
    apply_log_level(settings.log_level)
    _raise_open_file_limit()

    def reload() -> float:
        return source.load().drain_timeout + GRACE_MARGIN

    return supervise(
        functools.partial(_run, source, settings),
        settings.workers,
        "connector",
        grace=settings.drain_timeout + GRACE_MARGIN,
        on_reload=reload,
    )


def connector_status(args: argparse.Namespace) -> int:
    """Print what this connector is and how long its certificate lasts."""
    from backhaul.connector.state import ConnectorState

    state = ConnectorState.load(args.state_dir)
    expires = state.cert_not_after
    info = {
        "connector_id": state.connector_id,
        "name": state.name,
        "service": state.service_url,
        "certificate_expires": expires.isoformat(),
        "certificate_days_left": round((expires - datetime.datetime.now(datetime.timezone.utc)).total_seconds() / 86400, 1),
    }
    if args.json:
        sys.stdout.write(orjson.dumps(info).decode() + "\n")
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key.replace('_', ' '):<{width}}  {value}")
    return 0
