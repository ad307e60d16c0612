"""`backhaul updater run|apply|install`: argument handling and the loop of `run`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import random
import signal
import sys
import time
from pathlib import Path

from backhaul.config import LogFiles, UpdaterLimits, _replace_from
from backhaul.connector.state import ConnectorState
from backhaul.errors import BackhaulError, ConfigError
from backhaul.release.manifest import ReleaseRefused
from backhaul.updater.bootstrap import first_install, install_units
from backhaul.updater.layout import Layout, RootLock, UpdateRefused
from backhaul.updater.runner import Outcome, Updater, next_wait
from backhaul.updater.service import SupervisedConnector, SystemdConnector

log = logging.getLogger("backhaul.updater")

#: The updater's own log file, in the install root (the connector's state dir is read-only
#: to the updater under systemd: ReadOnlyPaths in backhaul-updater.service).
LOG_FILE = Path("logs") / "updater.log"


def _log_to_root(root: Path) -> Path:
    """Also write the updater's lines (INFO and up) to ROOT/logs/updater.log, size-rotated."""
    from backhaul.logs import rotating_file

    path = root / LOG_FILE
    handler = rotating_file(path, LogFiles(directory=path.parent))
    handler.setLevel(logging.INFO)
    logging.getLogger().addHandler(handler)
    return path


def _limits(args: argparse.Namespace) -> UpdaterLimits:

    try:
        limits = _replace_from(UpdaterLimits(), getattr(args, "limit", None) or [], "--limit")
        if getattr(args, "check_interval", None) is not None:
            limits = dataclasses.replace(limits, check_interval=args.check_interval)
        return limits
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _state_dir(args: argparse.Namespace) -> Path:

    path = Path(args.state_dir)
    ConnectorState.load(path)  # fails here, in words, on a missing or expired registration
    return path


def _say(outcome: Outcome) -> int:
    words = {
        "up_to_date": f"up to date ({outcome.version})",
        "healthy": f"updated to {outcome.version}: {outcome.reason}",
        "no_keys": "nothing installed: no release key is pinned in the state dir",
    }
    text = words.get(outcome.step, f"{outcome.step}: {outcome.version or ''} {outcome.reason}".strip())
    print(text)
    return 0 if outcome.step in ("up_to_date", "healthy") else 1


def updater_apply(args: argparse.Namespace) -> int:
    """The manual update, now: the same steps as `run` once, for the newest release or ``--version``."""
    state_dir = _state_dir(args)
    if args.wheelhouse and args.version:
        raise ConfigError("--wheelhouse and --version exclude each other: a wheelhouse's signed manifest names its version")
    layout = Layout(args.install_root)
    limits = _limits(args)
    _log_to_root(layout.root)
    with RootLock(layout.root):
        updater = Updater(layout, state_dir, limits, SystemdConnector())
        try:
            if args.wheelhouse:
                outcome = asyncio.run(updater.apply_wheelhouse(Path(args.wheelhouse), force=args.force))
            else:
                outcome = asyncio.run(updater.check(manual=True, version=args.version, force=args.force))
        except (ReleaseRefused, UpdateRefused) as exc:
            raise ConfigError(f"refused ({exc.reason}): {exc}") from None
    code = _say(outcome)
    if code and outcome.step != "healthy":
        print(f"backhaul: the update did not complete ({outcome.step}): {outcome.reason or 'see the log'}", file=sys.stderr)
    return code


def updater_install(args: argparse.Namespace) -> int:
    """The first install on a VM: the tree under --install-root from a local wheelhouse, and the units."""

    root = Path(args.install_root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    _log_to_root(root)
    state_dir = Path(args.state_dir) if args.state_dir else None
    version = first_install(root, Path(args.wheelhouse), state_dir, UpdaterLimits(), time.time())
    print(f"installed {version} under {root} (current -> versions/{version})")
    if not args.no_systemd:
        for path in install_units(root, state_dir):
            print(f"wrote {path}")
        print("enabled backhaul-connector.service and backhaul-updater.service (start them after `connector register`)")
    return 0


def updater_run(args: argparse.Namespace) -> int:
    """Check at start and every --check-interval (jittered); install what may be installed."""
    state_dir = _state_dir(args)
    layout = Layout(args.install_root)
    limits = _limits(args)
    _log_to_root(layout.root)
    with RootLock(layout.root):
        layout.reconcile()
        if layout.current_version() is None:
            raise ConfigError(f"nothing is installed under {layout.root}; run `backhaul updater install` first")
        if args.supervise:
            connector = SupervisedConnector(
                layout.backhaul(), state_dir,
                config=Path(args.connector_config) if args.connector_config else None, stop_timeout=limits.stop_timeout,
            )
        else:
            connector = SystemdConnector()
        return asyncio.run(_loop(Updater(layout, state_dir, limits, connector), connector))


async def _loop(updater: Updater, connector) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    rng = random.Random()
    connector.start()
    log.info("updater running", extra={"root": str(updater.layout.root), "version": updater.layout.current_version(),
                                       "check_interval": updater.limits.check_interval})
    try:
        try:
            resumed = await updater.resume()
            if resumed is not None:
                log.info("unjudged switch judged", extra={"step": resumed.step, "version": resumed.version, "reason": resumed.reason})
        except BackhaulError as exc:
            log.warning("could not judge the switch an earlier run left", extra={"error": str(exc)})
        while not stop.is_set():
            task = asyncio.create_task(updater.check())
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not task.done():
                task.cancel()
            try:
                outcome = await task
                log.info("check done", extra={"step": outcome.step, "version": outcome.version, "reason": outcome.reason})
            except asyncio.CancelledError:
                break
            except (BackhaulError, ReleaseRefused, UpdateRefused) as exc:
                # The relay unreachable, a refusal: logged, and the next check tries again.
                log.warning("update check failed; next check as planned", extra={"error": str(exc)})
            deadline = time.monotonic() + next_wait(updater.limits, rng)
            while not stop.is_set() and time.monotonic() < deadline:
                connector.watch()
                try:
                    await asyncio.wait_for(stop.wait(), timeout=min(1.0, max(0.0, deadline - time.monotonic())))
                except asyncio.TimeoutError:
                    pass
    finally:
        await asyncio.to_thread(connector.stop)
        log.info("updater stopped")
    return 0
