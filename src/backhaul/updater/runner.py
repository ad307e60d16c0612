"""One update, start to end, and the loop of `updater run`.

    check     GET /v1/updates?installed=V (at start, then every check_interval +- jitter)
    verify    signature by a pinned key, expiry, newer than installed (backhaul.release.manifest)
    download  each file streamed to downloads/V/NAME.unverified, size and sha256 checked, renamed
    lease     POST /v1/updates/lease (409: wait for the next check), renewed while working
    install   venv at versions/V/venv, pip offline with the signed hashes, self-test
    switch    current -> versions/V (one rename), state file
    restart   the connector, with a drain (systemd, or the updater's own child)
    gate      ready within the deadline, stable for the stability period (health.py)
    finish    healthy: prune old versions; failed: switch back, restart the previous version,
              remember the version as failed here, report rolled_back

Each step is logged (the updater's log, ROOT/logs/updater.log, and stderr) and reported to
the relay (POST /v1/updates/report); a report that cannot be delivered is logged, never
fatal. Nothing before the switch stops the running connector: a refused, tampered or
undownloadable release, or a full disk, leaves it serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from backhaul.progress import Progress
from backhaul.config import UpdaterLimits
from backhaul.connector import control_socket
from backhaul.errors import BackhaulError, ConfigError
from backhaul.release import keys as release_keys
from backhaul.release.manifest import Manifest, ReleaseRefused, check_file, verify
from backhaul.updater.bootstrap import MANIFEST, SIGNATURE
from backhaul.updater.health import Decision, HealthGate, Reading, Verdict
from backhaul.updater.install import Wheel, install_version
from backhaul.updater.layout import Layout, State, UpdateRefused, check_file_name
from backhaul.updater.relay import Offer, Refused, RelayClient, Unreachable

log = logging.getLogger("backhaul.updater")


def next_wait(limits: UpdaterLimits, rng: random.Random) -> float:
    """Seconds to the next check: the interval, jittered uniformly by +- ``jitter``."""
    return limits.check_interval * (1 + rng.uniform(-limits.jitter, limits.jitter))


@dataclass
class Outcome:
    """What one check did: ``step`` is the last step reached (``up_to_date``, ``refused``, ``healthy``...)."""

    step: str
    version: str | None = None
    reason: str = ""


@dataclass
class Updater:
    layout: Layout
    state_dir: Path
    limits: UpdaterLimits
    connector: object  # service.SystemdConnector | service.SupervisedConnector
    clock: object = time.time
    #: Versions already said to be manual-only / failed, so each is logged once, not hourly.
    _said: set = field(default_factory=set)

    # ------------------------------------------------------------------ helpers

    def _note(self, state: State, version: str | None, step: str, reason: str = "", level: int = logging.INFO) -> None:
        log.log(level, f"update {step}", extra={"version": version, "step": step, "reason": reason})
        self.layout.record(state, version, step, reason)

    async def _report(self, client: RelayClient, version: str, step: str, reason: str = "", token: int | None = None) -> None:
        try:
            await client.report(version, step, reason, token)
        except BackhaulError as exc:
            log.warning("could not report an update step to the relay", extra={"version": version, "step": step, "error": str(exc)})

    def _say_once(self, key: str, message: str, **extra) -> None:
        if key not in self._said:
            self._said.add(key)
            log.info(message, extra=extra)

    async def resume(self) -> Outcome | None:
        """Judge a switch an earlier updater made but did not finish judging (it was stopped or
        crashed during the health gate): the last step of the current version is ``switched``.
        Called at start, after the connector runs; None when there is nothing to judge."""
        state = self.layout.reconcile()
        current = self.layout.current_version()
        last = next((h for h in reversed(state.history) if h.get("version") == current), None)
        if current is None or last is None or last.get("step") not in ("switched", "reconciled") or not state.previous:
            return None
        if not self.layout.version_dir(state.previous).is_dir():
            return None
        log.info("judging a switch left unjudged by an earlier run", extra={"version": current, "previous": state.previous})
        async with RelayClient(self.state_dir) as client:
            decision = await self._gate(client, current)
            if decision.verdict is Verdict.FAILED:
                return await self._roll_back(client, state, current, state.previous, None, decision.reason, None)
            self._note(state, current, "healthy", decision.reason)
            await self._report(client, current, "healthy", decision.reason)
            return Outcome("healthy", current, decision.reason)

    # ------------------------------------------------------------------ one check

    async def check(self, *, manual: bool = False, version: str | None = None, force: bool = False) -> Outcome:
        """Ask the relay for a release and, when one may be installed, install it (the whole chain)."""
        state, installed, pinned = self._installed()
        if not pinned:
            self._say_once(
                "no-keys",
                "no release key is pinned in the state dir: nothing will be installed; pin the publisher's key with "
                "`backhaul connector register ... --release-key FILE`",
                state_dir=str(self.state_dir),
            )
            return Outcome("no_keys", reason="no release key is pinned")
        async with RelayClient(self.state_dir) as client:
            offer = await client.offer(installed, version)
            if offer is None:
                log.debug("no newer release", extra={"installed": installed})
                return Outcome("up_to_date", installed)
            skip = self._skip(offer, state, manual)
            if skip is not None:
                return skip
            try:
                manifest = self._verify(offer.manifest, offer.signature, pinned, installed, offer.version)
            except (ReleaseRefused, UpdateRefused) as exc:
                # Not remembered as failed: a replay or a forgery says nothing about the
                # genuine release of that version, which may still come.
                self._note(state, offer.version, "refused", f"{exc.reason}: {exc}", logging.WARNING)
                await self._report(client, offer.version, "refused", f"{exc.reason}: {exc}")
                return Outcome("refused", offer.version, exc.reason)
            return await self._apply(client, state, offer, manifest, installed, force=force)

    def _skip(self, offer: Offer, state: State, manual: bool) -> Outcome | None:
        if manual:
            return None
        if offer.version in state.failed:
            self._say_once(f"failed-{offer.version}", "release failed here before; not retried automatically (updater apply --version retries)", version=offer.version)
            return Outcome("skipped", offer.version, "failed here before")
        if not offer.auto:
            self._say_once(f"manual-{offer.version}", "release is not marked for automatic update; apply it with `backhaul updater apply`", version=offer.version)
            return Outcome("skipped", offer.version, "not auto")
        rollout = offer.rollout or {}
        if rollout.get("paused") or rollout.get("halted"):
            why = f"halted: {rollout['halted']}" if rollout.get("halted") else "paused"
            self._say_once(f"rollout-{offer.version}-{why}", "the group's rollout is " + why + "; waiting", version=offer.version)
            return Outcome("skipped", offer.version, why)
        return None

    def _installed(self) -> tuple[State, str, list]:
        """The reconciled state, the installed version and the pinned keys (maybe none);
        ConfigError when nothing is installed yet."""
        state = self.layout.reconcile()
        installed = self.layout.current_version()
        if installed is None:
            raise ConfigError(f"nothing is installed under {self.layout.root}; run `backhaul updater install` first")
        return state, installed, release_keys.load_pinned(self.state_dir)

    def _verify(self, manifest_bytes: bytes, signature: bytes, pinned: list, installed: str, offered: str | None) -> Manifest:
        """The signed manifest, checked (keys, expiry, newer than installed, bounds, names);
        ``offered``: the version the relay said it is (None for a local wheelhouse)."""
        manifest = verify(manifest_bytes, signature, pinned, now=self.clock(), installed=installed)
        if offered is not None and manifest.version != offered:
            raise UpdateRefused("malformed", f"the relay offered version {offered} with a signed manifest of version {manifest.version}")
        total = sum(f.size for f in manifest.files)
        if len(manifest.files) > self.limits.max_files or total > self.limits.max_release_bytes:
            raise UpdateRefused(
                "too_large",
                f"release {manifest.version} has {len(manifest.files)} files of {total} bytes; at most "
                f"{self.limits.max_files} files and {self.limits.max_release_bytes} bytes are installed (UpdaterLimits)",
            )
        for entry in manifest.files:
            check_file_name(entry.name)
        return manifest

    async def apply_wheelhouse(self, directory: Path, *, force: bool = False) -> Outcome:
        """Apply a release from a local wheelhouse (``release.manifest`` + ``release.sig`` + the
        wheels: an air-gapped host, or a release carried over by hand). The same checks and
        steps as a release from the relay, the download excepted; the lease is taken unless
        ``force``. The relay is still told each step and asked for the lease."""

        state, installed, pinned = self._installed()
        if not pinned:
            return Outcome("no_keys", reason="no release key is pinned")
        try:
            offer = Offer(version="", manifest=(directory / MANIFEST).read_bytes(), signature=(directory / SIGNATURE).read_bytes(), auto=False, rollout={})
        except OSError as exc:
            raise ConfigError(f"{directory} has no signed manifest ({MANIFEST}, {SIGNATURE}): {exc.strerror}") from None
        async with RelayClient(self.state_dir) as client:
            try:
                manifest = self._verify(offer.manifest, offer.signature, pinned, installed, None)
                offer = Offer(manifest.version, offer.manifest, offer.signature, False, {})
                for entry in manifest.files:
                    check_file(entry, directory / entry.name)
                self.layout.check_space(sum(f.size for f in manifest.files), self.limits.disk_factor)
            except (ReleaseRefused, UpdateRefused) as exc:
                self._note(state, offer.version or None, "refused", f"{exc.reason}: {exc}", logging.WARNING)
                if offer.version:
                    await self._report(client, offer.version, "refused", f"{exc.reason}: {exc}")
                return Outcome("refused", offer.version or None, exc.reason)
            return await self._leased(client, state, manifest, directory, installed, force=force)

    # ------------------------------------------------------------------ download .. finish

    async def _download(self, client: RelayClient, manifest: Manifest) -> tuple[Path, int]:
        """The release's files in downloads/V/, checked; and how many had to be fetched (0: all
        were there from an earlier check whose lease was refused)."""
        directory = self.layout.downloads(manifest.version)
        directory.mkdir(parents=True, exist_ok=True)
        fetched = 0
        with Progress(f"downloading release {manifest.version}", total=sum(f.size for f in manifest.files)) as progress:
            for entry in manifest.files:
                final = directory / entry.name
                if final.exists():
                    try:
                        check_file(entry, final)  # kept from an earlier attempt: checked again, not trusted
                        progress.advance(entry.size)
                        continue
                    except ReleaseRefused:
                        final.unlink()
                path = await client.download(
                    manifest.version, entry.name, entry.size, directory, self.limits.download_stall,
                    self.limits.download_timeout, progress,
                )
                try:
                    check_file(entry, path)
                except ReleaseRefused:
                    path.unlink(missing_ok=True)
                    raise
                path.rename(final)
                fetched += 1
        return directory, fetched

    async def _apply(self, client: RelayClient, state: State, offer: Offer, manifest: Manifest, installed: str, *, force: bool) -> Outcome:
        version = manifest.version
        total = sum(f.size for f in manifest.files)
        try:
            self.layout.check_space(total, self.limits.disk_factor)
            wheelhouse, fetched = await self._download(client, manifest)
        except (ReleaseRefused, UpdateRefused) as exc:
            shutil.rmtree(self.layout.downloads(version), ignore_errors=True)
            self._note(state, version, "refused", f"{exc.reason}: {exc}", logging.WARNING)
            await self._report(client, version, "refused", f"{exc.reason}: {exc}")
            return Outcome("refused", version, exc.reason)
        if fetched:  # said once per release, not at every check that finds the lease taken
            self._note(state, version, "downloaded", f"{fetched} of {len(manifest.files)} files fetched")
            await self._report(client, version, "downloaded")
        return await self._leased(client, state, manifest, wheelhouse, installed, force=force)

    async def _leased(self, client: RelayClient, state: State, manifest: Manifest, wheelhouse: Path, installed: str, *, force: bool) -> Outcome:
        """Take the lease (unless ``force``), renew it while installing, switching and judging."""
        version = manifest.version
        token = None
        if not force:
            try:
                lease = await client.lease(version)
            except Refused as exc:
                if exc.status != 409:
                    raise
                log.info("update lease refused; waiting for the next check", extra={"version": version, "reason": exc.reason, "error": str(exc)})
                return Outcome("lease_refused", version, exc.reason)
            token = lease["token"]
            log.info("update lease taken", extra={"version": version, "token": token, "group": lease.get("group"), "expires": lease.get("expires")})
        else:
            log.warning("updating without the group's lease (--force)", extra={"version": version})
        renewer = asyncio.create_task(self._renew(client, token, lease.get("expires"))) if token is not None else None
        try:
            return await self._install_and_switch(client, state, version, wheelhouse, manifest, installed, token, renewer)
        finally:
            if renewer is not None:
                renewer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewer

    async def _renew(self, client: RelayClient, token: int | None, expires: float | None) -> None:
        """Renew the lease at a third of its remaining life; a stale lease ends the renewals, said once."""
        if token is None:
            return
        while True:
            left = (expires - time.time()) if isinstance(expires, (int, float)) else 30.0
            await asyncio.sleep(max(1.0, left / 3))
            try:
                expires = (await client.renew(token)).get("expires")
            except Refused as exc:
                log.warning("update lease lost", extra={"token": token, "reason": exc.reason, "error": str(exc)})
                return
            except Unreachable as exc:
                log.warning("could not renew the update lease; trying again", extra={"token": token, "error": str(exc)})
                expires = None

    async def _install_and_switch(
        self, client: RelayClient, state: State, version: str, wheelhouse: Path, manifest: Manifest,
        installed: str, token: int | None, renewer: asyncio.Task | None,
    ) -> Outcome:
        wheels = [Wheel(f.name, f.sha256) for f in manifest.files]
        try:
            # The install is subprocesses (venv, pip, self-test): the line shows the step and its time.
            with Progress(f"installing release {version}", unit="") as progress, progress.ticking():
                await asyncio.to_thread(
                    install_version, self.layout, version, wheelhouse, wheels,
                    install_timeout=self.limits.install_timeout, selftest_timeout=self.limits.selftest_timeout,
                    on_step=lambda step: progress.stage(f"installing release {version}: {step}"),
                )
        except UpdateRefused as exc:
            self._note(state, version, "failed", f"{exc.reason}: {exc}", logging.ERROR)
            state.failed.append(version)
            self.layout.save_state(state)
            await self._report(client, version, "failed", f"{exc.reason}: {exc}", token)
            return Outcome("failed", version, str(exc))
        self._note(state, version, "installed")
        await self._report(client, version, "installed", token=token)
        if renewer is not None and renewer.done():
            # The lease went stale before the switch: someone else may be updating this group now.
            self._note(state, version, "refused", "the update lease was lost before the switch; next check", logging.WARNING)
            return Outcome("lease_lost", version)

        older = state.previous
        self.layout.switch(version)
        self.layout.set_active(state, version)
        self._note(state, version, "switched", f"from {installed}")
        await self._report(client, version, "switched", token=token)
        try:
            await asyncio.to_thread(self.connector.restart)
        except BackhaulError as exc:
            decision = Decision(Verdict.FAILED, f"restarting the connector failed: {exc}")
        else:
            decision = await self._gate(client, version)
        if decision.verdict is Verdict.FAILED:
            return await self._roll_back(client, state, version, installed, older, decision.reason, token)
        self._note(state, version, "healthy", decision.reason)
        await self._report(client, version, "healthy", decision.reason, token)
        removed = self.layout.prune(state, self.limits.keep_versions)
        if removed:
            log.info("old versions removed", extra={"versions": removed})
        return Outcome("healthy", version, decision.reason)

    async def _gate(self, client: RelayClient, version: str) -> Decision:
        gate = HealthGate(version, self.limits, time.monotonic())
        run_dir = self.state_dir / "run"
        while True:
            exits = await asyncio.to_thread(self.connector.exits)
            try:
                status = await control_socket.call(run_dir, "GET", "/v1/status")
            except (control_socket.NotRunning, BackhaulError):
                status = None
            reading = Reading.from_status(status, exits=exits)
            if gate.wants_relay_check(reading):
                reading = Reading.from_status(status, exits=exits, relay_reachable=await client.health())
            decision = gate.feed(reading, time.monotonic())
            log.debug("health gate", extra={"version": version, "verdict": decision.verdict.value, "reason": decision.reason})
            if decision.verdict is not Verdict.WAIT:
                log.info("health gate decided", extra={"version": version, "verdict": decision.verdict.value, "reason": decision.reason})
                return decision
            await asyncio.sleep(self.limits.status_interval)

    async def _roll_back(
        self, client: RelayClient, state: State, version: str, previous: str, older: str | None, reason: str, token: int | None
    ) -> Outcome:
        log.error("new version unhealthy; rolling back", extra={"version": version, "previous": previous, "reason": reason})
        self.layout.switch(previous)
        state.active, state.previous = previous, older
        state.failed.append(version)
        self._note(state, version, "rolled_back", f"{reason}; {previous} runs again", logging.ERROR)
        try:
            await asyncio.to_thread(self.connector.restart)
        except BackhaulError as exc:
            log.error("restarting the previous version failed", extra={"version": previous, "error": str(exc)})
        await self._report(client, version, "rolled_back", reason, token)
        self.layout.prune(state, self.limits.keep_versions)
        return Outcome("rolled_back", version, reason)
