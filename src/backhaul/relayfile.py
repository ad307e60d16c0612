"""relay.json in a relay's data dir: where the running relay listens, for the admin CLI on the same host.

Worker 0 writes it once its listen port is bound (atomically: a temporary file renamed over
the old one), so `backhaul admin --data-dir DIR` reaches a relay on any port without
--service. A wildcard listen address (0.0.0.0, ::) is not an address to dial: the file names
the loopback address of the same family, which the CLI on this host reaches.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from backhaul.errors import ConfigError
from backhaul.files import read_bounded

RELAY_FILE = "relay.json"
#: Largest relay.json read: a few short fields.
MAX_RELAY_FILE = 4096
_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def service_url(host: str, port: int) -> str:
    """The https:// URL a client on this host dials to reach a relay listening on ``host``:``port``."""
    host = _LOOPBACK.get(host, host)
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def write_relay_file(data_dir: Path, host: str, port: int, listen: str, advertise: str = "") -> Path:
    """Record where this relay listens (``listen`` as given, parsed into ``host`` and ``port``);
    returns the file's path."""
    record = {"service_url": service_url(host, port), "listen": listen, "advertise": advertise or None, "pid": os.getpid()}
    path = Path(data_dir) / RELAY_FILE
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".relay.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(record, out)
            out.write("\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_service_url(data_dir: Path) -> str | None:
    """The service URL relay.json records, None without the file (no relay ran on this data
    dir yet); ConfigError, naming the file, when it is there but unusable."""
    path = Path(data_dir) / RELAY_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(read_bounded(path, MAX_RELAY_FILE, "relay.json", "is it the relay's?"))
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); delete it and restart the relay, or pass --service URL") from None
    url = record.get("service_url") if isinstance(record, dict) else None
    if not isinstance(url, str) or not url.startswith("https://"):
        raise ConfigError(f"{path} has no https:// service_url; delete it and restart the relay, or pass --service URL")
    return url
