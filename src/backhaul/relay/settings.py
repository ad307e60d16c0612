"""The relay's settings file: `service run --config FILE` (TOML), read again on SIGHUP.

Every `service run` flag but --data-dir and --config has a key: the flag's name with "_"
for "-" (``listen``, ``workers``, ``keepalive_interval``, ...). The repeatable NAME=VALUE
flags are tables: ``[http_limits]`` (--http-limit), ``[listen_limits]`` (--listen-limit),
``[tls]`` (--tls); ``[floods]`` (tunnel flood limits, config.FloodLimits) has no flag. Flags
given on the command line win over the file, the file over the defaults; in a table, a
flag's NAME=VALUE wins over the file's NAME. The file is checked whole before anything
starts: an unknown key or a bad value is a ConfigError naming the key and the file.

On SIGHUP every worker reads it again (``SettingsFile.merged``) and ``split_changes``
tells what it applies at once (``LIVE``) and which changed keys need a restart.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import os
import tomllib
from pathlib import Path
from typing import Any

from backhaul.config import FloodLimits, HttpLimits, ListenLimits, TlsSettings
from backhaul.errors import ConfigError
from backhaul.files import read_bounded

#: Largest settings file read; a relay's settings are a few dozen lines.
MAX_CONFIG_BYTES = 64 * 1024
LOG_LEVELS = ("debug", "info", "warning", "error")

#: Scalar keys and the type a value must have (float keys take whole numbers too).
SCALARS: dict[str, type] = {
    "listen": str, "advertise": str, "peer_advertise": str, "drain_grace": float,
    "http": str, "https": str, "https_cert": str, "https_key": str,
    "workers": int, "metrics": str, "cert_validity": float,
    "remove_inactive_after": float, "inactive_grace": float, "housekeeping_interval": float,
    "keepalive_interval": float, "keepalive_timeout": float,
    "udp_max_flows": int, "udp_idle_timeout": float,
    "oidc_issuer": str, "oidc_client_id": str, "oidc_client_secret_file": str, "oidc_ca": str,
    "oidc_session_lifetime": float, "admin_oidc_claim": str,
    "log_level": str, "log_dir": str, "log_max_bytes": int, "log_backups": int,
}
#: Table keys: the limits class, and the `service run` flag (args attribute) of its NAME=VALUEs.
TABLES: dict[str, tuple[type, str | None]] = {
    "http_limits": (HttpLimits, "http_limit"),
    "listen_limits": (ListenLimits, "listen_limit"),
    "tls": (TlsSettings, "tls"),
    "floods": (FloodLimits, None),
}
#: Keys a running worker applies on SIGHUP: the log level; limits read per connection or
#: request (``http_limits``, ``listen_limits``: the admission caps, timeouts and refusal
#: logging); ``floods`` and the keepalive for tunnels accepted from then on; the drain
#: grace, read at the stop. Everything else (addresses, workers, TLS, certificates, the
#: OIDC issuer, UDP tables sized at start, log files) waits for a restart.
LIVE = frozenset(
    {"log_level", "http_limits", "listen_limits", "floods", "keepalive_interval", "keepalive_timeout", "drain_grace"}
)


def _check(value: Any, kind: type, where: str) -> Any:
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, not {value!r}")
        return float(value)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be a whole number, not {value!r}")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, not {value!r}")
    return value


def _table(name: str, table: Any, source: str) -> list[str]:
    """A table as the NAME=VALUE list of its flag, each name and value checked."""
    cls = TABLES[name][0]
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [{name}] must be a table of {', '.join(fields)}")
    out = []
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(f"{source}: unknown key {name}.{key}; known: {', '.join(sorted(fields))}")
        kind = {"str": str, "int": int, "float": float}.get(fields[key], fields[key]) if isinstance(fields[key], str) else fields[key]
        out.append(f"{key}={_check(value, kind, f'{source}: {name}.{key}')}")
    return out


def parse(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Checked settings from a parsed file: scalars by key, tables as NAME=VALUE lists."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in SCALARS:
            out[key] = _check(value, SCALARS[key], f"{source}: {key}")
        elif key in TABLES:
            out[key] = _table(key, value, source)
        else:
            known = sorted([*SCALARS, *TABLES])
            hint = " (--data-dir and --config are given on the command line)" if key in ("data_dir", "config") else ""
            raise ConfigError(f"{source}: unknown key {key!r}{hint}; known: {', '.join(known)}")
    if out.get("log_level", "info") not in LOG_LEVELS:
        raise ConfigError(f"{source}: log_level must be one of {', '.join(LOG_LEVELS)}")
    for key, (cls, _) in TABLES.items():
        if key in out:
            try:
                _apply_table(cls, out[key], key)
            except ValueError as exc:
                raise ConfigError(f"{source}: [{key}] is not valid: {exc}") from None
    return out


def _apply_table(cls: type, assignments: list[str], name: str):
    limits = cls()
    if hasattr(limits, "replace_from"):
        return limits.replace_from(assignments)
    from backhaul.config import _replace_from

    return _replace_from(limits, assignments, f"[{name}]")


def read_file(path: Path) -> dict[str, Any]:
    """The checked settings of ``path``; ConfigError saying what is wrong and where."""
    raw = read_bounded(path, MAX_CONFIG_BYTES, "the settings file", "is it the right file?")
    try:
        values = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"the settings file {path} is not valid TOML: {exc}") from None
    return parse(values, str(path))


@dataclasses.dataclass(frozen=True)
class SettingsFile:
    """The command line as given and the settings file under it: ``merged`` builds the
    arguments `service run` goes by, now (at start, and again at each SIGHUP)."""

    args: argparse.Namespace
    config: Path | None = None

    def merged(self) -> argparse.Namespace:
        """The flags, with what they leave unset taken from the file (tables: the file's
        NAME=VALUEs first, so the flag's win)."""
        args = copy.copy(self.args)
        if self.config is None:
            return args
        values = read_file(self.config)
        for key, value in values.items():
            if key in TABLES:
                flag = TABLES[key][1]
                setattr(args, flag or key, value + list(getattr(args, flag or key, None) or []))
            elif getattr(args, key, None) is None:
                setattr(args, key, value)
        return args


def split_changes(old: argparse.Namespace, new: argparse.Namespace) -> tuple[list[str], list[str]]:
    """([changed keys a running worker applies], [changed keys that need a restart])."""
    live, restart = [], []
    for key in [*SCALARS, *TABLES]:
        attr = TABLES[key][1] or key if key in TABLES else key
        if getattr(old, attr, None) != getattr(new, attr, None):
            (live if key in LIVE else restart).append(key)
    return live, restart


def apply_log_level(level: str) -> None:
    """Set the root logger's level (BACKHAUL_LOG_LEVEL in the environment wins, as in logs.setup_logging)."""
    logging.getLogger().setLevel(os.environ.get("BACKHAUL_LOG_LEVEL", level).upper())
