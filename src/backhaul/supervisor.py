"""Runs N copies of a worker function as child processes and keeps them running.

A crashed worker is restarted with exponential backoff (reset once it has stayed up a
while). SIGTERM or SIGINT is passed on to every worker, which drains; workers still
running ``grace`` seconds later are killed, and the supervisor exits 0. SIGHUP runs
``on_reload`` in the supervisor (which may return a new grace) and is passed on to
every worker, which reloads its settings.

A worker that exits with ``EXIT_NO_RESTART`` is not restarted: the supervisor logs the
caller's reason once, stops the other workers and exits with that status itself, which
the systemd units name in ``RestartPreventExitStatus=``.

Signals wake the supervisor through a self-pipe (``signal.set_wakeup_fd``), so a stop
or reload is acted on at once even while a restart is waiting out its backoff.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from pathlib import Path
from typing import Callable, Iterator

from backhaul.errors import ConfigError

log = logging.getLogger("backhaul.supervisor")

#: Restart delays: RESTART_INITIAL * 2**n seconds, at most RESTART_MAX.
RESTART_INITIAL = 0.2
RESTART_MAX = 30.0
#: A worker that ran this long before it exited is restarted at once, its backoff reset.
STABLE_AFTER = 60.0
#: Exit status of a worker (and then of the whole service) that restarting cannot help:
#: what it runs for is gone for good, e.g. an admin deleted the connector. 78 is EX_CONFIG
#: of sysexits.h; deploy/systemd/*.service list it in RestartPreventExitStatus=.
EXIT_NO_RESTART = 78


@contextlib.contextmanager
def instance_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (holding this PID) for the ``with`` body, or
    ConfigError naming the PID of the process that holds it.

    ``flock`` locks go away with the last descriptor, so a crashed holder never leaves a
    stale lock behind; forked workers inherit the descriptor and keep it held while they
    run. ``what`` names the running thing in the error ("a relay on data dir X").
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot open the lock file {path}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ConfigError(f"cannot lock {path}: {exc.strerror}") from None
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise ConfigError(f"{what} is already running (PID {holder}, holding {path}); stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def restart_delay(failures: int) -> float:
    """Seconds to wait before the ``failures``-th quick restart in a row (1, 2, ...)."""
    return min(RESTART_MAX, RESTART_INITIAL * 2 ** min(failures, 16))


def _child(target: Callable[[int], None], index: int, log_level: int) -> None:
    from backhaul.logs import setup_logging

    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Until the worker installs its own handler, a reload must not kill it (SIGHUP's default).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    setup_logging(logging.getLevelName(log_level))
    target(index)


def supervise(
    target: Callable[[int], None],
    workers: int,
    name: str,
    grace: float = 40.0,
    on_reload: Callable[[], float | None] | None = None,
    no_restart_reason: str | None = None,
) -> int:
    """Run ``target(i)`` for i in range(workers) in child processes until told to stop.

    With one worker, ``target(0)`` runs in this process and handles signals itself.
    A worker ends everything by exiting with ``EXIT_NO_RESTART`` (``raise
    SystemExit(EXIT_NO_RESTART)``): ``no_restart_reason`` is logged once, as an error,
    and that status is returned.
    """
    reason = no_restart_reason or f"a {name} worker exited with status {EXIT_NO_RESTART}: restarting cannot help; stopping"
    if workers == 1:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            target(0)
        except SystemExit as exc:
            if exc.code != EXIT_NO_RESTART:
                raise
            log.error(reason, extra={"what": name, "exitcode": EXIT_NO_RESTART})
            return EXIT_NO_RESTART
        return 0
    context = multiprocessing.get_context("fork")
    level = logging.getLogger().level
    stopping = False
    final = False
    reloads = 0

    def on_signal(signum, frame) -> None:
        nonlocal stopping, reloads
        if signum == signal.SIGHUP:
            reloads += 1
        else:
            stopping = True

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    previous_wakeup = signal.set_wakeup_fd(wake_w)
    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {sig: signal.signal(sig, on_signal) for sig in handled}
    processes: dict[int, multiprocessing.Process] = {}
    started_at: dict[int, float] = {}
    failures: dict[int, int] = {}
    restart_due: dict[int, float] = {}

    def start(index: int) -> None:
        process = context.Process(target=_child, args=(target, index, level), name=f"{name}-{index}", daemon=False)
        process.start()
        processes[index] = process
        started_at[index] = time.monotonic()

    def reload() -> None:
        nonlocal grace
        if on_reload is not None:
            try:
                new_grace = on_reload()
            except Exception:
                log.exception("reload hook failed; workers reload anyway", extra={"what": name})
                new_grace = None
            if new_grace is not None:
                grace = new_grace
        alive = [p for p in processes.values() if p.is_alive()]
        for process in alive:
            os.kill(process.pid, signal.SIGHUP)
        log.info("reload passed on to workers", extra={"what": name, "workers": len(alive)})

    try:
        for index in range(workers):
            start(index)
        log.info("workers started", extra={"what": name, "workers": workers, "pid": os.getpid()})
        handled_reloads = 0
        while not stopping:
            if reloads != handled_reloads:
                handled_reloads = reloads
                reload()
            now = time.monotonic()
            for index, due in list(restart_due.items()):
                if due <= now:
                    del restart_due[index]
                    start(index)
                    log.info("worker restarted", extra={"what": name, "worker": index, "pid": processes[index].pid})
            timeout = min([1.0] + [max(0.0, due - now) for due in restart_due.values()])
            running = {p.sentinel: i for i, p in processes.items() if i not in restart_due}
            ready = multiprocessing.connection.wait([*running, wake_r], timeout=timeout)
            if wake_r in ready:
                _drain_pipe(wake_r)
            for sentinel in ready:
                if sentinel == wake_r or stopping:
                    continue
                index = running[sentinel]
                process = processes[index]
                process.join()
                if process.exitcode == EXIT_NO_RESTART:
                    log.error(reason, extra={"what": name, "worker": index, "pid": process.pid, "exitcode": EXIT_NO_RESTART})
                    final = stopping = True
                    break
                ran = time.monotonic() - started_at[index]
                failures[index] = 1 if ran >= STABLE_AFTER else failures.get(index, 0) + 1
                delay = 0.0 if ran >= STABLE_AFTER else restart_delay(failures[index])
                restart_due[index] = time.monotonic() + delay
                log.error(
                    "worker exited; restarting",
                    extra={
                        "what": name,
                        "worker": index,
                        "pid": process.pid,
                        "exitcode": process.exitcode,
                        "ran_seconds": round(ran, 1),
                        "restart_in": round(delay, 2),
                    },
                )
    finally:
        _stop_all(processes, grace, name)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(previous_wakeup)
        os.close(wake_r)
        os.close(wake_w)
    log.info("workers stopped", extra={"what": name})
    return EXIT_NO_RESTART if final else 0


def _drain_pipe(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def _stop_all(processes: dict[int, multiprocessing.Process], grace: float, name: str) -> None:
    """SIGTERM every worker, wait up to ``grace`` seconds for all, then SIGKILL the rest."""
    for process in processes.values():
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + grace
    for process in processes.values():
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            log.error("worker did not stop in time; killing it", extra={"what": name, "pid": process.pid, "grace": grace})
            process.kill()
            process.join()
