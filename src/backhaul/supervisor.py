"""Runs N copies of a worker function as child processes and keeps them running.

A crashed worker is restarted with exponential backoff; SIGTERM or SIGINT is passed
on to every worker, which drains, and the supervisor exits once they all have.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import signal
import time
from typing import Callable

log = logging.getLogger("backhaul.supervisor")


def _child(target: Callable[[int], None], index: int, log_level: int) -> None:
    from backhaul.logs import setup_logging

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    setup_logging(logging.getLevelName(log_level))
    target(index)


def supervise(target: Callable[[int], None], workers: int, name: str, grace: float = 40.0) -> int:
    """Run ``target(i)`` for i in range(workers) in child processes until told to stop."""
    if workers == 1:
        target(0)
        return 0
    context = multiprocessing.get_context("fork")
    level = logging.getLogger().level
    stopping = False

    def request_stop(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    processes: dict[int, multiprocessing.Process] = {}
    restarts: dict[int, int] = {}

    def start(index: int) -> None:
        process = context.Process(target=_child, args=(target, index, level), name=f"{name}-{index}", daemon=False)
        process.start()
        processes[index] = process

    try:
        for index in range(workers):
            start(index)
        log.info("workers started", extra={"what": name, "workers": workers})
        while not stopping:
            sentinels = {p.sentinel: i for i, p in processes.items()}
            ready = multiprocessing.connection.wait(list(sentinels), timeout=0.5)
            for sentinel in ready:
                index = sentinels[sentinel]
                code = processes[index].exitcode
                if stopping:
                    break
                restarts[index] = restarts.get(index, 0) + 1
                delay = min(30.0, 0.2 * 2 ** min(restarts[index], 8))
                log.error(
                    "worker exited; restarting",
                    extra={"what": name, "worker": index, "exitcode": code, "restart_in": delay},
                )
                time.sleep(delay)
                start(index)
    finally:
        for process in processes.values():
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + grace
        for process in processes.values():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.error("worker did not stop in time; killing it", extra={"what": name, "pid": process.pid})
                process.kill()
                process.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
