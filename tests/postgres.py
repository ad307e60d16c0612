"""A throwaway PostgreSQL server for the tests, and the fixtures that share it.

One server per test session (``postgres_server``); per test, a fresh schema in one
shared database (``postgres_url``: 1 ms, where CREATE DATABASE takes 0.3 s here) or a
fresh database (``postgres_db``, for a test that needs a whole one). The server is Debian's PostgreSQL (tools/bootstrap.sh installs it), run
as the ``postgres`` user when the tests run as root (``initdb`` refuses root), with its data
and its Unix socket in a temporary directory, no TCP listener and no fsync (the data is
thrown away). Readiness is a successful connection; it is stopped (``pg_ctl stop -m
immediate``, then SIGKILL) when the session ends, however it ends.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

#: Bounds of the server's start and stop: a slow CI machine gets there well within them.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0


def find_bin_dir() -> Path | None:
    """The directory of initdb/pg_ctl: on PATH, else Debian's newest /usr/lib/postgresql/N/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    return Path(candidates[-1]).parent if candidates else None


class PostgresServer:
    """One PostgreSQL server on a Unix socket in ``base`` (a directory it owns)."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.base = Path(tempfile.mkdtemp(prefix="backhaul-pg-"))
        self.data = self.base / "data"
        self.socket_dir = self.base / "sock"
        self.log = self.base / "server.log"
        self.pid: int | None = None
        self._names = itertools.count(1)
        # initdb and the server refuse to run as root: as root, they run as postgres.
        self._as: list[str] = []
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("there is no postgres user to run PostgreSQL as; install Debian's postgresql") from None
            self._as = ["runuser", "-u", "postgres", "--"]
            os.chown(self.base, owner.pw_uid, owner.pw_gid)

    def url(self, dbname: str = "postgres", schema: str | None = None) -> str:
        # A schema is reached by the connection's search_path (libpq's startup options).
        options = f"&options=-csearch_path%3D{schema}" if schema else ""
        return f"postgresql://postgres@/{dbname}?host={self.socket_dir}{options}"

    def _run(self, *argv: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self._as, *argv], capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
        )

    def start(self) -> None:
        """Make the cluster (initdb) and start its server."""
        self._run("mkdir", "-m", "0700", str(self.socket_dir), timeout=10).check_returncode()
        done = self._run(
            str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
            "--encoding=UTF8", "--locale=C", "--no-sync", timeout=START_TIMEOUT,
        )
        if done.returncode:
            raise RuntimeError(f"initdb failed ({done.returncode}): {done.stderr.strip()}")
        self.launch()

    def launch(self) -> None:
        """Start the server on its data dir (again, after ``halt``) and wait until it accepts connections."""
        import psycopg

        self.pid = None
        # -F: no fsync (the OS keeps what a killed server wrote; only a machine crash would
        # lose it); commits stay synchronous, so a halt() loses no committed change.
        # -h '': no TCP listener; -k: the socket's directory. -W: do not wait, readiness is
        # checked below by connecting.
        options = f"-F -h '' -k {self.socket_dir} -c full_page_writes=off"
        done = self._run(
            str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-W", "-s", "start",
            timeout=START_TIMEOUT,
        )
        if done.returncode:
            raise RuntimeError(f"pg_ctl start failed ({done.returncode}): {done.stderr.strip()}; log: {self._log_tail()}")
        deadline = time.monotonic() + START_TIMEOUT
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(self.url(), connect_timeout=2, autocommit=True) as conn:
                    conn.execute("SELECT 1")
                break
            except psycopg.OperationalError as exc:
                last = exc
                if self.pid is None:
                    self.pid = self._postmaster_pid()
                elif not _alive(self.pid):
                    raise RuntimeError(f"PostgreSQL exited while starting ({exc}); log: {self._log_tail()}") from exc
                time.sleep(0.05)  # between connection attempts, not as readiness
        else:
            raise RuntimeError(f"PostgreSQL did not accept connections within {START_TIMEOUT} s ({last}); log: {self._log_tail()}")
        self.pid = self._postmaster_pid()

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def create_database(self) -> str:
        """A new, empty database; its name."""
        import psycopg

        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0 STRATEGY FILE_COPY')
        return name

    def create_schema(self, dbname: str) -> str:
        """A new, empty schema in ``dbname``; its name. Never dropped: the server goes at the
        session's end, and a test makes one."""
        import psycopg

        name = f"s{next(self._names)}"
        with psycopg.connect(self.url(dbname), autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            # FORCE: connections a failed test left open (its store, a child process) go too.
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def terminate_connections(self, dbname: str) -> int:
        """Kill every connection to ``dbname`` (as a server restart would); how many."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            return conn.execute(
                "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid != pg_backend_pid()) AS killed",
                (dbname,),
            ).fetchone()[0]

    def stop(self) -> None:
        """Stop the server and remove its files."""
        try:
            self.halt()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def halt(self) -> None:
        """Stop the server at once (as a crash would), keeping its data; ``launch`` restarts it."""
        pid = self.pid or self._postmaster_pid()
        if self.data.exists():
            self._run(
                str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-s", "-t", str(int(STOP_TIMEOUT)),
                "stop", timeout=STOP_TIMEOUT + 5,
            )
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + STOP_TIMEOUT
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        self.pid = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def require_bin_dir(bin_dir: Path | None, environ) -> Path:
    """``bin_dir``, or the test is skipped (a developer without PostgreSQL) or fails (CI,
    where tools/bootstrap.sh installs it, so its absence is a broken set-up)."""
    if bin_dir is not None:
        return bin_dir
    reason = "PostgreSQL is not installed (no initdb on PATH nor in /usr/lib/postgresql/*/bin); tools/bootstrap.sh installs it"
    if environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_server():
    """The session's PostgreSQL server. Skipped only where PostgreSQL is not installed and
    CI is not set: under CI the bootstrap installs it, so its absence fails."""
    server = PostgresServer(require_bin_dir(find_bin_dir(), os.environ))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_db(postgres_server):
    """A fresh database on the session's server for one test: (server, name)."""
    name = postgres_server.create_database()
    try:
        yield postgres_server, name
    finally:
        postgres_server.drop_database(name)


@pytest.fixture(scope="session")
def postgres_shared_db(postgres_server):
    """One database for the session's per-test schemas."""
    return postgres_server.create_database()


@pytest.fixture
def postgres_url(postgres_server, postgres_shared_db):
    """The URL of a fresh, empty schema for one test (a store opened on it migrates it)."""
    return postgres_server.url(postgres_shared_db, postgres_server.create_schema(postgres_shared_db))
