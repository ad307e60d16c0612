"""Secret files of the relay's data dir that are created once, at first use, by whichever worker comes first."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from backhaul import pki
from backhaul.errors import ConfigError


def load_or_create(path: Path, make: Callable[[], bytes]) -> bytes:
    """The bytes of the secret file ``path``, written with ``make()`` (mode 0600) if it does not exist.

    Several worker processes may start at once: the file is written atomically and
    exclusively, so the first writer wins and every worker reads the same bytes.
    """
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}; check the data dir's permissions") from exc
    try:
        pki.write_private(path, make(), exclusive=True)
    except (ConfigError, FileExistsError):
        # Another worker created it between our read and our write; its bytes are the ones to use.
        pass
    except OSError as exc:
        raise ConfigError(f"cannot create {path}: {exc.strerror}; check the data dir's permissions") from exc
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}; check the data dir's permissions") from exc
