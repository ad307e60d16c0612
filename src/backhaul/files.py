"""Small files an operator hands over (a token, a settings file, a key): read whole, with a bound.

A wrong path must not make a process read a huge file into memory, and every failure
says which file, which flag or role it had, and what to do.
"""

from __future__ import annotations

from pathlib import Path

from backhaul.errors import ConfigError


def read_bounded(path: str | Path, limit: int, what: str, hint: str) -> bytes:
    """The bytes of ``path``, at most ``limit``; ConfigError naming ``what`` the file is
    (e.g. "--token-file") otherwise, with ``hint`` when it is too large."""
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except FileNotFoundError:
        raise ConfigError(f"cannot read {what} {path}: it is missing") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(raw) > limit:
        raise ConfigError(f"{what} {path} is larger than {limit} bytes; {hint}")
    return raw
