"""Where a connector's settings come from: defaults, a TOML file, command-line flags.

``connector run --config FILE`` reads a TOML file whose keys are ``ConnectorSettings``
field names (``[keepalive]``, ``[backoff]``, ``[flow]``, ``[health]``, ``[udp]`` and ``[tls]`` are tables of the nested
settings). Flags given on the command line win over the file; the file wins over the
defaults. SIGHUP reads the file again: ``split_changes`` tells which changed keys a
running worker applies at once and which wait for a restart.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tomllib
import typing
from pathlib import Path
from typing import Any

from backhaul.config import (
    Backoff, ClusterSettings, FlowControl, HealthChecks, Keepalive, LogFiles, MemoryTrim, TlsSettings, UdpLimits,
)
from backhaul.errors import ConfigError
from backhaul.files import read_bounded
from backhaul.transport import fasttls
from backhaul.transport.proxy_connect import Proxy

@dataclasses.dataclass(frozen=True)
class ConnectorSettings:
    """What one connector worker needs to run."""

    state_dir: Path
    worker: int = 0
    workers: int = 1
    #: Tunnels this connector holds in all (spread over its workers), at least one per relay worker.
    tunnels: int = 4
    #: Distinct relay nodes to hold tunnels to when the service lists several (each node
    #: gets `tunnels`); a service of one node is dialed at the enrolled address alone.
    relay_nodes: int = ClusterSettings.connector_nodes
    #: Same for every worker of one `connector run`; lets the relay replace stale tunnels at once.
    boot_id: str = ""
    flow: FlowControl = FlowControl()
    keepalive: Keepalive = Keepalive()
    backoff: Backoff = Backoff()
    udp: UdpLimits = UdpLimits()
    #: The HTTP CONNECT proxy tunnels and control calls go through (None: straight to the relay).
    proxy: Proxy | None = None
    connect_timeout: float = 10.0
    target_timeout: float = 10.0
    #: Hard cap on tunnel slots of one worker, whatever the relay asks for.
    max_slots: int = 64
    #: Seconds between heartbeats (which also check whether the certificate is due for renewal).
    heartbeat_interval: float = 30.0
    #: How the origins of the apps are checked (see connector/health.py).
    health: HealthChecks = HealthChecks()
    #: On SIGTERM, how long streams in flight may take to finish before they are reset.
    drain_timeout: float = 30.0
    log_level: str = "info"
    #: Admin and session log files.
    log_files: LogFiles = LogFiles()
    #: The run dir the supervisor prepared (stats, switches, control socket); None: no figures kept.
    run_dir: Path | None = None
    #: Listening sockets made by the supervisor, served by worker 0 (see connector.observer).
    metrics_fd: int | None = None
    control_fd: int | None = None
    #: Seconds between two publications of this worker's figures.
    stats_interval: float = 1.0
    #: When the worker gives the memory of a finished burst back to the system.
    memory: MemoryTrim = MemoryTrim()
    #: Tunnel TLS: suites offered, kernel TLS, key rotation (``[tls]``; after a restart).
    tls: TlsSettings = TlsSettings()

    @property
    def slots(self) -> int:
        return max(1, -(-self.tunnels // self.workers))


#: Largest settings file read; a connector's settings are a few lines.
MAX_CONFIG_BYTES = 64 * 1024
LOG_LEVELS = ("debug", "info", "warning", "error")
#: Fields `connector run` sets at start, never the settings file: the proxy (from
#: `--proxy` or the environment, chosen once with the relay's host), the log files and
#: the run dir with the sockets bound before the workers fork.
INTERNAL = frozenset(
    {"state_dir", "worker", "boot_id", "proxy", "log_files", "run_dir", "metrics_fd", "control_fd"}
)
#: Keys a running worker applies on SIGHUP. ``keepalive`` and ``backoff`` apply to tunnels
#: dialed from then on; ``flow`` sizes buffers made at start and ``workers`` is the process
#: count, so those two wait for a restart.
LIVE = frozenset(
    {
        "log_level",
        "tunnels",
        "relay_nodes",
        "heartbeat_interval",
        "drain_timeout",
        "connect_timeout",
        "target_timeout",
        "max_slots",
        "keepalive",
        "backoff",
    }
)
_NESTED: dict[str, type] = {
    "keepalive": Keepalive,
    "backoff": Backoff,
    "flow": FlowControl,
    "health": HealthChecks,
    "udp": UdpLimits,
    "memory": MemoryTrim,
    "tls": TlsSettings,
}


def _check_type(value: Any, hint: Any, where: str) -> Any:
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, not {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be a whole number, not {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, not {value!r}")
        return value
    raise ConfigError(f"{where} cannot be set from a file")


def _nested(name: str, table: Any, source: str) -> Any:
    cls = _NESTED[name]
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [{name}] must be a table of {', '.join(f.name for f in dataclasses.fields(cls))}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key {name}.{key}; known: {', '.join(sorted(known))}")
        values[key] = _check_type(value, hints[key], f"{source}: {name}.{key}")
    try:
        return cls(**values)
    except ValueError as exc:
        raise ConfigError(f"{source}: [{name}] is not valid: {exc}") from None


def _from_mapping(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Checked ConnectorSettings keyword arguments from a parsed file or from flags."""
    hints = typing.get_type_hints(ConnectorSettings)
    known = {f.name for f in dataclasses.fields(ConnectorSettings)} - INTERNAL
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key {key!r}; known: {', '.join(sorted(known))}")
        if key in _NESTED:
            out[key] = value if isinstance(value, _NESTED[key]) else _nested(key, value, source)
        else:
            out[key] = _check_type(value, hints[key], f"{source}: {key}")
    return out


def _validate(settings: ConnectorSettings, source: str) -> ConnectorSettings:
    problems = []
    if settings.workers < 1 or settings.tunnels < 1 or settings.max_slots < 1:
        problems.append("workers, tunnels and max_slots must be at least 1")
    if not 1 <= settings.relay_nodes <= ClusterSettings.max_nodes:
        problems.append(f"relay_nodes must be from 1 to {ClusterSettings.max_nodes}")
    if settings.heartbeat_interval < 1:
        problems.append("heartbeat_interval must be at least 1 second")
    if settings.drain_timeout < 0:
        problems.append("drain_timeout must not be negative")
    if settings.connect_timeout <= 0 or settings.target_timeout <= 0:
        problems.append("connect_timeout and target_timeout must be above 0")
    if settings.log_level not in LOG_LEVELS:
        problems.append(f"log_level must be one of {', '.join(LOG_LEVELS)}")
    ka = settings.keepalive
    if not 0 < ka.interval < ka.timeout:
        problems.append("keepalive.interval must be above 0 and below keepalive.timeout")
    b = settings.backoff
    if not 0 < b.initial <= b.maximum or b.factor < 1:
        problems.append("backoff needs 0 < initial <= maximum and factor >= 1")
    try:
        fasttls.require(settings.tls.transport)
    except ConfigError as exc:
        problems.append(str(exc))
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    return settings


def read_config(path: Path) -> dict[str, Any]:
    """The parsed TOML file, bounded in size; ConfigError saying what is wrong and where."""
    raw = read_bounded(path, MAX_CONFIG_BYTES, "the settings file", "is it the right file?")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"the settings file {path} is not valid TOML: {exc}") from None


@dataclasses.dataclass(frozen=True)
class SettingsSource:
    """How to build the settings again: the file (if any) and the flags that win over it."""

    state_dir: Path
    config: Path | None = None
    #: flags given on the command line, as ConnectorSettings keyword arguments
    overrides: tuple[tuple[str, Any], ...] = ()
    #: worker processes when neither the file nor a flag says (one per core)
    default_workers: int = 1

    def load(self, **fixed: Any) -> ConnectorSettings:
        """Defaults, then the file, then the flags, then ``fixed`` (process facts such as boot_id)."""
        values: dict[str, Any] = {}
        if self.config is not None:
            values.update(_from_mapping(read_config(self.config), str(self.config)))
        values.update(_from_mapping(dict(self.overrides), "command line"))
        values.setdefault("workers", self.default_workers)
        settings = ConnectorSettings(state_dir=self.state_dir, **values)
        where = " and ".join(
            ([str(self.config)] if self.config is not None else []) + (["the command line"] if self.overrides else [])
        )
        settings = _validate(settings, where or "settings")
        return dataclasses.replace(settings, **fixed)


def split_changes(old: ConnectorSettings, new: ConnectorSettings) -> tuple[dict[str, Any], list[str]]:
    """({key: new value} a running worker applies now, [keys that need a restart])."""
    live: dict[str, Any] = {}
    restart: list[str] = []
    for field in dataclasses.fields(ConnectorSettings):
        if field.name in INTERNAL:
            continue
        before, after = getattr(old, field.name), getattr(new, field.name)
        if before == after:
            continue
        if field.name in LIVE:
            live[field.name] = after
        else:
            restart.append(field.name)
    return live, restart


def apply_log_level(level: str) -> None:
    """Set the root logger's level (the JSON handler is set up once per process).

    BACKHAUL_LOG_LEVEL in the environment wins, as it does in ``logs.setup_logging``."""
    logging.getLogger().setLevel(os.environ.get("BACKHAUL_LOG_LEVEL", level).upper())
