"""A connector worker's dealings with the control API: config pull, heartbeat, renewal.

The configuration is pulled at start (retried with backoff until it comes: a worker
without it can allow nothing), then every ``refresh_interval`` seconds (the control API
says how often), and at once when the relay hints that it changed (a tunnel's hello or
``config_changed``, or a heartbeat's answer naming another version). A failed pull
later on keeps the current configuration.

Every ``heartbeat_interval`` seconds the worker reports its load and its apps' health,
and renews its certificate when it is due; new tunnels and API calls then use the new
one, open tunnels carry on. An explicit "this connector is deleted" answer to any of
these calls stops the worker for good (see control_client.DELETED_CODES).

Every configuration applied is also saved in the state dir (``config.json``, 0600, the
control API's answer as it came): a worker that starts while no relay can answer (the
service's database is away, every node is down) serves the apps of the last configuration
saved and keeps pulling, instead of allowing nothing until a pull succeeds.

Every call goes to the enrolled service URL (any node of a service serves it, a load
balancer in front of them too); when that fails (the node is down, a 5xx), it is tried
on the addresses of a few nodes of the last list (``fallbacks``), best ranked first. A
config answer's ``nodes`` (the up relay nodes) goes to ``nodes``.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Awaitable, Callable, TypeVar

import aiohttp
import orjson

from backhaul import __version__, pki
from backhaul.config import REFRESH_INTERVAL
from backhaul.connector import control_client
from backhaul.connector.settings import ConnectorSettings
from backhaul.connector.slots import backoff_delay
from backhaul.connector.state import ConnectorState
from backhaul.errors import ConfigError, ServiceError
from backhaul.files import read_bounded

log = logging.getLogger("backhaul.connector")

#: The last configuration applied, in the state dir (see the module docstring).
CONFIG_FILE = "config.json"

T = TypeVar("T")


class Upkeep:
    """Config, heartbeat and renewal of one connector worker (see the module docstring).

    ``settings`` is called for the current settings; the worker is told through
    ``apply`` (the apps of a new configuration, by name), ``renewed`` (new credentials),
    ``deleted`` (the relay refused the connector as deleted); ``load`` gives the
    heartbeat's figures of the worker (streams, bytes, apps); ``nodes`` gets a config's
    node list; ``fallbacks`` gives the node URLs to try when the enrolled address fails."""

    def __init__(
        self,
        settings: Callable[[], ConnectorSettings],
        state: ConnectorState,
        stopping: asyncio.Event,
        apply: Callable[[dict[str, dict]], None],
        renewed: Callable[[ConnectorState], None],
        deleted: Callable[[Exception], None],
        load: Callable[[], dict],
        nodes: Callable[[object, str], None] = lambda raw, source: None,
        fallbacks: Callable[[], list[str]] = list,
    ) -> None:
        self._settings = settings
        self.state = state
        self._stopping = stopping
        self._apply = apply
        self._renewed = renewed
        self._deleted = deleted
        self._load = load
        self._nodes = nodes
        self._fallbacks = fallbacks
        self.http: aiohttp.ClientSession | None = None
        self.etag: str | None = None
        self.config_version: int | None = None
        self.refresh_interval = float(REFRESH_INTERVAL)
        #: set when the configuration may have changed: pull it now
        self.changed = asyncio.Event()
        self._config_task: asyncio.Task | None = None
        self._heartbeat_task: asyncio.Task | None = None
        self._last_usage: tuple[float, float] | None = None  # (monotonic, CPU seconds) at the last heartbeat

    @property
    def opened(self) -> bool:
        return self.http is not None

    def open(self) -> None:
        """The control API session (call from inside the event loop)."""
        self.http = control_client.connector_session(self.state, proxy=self._settings().proxy)

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()

    def start(self) -> None:
        """The periodic pulls and heartbeats, until ``stop``."""
        self._config_task = asyncio.create_task(self._config_loop())
        self._heartbeat_task = asyncio.create_task(self._heartbeat_loop())

    def restart_heartbeat(self) -> None:
        """A new heartbeat interval: the next heartbeat is one new interval from now."""
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            self._heartbeat_task = asyncio.get_running_loop().create_task(self._heartbeat_loop())

    def stop(self) -> None:
        for task in (self._config_task, self._heartbeat_task):
            if task is not None:
                task.cancel()

    def version_seen(self, version: object) -> None:
        """The relay names the config version it serves: pull when it is not ours."""
        if version != self.config_version:
            self.changed.set()

    # ------------------------------------------------------------------ configuration

    async def pull(self, initial: bool = False) -> None:
        """Pull the configuration and apply it if it changed; ``initial``: retry until it comes."""
        attempt = 0
        while not self._stopping.is_set():
            try:
                etag, config = await self._anywhere(
                    lambda base: control_client.pull_config(self.state, self.http, self.etag, base)
                )
            except control_client.ConnectorDeleted as exc:
                self._deleted(exc)
                return
            except Exception as exc:
                if not initial:
                    log.warning("config pull failed; keeping the current config", extra={"error": str(exc)})
                    return
                if attempt == 0 and self._use_saved(exc):
                    return  # the regular pulls (and the relays' hints) bring the current one
                delay = backoff_delay(self._settings().backoff, attempt)
                attempt += 1
                log.warning("config pull failed; retrying", extra={"error": str(exc), "retry_in": round(delay, 2)})
                try:
                    await asyncio.wait_for(self._stopping.wait(), delay)
                except asyncio.TimeoutError:
                    pass  # the delay passed without a stop: try again
                continue
            if config is not None:
                self._use_config(etag, config)
            return

    def _use_saved(self, exc: Exception) -> bool:
        """At start, with no answer: apply the configuration saved by the last pull, if any."""
        path = self.state.state_dir / CONFIG_FILE
        if not path.exists():
            return False
        try:
            saved = orjson.loads(read_bounded(path, control_client.MAX_RESPONSE, "the saved config", "delete it"))
            etag, config = saved["etag"], saved["config"]
            if not isinstance(config, dict) or not isinstance(config.get("apps"), list):
                raise ValueError("it has no apps list")
        except (ConfigError, ValueError, KeyError, TypeError) as bad:
            log.warning("the saved config cannot be used; waiting for the service", extra={"file": str(path), "error": str(bad)})
            return False
        log.warning(
            "config pull failed at start; serving the config saved by the last pull until the service answers",
            extra={"error": str(exc), "version": config.get("version")},
        )
        self._use_config(etag, config, save=False)
        return True

    def _save(self, etag: str, config: dict) -> None:
        try:
            pki.write_private(self.state.state_dir / CONFIG_FILE, orjson.dumps({"etag": etag, "config": config}))
        except OSError as exc:
            log.warning("cannot save the config in the state dir; a start without the service will wait for it", extra={"error": str(exc)})

    def _use_config(self, etag: str, config: dict, save: bool = True) -> None:
        if save:
            self._save(etag, config)
        apps = {app["name"]: app for app in config.get("apps", [])}
        self.etag = etag
        self.config_version = config.get("version")
        self.refresh_interval = float(config.get("refresh_interval", REFRESH_INTERVAL))
        self._apply(apps)
        if "nodes" in config:
            self._nodes(config["nodes"], "config")
        log.info("config applied", extra={"version": self.config_version, "apps": sorted(apps)})

    async def _config_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.changed.wait(), self.refresh_interval)
            except asyncio.TimeoutError:
                pass  # no hint in a whole interval: pull anyway
            self.changed.clear()
            await self.pull()

    # ------------------------------------------------------------------ heartbeat and renewal

    def _usage(self) -> dict:
        """This worker's numbers for the heartbeat."""
        now = time.monotonic()
        cpu_seconds = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
        last_wall, last_cpu = self._last_usage or (now, cpu_seconds)
        self._last_usage = (now, cpu_seconds)
        cpu = 100.0 * (cpu_seconds - last_cpu) / (now - last_wall) if now > last_wall else 0.0
        rss = 0
        with open("/proc/self/statm") as statm:
            rss = int(statm.read().split()[1]) * resource.getpagesize()
        return {"version": __version__, "cpu": round(cpu, 1), "memory": rss, **self._load()}

    async def _heartbeat_loop(self) -> None:
        self._usage()
        while True:
            await asyncio.sleep(self._settings().heartbeat_interval)
            try:
                usage = self._usage()
                answer = await self._anywhere(lambda base: control_client.heartbeat(self.state, self.http, usage, base))
                if answer.get("config_version") is not None:
                    self.version_seen(answer["config_version"])
            except control_client.ConnectorDeleted as exc:
                self._deleted(exc)
                return
            except Exception as exc:
                log.warning("heartbeat failed; will retry", extra={"error": str(exc)})
            try:
                state = await self._anywhere(lambda base: control_client.renew_if_due(self.state, self.http, base=base))
            except control_client.ConnectorDeleted as exc:
                self._deleted(exc)
                return
            except Exception as exc:
                log.warning(
                    "certificate renewal failed; will retry",
                    extra={"error": str(exc), "seconds_left": round(self.state.seconds_left())},
                )
                continue
            if state.cert_serial != self.state.cert_serial:
                self.use_credentials(state)

    async def _anywhere(self, call: Callable[[str | None], Awaitable[T]]) -> T:
        """``call`` on the enrolled service URL (None), then, while it fails with a ServiceError,
        on each fallback node URL; the last error is raised. A refusal of this connector
        (a CertificateError) is never retried elsewhere: every node would say the same."""
        bases: list[str | None] = [None, *self._fallbacks()]
        for number, base in enumerate(bases):
            try:
                return await call(base)
            except ServiceError as exc:
                if number == len(bases) - 1:
                    raise
                log.info(
                    "control call failed; trying another relay node",
                    extra={"error": str(exc), "next": bases[number + 1]},
                )
        raise AssertionError("unreachable: bases is never empty")

    def use_credentials(self, state: ConnectorState, why: str = "certificate renewed") -> None:
        """New tunnels and API calls use ``state``'s certificate; open tunnels carry on."""
        self.state = state
        self._renewed(state)
        old, self.http = self.http, control_client.connector_session(state, proxy=self._settings().proxy)
        asyncio.get_running_loop().create_task(old.close())
        log.info(
            why,
            extra={"serial": format(state.cert_serial, "x"), "expires": state.cert_not_after.isoformat()},
        )
