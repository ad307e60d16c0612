"""`backhaul connector run`, `status` and `session-log`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import functools
import logging
import resource
import secrets
import sys
from pathlib import Path

import orjson

from backhaul import metrics
from backhaul.admin.tables import table
from backhaul.config import HealthChecks, LogFiles, default_workers
from backhaul.connector import control_socket
from backhaul.connector.agent import run_agent
from backhaul.connector.metrics import SPECS
from backhaul.connector.session_log import SWITCH
from backhaul.connector.settings import ConnectorSettings, SettingsSource, apply_log_level
from backhaul.connector.state import LOG_DIR, ConnectorState, release_keys_summary
from backhaul.errors import BackhaulError, ConfigError
from backhaul.logs import add_admin_log
from backhaul.reporter import prepare_run_dir
from backhaul.supervisor import supervise
from backhaul.transport.proxy_connect import choose_proxy

log = logging.getLogger("backhaul.connector")

#: The supervisor waits this much longer than the drain deadline before it kills a worker.
GRACE_MARGIN = 10.0
#: `connector run` flags that are settings, and the ConnectorSettings field each one sets.
_FLAGS = {
    "workers": "workers",
    "tunnels": "tunnels",
    "relay_nodes": "relay_nodes",
    "heartbeat": "heartbeat_interval",
    "drain_timeout": "drain_timeout",
    "log_level": "log_level",
}


#: Settings made once by `connector run` itself (never by the file), handed to every worker.
PROCESS_FIELDS = ("boot_id", "proxy", "log_files", "run_dir", "metrics_fd", "control_fd")


def _run(source: SettingsSource, base: ConnectorSettings, index: int) -> None:
    fixed = {"worker": index, **{name: getattr(base, name) for name in PROCESS_FIELDS}}
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
    state = ConnectorState.load(args.state_dir)  # fails here, in words, on a missing or expired registration
    overrides = tuple((field, getattr(args, flag)) for flag, field in _FLAGS.items() if getattr(args, flag, None) is not None)
    if args.health_interval is not None:
        if not 0.1 <= args.health_interval <= 3600:
            raise ConfigError("--health-interval must be from 0.1 to 3600 seconds")
        interval = args.health_interval
        overrides += (("health", HealthChecks(interval=interval, timeout=min(HealthChecks.timeout, interval))),)
    state_dir = Path(args.state_dir)
    source = SettingsSource(
        state_dir=state_dir,
        config=Path(args.config) if args.config else None,
        overrides=overrides,
        default_workers=default_workers(),
    )
    source.load()  # a bad settings file fails here, before any socket is bound
    log_files = _log_files(args, state_dir)
    with contextlib.ExitStack() as stack:
        run_dir = state_dir / "run"
        run_dir.mkdir(mode=0o700, exist_ok=True)
        run_dir.chmod(0o700)
        control = stack.enter_context(control_socket.listen(run_dir))  # refuses a second run first
        stack.callback((run_dir / control_socket.SOCKET).unlink, missing_ok=True)
        prepare_run_dir(state_dir, SPECS, stale=(SWITCH,))
        metrics_sock = stack.enter_context(metrics.listen(args.metrics)) if args.metrics else None
        add_admin_log(log_files)
        settings = source.load(
            boot_id=secrets.token_hex(8),
            proxy=choose_proxy(args.proxy, state.host),
            log_files=log_files,
            run_dir=run_dir,
            metrics_fd=metrics_sock.fileno() if metrics_sock is not None else None,
            control_fd=control.fileno(),
        )
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
            no_restart_reason=deleted_reason(state),
        )


def deleted_reason(state) -> str:
    """The one error line of a connector the relay says is deleted, with the commands that fix it."""
    return (
        f"connector {state.connector_id} was deleted by an admin: re-register: get a token with "
        f"`backhaul admin token create`, then `backhaul connector register --service {state.service_url} "
        f"--token-file FILE --ca-sha256 HEX --state-dir NEW_DIR` and run the connector with that state dir "
        f"(this one, {state.state_dir}, holds the deleted registration)"
    )


def _log_files(args: argparse.Namespace, state_dir: Path) -> LogFiles:
    try:
        return LogFiles(
            directory=Path(args.log_dir) if args.log_dir else state_dir / LOG_DIR,
            max_bytes=args.log_max_bytes,
            backups=args.log_backups,
        )
    except ValueError as exc:
        raise ConfigError(f"--log-max-bytes / --log-backups: {exc}") from None


def _state_info(state) -> dict:
    expires = state.cert_not_after
    return {
        "connector_id": state.connector_id,
        "name": state.name,
        "service": state.service_url,
        "certificate_expires": expires.isoformat(),
        "certificate_days_left": round((expires - datetime.datetime.now(datetime.timezone.utc)).total_seconds() / 86400, 1),
        **release_keys_summary(state.state_dir),
    }


def connector_status(args: argparse.Namespace) -> int:
    """Print what this connector is and, when it runs, its live figures (the same as its metrics)."""
    state = ConnectorState.load(args.state_dir)
    info = _state_info(state)
    try:
        live = asyncio.run(control_socket.call(Path(args.state_dir) / "run", "GET", "/v1/status"))
    except control_socket.NotRunning as exc:
        info.update(running=False, note=f"the connector is not running ({exc}); only what its state dir says is shown")
    else:
        info.update(running=True, **live["figures"])
        info.update(session_log_path=live.get("session_log_path"), admin_log_path=live.get("admin_log_path"))
    if args.json:
        sys.stdout.write(orjson.dumps(info).decode() + "\n")
    else:
        print(_status_table(info))
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _status_table(info: dict) -> str:
    rows = [
        ("connector", f"{info['connector_id']} ({info['name']})"),
        ("service", info["service"]),
        ("certificate expires", f"{info['certificate_expires']} ({info['certificate_days_left']} days left)"),
        ("release keys", info.get("release_keys_error") or ", ".join(info["release_keys"]) or "none pinned: the updater installs nothing"),
        ("running", "yes" if info["running"] else "no"),
    ]
    if not info["running"]:
        rows.append(("note", info["note"]))
        return table(["what", "value"], rows)
    failed = info["streams_failed"]
    latency = info["stream_open_seconds"]
    rows += [
        ("workers", info["workers"]),
        ("tunnels up", f"{info['tunnels']} ({info['tunnels_opened']} opened since start)"),
        ("streams active", info["streams_active"]),
        ("streams opened", info["streams_opened"]),
        ("streams failed", f"{sum(failed.values())}" + (f" ({', '.join(f'{k} {v}' for k, v in failed.items())})" if failed else "")),
        (
            "stream open latency",
            f"mean {latency['mean'] * 1000:.2f} ms, p50 < {latency['p50_under'] * 1000:g} ms, p99 < {latency['p99_under'] * 1000:g} ms "
            f"({latency['count']} opens)" if latency["count"] else "no opens yet",
        ),
        ("tunnel bytes", f"{_size(info['tunnel_bytes_received'])} received, {_size(info['tunnel_bytes_sent'])} sent"),
        ("frames", f"{info['frames_received']} received, {info['frames_sent']} sent"),
        ("cpu", f"{info['cpu_seconds']} s"),
        ("memory", _size(info["memory_bytes"])),
        ("config version", info["config_version"]),
        ("session log", ("on: " if info["session_log"] else "off: ") + str(info.get("session_log_path"))),
        ("admin log", info.get("admin_log_path")),
        ("metrics", f"http://{info['metrics']}/metrics" if info.get("metrics") else "off (connector run --metrics HOST:PORT)"),
    ]
    return table(["what", "value"], rows)


def connector_session_log(args: argparse.Namespace) -> int:
    """Switch the running connector's session log on or off."""
    on = args.switch == "on"
    try:
        answer = asyncio.run(control_socket.call(Path(args.state_dir) / "run", "PUT", "/v1/session-log", {"on": on}))
    except control_socket.NotRunning as exc:
        raise ConfigError(f"the connector is not running ({exc}); start it with `backhaul connector run --state-dir {args.state_dir}`") from None
    if answer["confirmed"] < answer["workers"]:
        print(
            f"backhaul: session log {args.switch} for {answer['confirmed']} of {answer['workers']} workers so far; "
            "the others follow within a second or two",
            file=sys.stderr,
        )
    print(f"session log {args.switch}: {answer['path']}")
    return 0
