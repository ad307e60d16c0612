"""The install root on disk: versions side by side, the ``current`` link, the state file, the lock.

    ROOT/versions/<version>/venv     one venv per version, created at its final path (a venv
                                     cannot be moved: CPython gh-88452)
    ROOT/current -> versions/<v>     switched with one rename(2) of a new link (ln -sfn is an
                                     unlink then a symlink: a window with no link at all)
    ROOT/downloads/<v>/              a release's files, ``NAME.unverified`` until checked
    ROOT/state.json                  active, previous, failed versions, history (atomic writes)
    ROOT/updater.lock                flock'ed by the one updater of this root; holds its PID
    ROOT/logs/updater.log            the updater's JSON-lines log (see runner.py)

The ``current`` link is the truth; the state file is bookkeeping that may lag it by one crash
(between the switch and the state write) and is reconciled from the link at every start.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from backhaul.errors import ConfigError

VERSIONS = "versions"
CURRENT = "current"
DOWNLOADS = "downloads"
STATE = "state.json"
LOCK = "updater.lock"
UNVERIFIED = ".unverified"
#: A version as a directory name: PEP 440 characters only, so a version from a manifest can
#: never name a path outside versions/ (no "/", no "..").
_VERSION = re.compile(r"^[0-9][0-9A-Za-z.+!_-]{0,63}$")
#: A file name of a release: a wheel's characters, no path separators.
_FILE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+!-]{0,199}\.whl$")


class UpdateRefused(Exception):
    """A step of an update refused, with a short machine word (``reason``) and words for a person."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_version(version: str) -> str:
    if not isinstance(version, str) or not _VERSION.match(version) or ".." in version:
        raise UpdateRefused("malformed", f"{version!r} is not a version this updater installs (PEP 440 characters only)")
    return version


def check_file_name(name: str) -> str:
    if not isinstance(name, str) or not _FILE.match(name) or ".." in name:
        raise UpdateRefused("malformed", f"{name!r} is not a wheel file name (a release holds wheels only, no paths)")
    return name


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``path`` so that a reader (or a crash) sees the old content or the new, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


@dataclass
class State:
    """What the updater remembers about this root (the link says which version is current)."""

    active: str | None = None
    previous: str | None = None
    #: Versions that failed here (rolled back, or refused after download): never retried
    #: automatically; `updater apply --version V` may still try one on purpose.
    failed: list[str] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {"active": self.active, "previous": self.previous, "failed": self.failed, "history": self.history},
            option=orjson.OPT_INDENT_2,
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> "State":
        data = orjson.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        return cls(
            active=data.get("active"),
            previous=data.get("previous"),
            failed=[v for v in data.get("failed") or [] if isinstance(v, str)],
            history=[h for h in data.get("history") or [] if isinstance(h, dict)],
        )


class Layout:
    """One install root; every path and every change to the tree goes through here."""

    def __init__(self, root: str | os.PathLike, *, max_history: int = 100) -> None:
        self.root = Path(root).absolute()
        self.max_history = max_history

    # ------------------------------------------------------------------ paths

    @property
    def current(self) -> Path:
        return self.root / CURRENT

    def version_dir(self, version: str) -> Path:
        return self.root / VERSIONS / check_version(version)

    def venv(self, version: str) -> Path:
        return self.version_dir(version) / "venv"

    def backhaul(self, version: str | None = None) -> Path:
        """The ``backhaul`` script of ``version`` (default: of ``current``, through the link)."""
        base = self.current if version is None else self.version_dir(version)
        return base / "venv" / "bin" / "backhaul"

    def downloads(self, version: str) -> Path:
        return self.root / DOWNLOADS / check_version(version)

    def prepare(self) -> None:
        for sub in (VERSIONS, DOWNLOADS):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ current

    def current_version(self) -> str | None:
        """The version ``current`` points at; None when there is no link (nothing installed yet)."""
        try:
            target = os.readlink(self.current)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"{self.current} is not a symlink ({exc.strerror}); move it away: the updater owns it") from None
        parts = Path(target).parts
        if len(parts) != 2 or parts[0] != VERSIONS:
            raise ConfigError(f"{self.current} points at {target!r}, not at {VERSIONS}/<version>; fix or remove the link")
        return parts[1]

    def installed_versions(self) -> list[str]:
        base = self.root / VERSIONS
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir() and _VERSION.match(p.name))

    def switch(self, version: str) -> None:
        """Point ``current`` at ``version``: one rename(2) over the old link, then fsync of the root.

        A reader resolving ``current`` at any moment sees the old version or the new one.
        """
        if not (self.venv(version) / "bin" / "python").exists():
            raise ConfigError(f"version {version} is not installed under {self.version_dir(version)}")
        tmp = self.root / f".{CURRENT}.{os.getpid()}.tmp"
        with _suppress_missing():
            tmp.unlink()
        os.symlink(Path(VERSIONS) / version, tmp)  # relative: it reads the same through any mount of the root
        os.replace(tmp, self.current)
        fsync_dir(self.root)

    # ------------------------------------------------------------------ state

    def load_state(self) -> State:
        try:
            raw = (self.root / STATE).read_bytes()
        except FileNotFoundError:
            return State()
        try:
            return State.from_bytes(raw)
        except (ValueError, orjson.JSONDecodeError) as exc:
            # Written atomically, so this is damage from outside: start from the link, say so.
            raise ConfigError(f"{self.root / STATE} is unreadable ({exc}); move it away and the updater rebuilds it from {self.current}") from None

    def save_state(self, state: State) -> None:
        state.history = state.history[-self.max_history :]
        write_atomic(self.root / STATE, state.to_bytes())

    def record(self, state: State, version: str | None, step: str, reason: str = "", now: float | None = None) -> None:
        """Add one step to the history and save."""
        state.history.append({"ts": round(time.time() if now is None else now, 3), "version": version, "step": step, "reason": reason})
        self.save_state(state)

    def set_active(self, state: State, version: str) -> None:
        if state.active != version:
            state.previous, state.active = state.active, version

    def reconcile(self) -> State:
        """The state, made to agree with the ``current`` link (the truth after a crash).

        A crash between ``switch`` and the state write leaves ``active`` naming the version
        before the switch: the link wins, and the old active becomes the previous one.
        """
        state = self.load_state()
        linked = self.current_version()
        if linked is not None and state.active != linked:
            old = state.active
            if state.previous == linked:  # a crash during a switch back (rollback)
                state.previous = old if old and self.version_dir(old).is_dir() else None
            else:
                state.previous = old if old and self.version_dir(old).is_dir() else state.previous
            state.active = linked
            self.record(state, linked, "reconciled", f"the state file said {old}, the link says {linked}")
        return state

    # ------------------------------------------------------------------ space, pruning

    def check_space(self, needed: int, factor: float) -> None:
        """Refuse (reason ``disk_full``) unless the root's file system has ``needed x factor`` bytes free."""
        free = shutil.disk_usage(self.root).free
        want = int(needed * factor)
        if free < want:
            raise UpdateRefused(
                "disk_full",
                f"{self.root} has {free // (1024 * 1024)} MiB free; installing this release needs {want // (1024 * 1024)} MiB "
                f"({needed // (1024 * 1024)} MiB of files x {factor:g}); free some space, nothing was changed",
            )

    def remove_version(self, version: str) -> None:
        """Remove a version's dir (a half-made install, or a pruned one); never the current one."""
        if version == self.current_version():
            raise ConfigError(f"version {version} is current; it is not removed")
        shutil.rmtree(self.version_dir(version), ignore_errors=True)

    def prune(self, state: State, keep: int = 2, also: tuple[str, ...] = ()) -> list[str]:
        """Remove installed versions and downloads other than current, previous (and ``also``).

        ``keep`` > 2 keeps that many of the newest besides; returns what was removed.
        """
        from packaging.version import InvalidVersion, Version

        def order(v: str):
            try:
                return (1, Version(v))
            except InvalidVersion:
                return (0, Version("0"))

        kept = {v for v in (self.current_version(), state.active, state.previous, *also) if v}
        others = sorted((v for v in self.installed_versions() if v not in kept), key=order, reverse=True)
        extra = max(0, keep - len(kept))
        removed = others[extra:]
        for version in removed:
            shutil.rmtree(self.version_dir(version), ignore_errors=True)
        downloads = self.root / DOWNLOADS
        if downloads.is_dir():
            for entry in downloads.iterdir():
                if entry.name not in also:
                    shutil.rmtree(entry, ignore_errors=True)
        return removed


class _suppress_missing:
    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        return kind is not None and issubclass(kind, FileNotFoundError)


class RootLock:
    """An exclusive flock on ``ROOT/updater.lock`` holding the owner's PID.

    Two updaters on one root would race on the link and the state (cloudflared #77); the
    second one is refused, naming the first's PID. Roots are independent: two connectors
    with their own roots on one host update at the same time. The kernel drops the lock
    when its holder dies, so a crashed updater never leaves a stale lock behind.
    """

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / LOCK
        self._fd: int | None = None

    def acquire(self) -> "RootLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"another updater (pid {holder}) holds {self.path}; one updater per install root "
                "(stop it first, or give this connector its own --install-root)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RootLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
