"""`backhaul connector run` and `backhaul connector status`."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import secrets
import sys
from pathlib import Path

import orjson

from backhaul.config import default_workers
from backhaul.connector.agent import ConnectorSettings, run_agent
from backhaul.errors import ConfigError
from backhaul.supervisor import supervise
from backhaul.transport.proxy_connect import choose_proxy


def _run(settings: ConnectorSettings, index: int) -> None:
    run_agent(dataclasses.replace(settings, worker=index))


def connector_run(args: argparse.Namespace) -> int:
    """Run the connector's workers until SIGTERM."""
    from backhaul.connector.state import ConnectorState

    state = ConnectorState.load(args.state_dir)  # fails here, in words, on a missing or expired registration
    workers = args.workers or default_workers()
    if workers < 1 or args.tunnels < 1:
        raise ConfigError("--workers and --tunnels must be at least 1")
    if args.heartbeat < 1:
        raise ConfigError("--heartbeat must be at least 1 second")
    settings = ConnectorSettings(
        state_dir=Path(args.state_dir),
        workers=workers,
        tunnels=args.tunnels,
        boot_id=secrets.token_hex(8),
        heartbeat_interval=args.heartbeat,
        proxy=choose_proxy(args.proxy, state.host),
    )
    return supervise(functools.partial(_run, settings), workers, "connector")


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
