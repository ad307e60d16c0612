"""The health gate after a switch, sans I/O: fed readings of the new connector, it decides.

The caller reads the connector's status (its control socket) every ``status_interval``,
tells whether the process exited since the last reading, and, when the new connector is
up but has no tunnel, whether the relay answers the updater itself (the old code, still
running in the updater). The gate answers WAIT, HEALTHY, FAILED (roll back, with the reason)
or UNJUDGED (the relay stayed unreachable too long to judge: keep the new version, blame
nobody). Time comes in with each reading, so tests drive it with a fake clock.

Rules (after Teleport's teleport-update, RFD 0184, and its PR #49175):
- ready = the control socket answers, reports the expected version, has a tunnel up and
  has applied its config; it must be ready within ``ready_deadline`` and then stay ready for
  ``ceil(stable_period / status_interval)`` readings in a row, all before
  ``ready_deadline + stable_period`` has passed;
- more than ``max_crashes`` exits is a crash loop;
- while the relay is unreachable from the updater too, the clock of the deadlines stops:
  the relay's outage is not the new version's fault.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from backhaul.config import UpdaterLimits


class Verdict(enum.Enum):
    WAIT = "wait"
    HEALTHY = "healthy"
    FAILED = "failed"
    UNJUDGED = "unjudged"


@dataclass(frozen=True)
class Reading:
    """One look at the new connector."""

    #: Its control socket answered.
    answered: bool
    version: str | None = None
    tunnels: int = 0
    config_applied: bool = False
    #: Times the process exited since the previous reading (a crash, a start that failed).
    exits: int = 0
    #: Whether the relay answers the updater's own health call; None when not checked
    #: (the caller checks only when the new connector is up without a tunnel).
    relay_reachable: bool | None = None

    @classmethod
    def from_status(cls, status: dict | None, *, exits: int = 0, relay_reachable: bool | None = None) -> "Reading":
        """From the control socket's GET /v1/status answer (None: nothing answered)."""
        if not isinstance(status, dict):
            return cls(answered=False, exits=exits, relay_reachable=relay_reachable)
        figures = status.get("figures") if isinstance(status.get("figures"), dict) else {}
        return cls(
            answered=True,
            version=figures.get("version"),
            tunnels=int(figures.get("tunnels") or 0),
            config_applied=figures.get("config_version") is not None,
            exits=exits,
            relay_reachable=relay_reachable,
        )


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str = ""


class HealthGate:
    """Judges one new version from the readings fed to ``feed``; one gate per switch."""

    def __init__(self, version: str, limits: UpdaterLimits, now: float) -> None:
        self.version = version
        self.limits = limits
        self.started = now
        self._last = now
        #: Seconds not counted against the deadlines (the relay was unreachable).
        self.paused = 0.0
        self.crashes = 0
        self.stable = 0
        self.was_ready = False
        self.needed = max(1, math.ceil(limits.stable_period / limits.status_interval))
        self._worst = "its control socket never answered"
        self.decision: Decision | None = None

    def wants_relay_check(self, reading: Reading) -> bool:
        """True when the caller should say whether the relay is reachable, for this reading."""
        return reading.answered and reading.version == self.version and reading.tunnels == 0

    def elapsed(self, now: float) -> float:
        return now - self.started - self.paused

    def feed(self, reading: Reading, now: float) -> Decision:
        if self.decision is not None:
            return self.decision
        step, self._last = now - self._last, now
        if reading.exits:
            self.crashes += reading.exits
            self.stable = 0
            if self.crashes > self.limits.max_crashes:
                return self._end(Verdict.FAILED, f"crash loop: the new connector exited {self.crashes} times")
            return Decision(Verdict.WAIT, f"exited ({self.crashes} of {self.limits.max_crashes} tolerated)")
        ready = reading.answered and reading.version == self.version and reading.tunnels > 0 and reading.config_applied
        if ready:
            self.was_ready = True
            self.stable += 1
            if self.stable >= self.needed:
                return self._end(Verdict.HEALTHY, f"ready and stable for {self.stable} readings")
        else:
            self.stable = 0
            self._worst = self._why(reading)
            if reading.relay_reachable is False:
                self.paused += step
                outage = self.paused
                if outage > self.limits.relay_outage_wait:
                    return self._end(
                        Verdict.UNJUDGED,
                        f"the relay was unreachable from the updater too for {outage:.0f} s; the new version is kept unjudged",
                    )
                return Decision(Verdict.WAIT, "the relay is unreachable from the updater too: not the new version's fault")
        elapsed = self.elapsed(now)
        if not self.was_ready and elapsed > self.limits.ready_deadline:
            return self._end(Verdict.FAILED, f"not ready within {self.limits.ready_deadline:g} s: {self._worst}")
        if elapsed > self.limits.ready_deadline + self.limits.stable_period:
            return self._end(
                Verdict.FAILED,
                f"not stable within {self.limits.ready_deadline + self.limits.stable_period:g} s "
                f"(ready, then lost it: {self._worst})",
            )
        return Decision(Verdict.WAIT, "ready" if ready else self._worst)

    def _why(self, reading: Reading) -> str:
        if not reading.answered:
            return "its control socket never answered (hung at start, or not started)"
        if reading.version != self.version:
            return f"it reports version {reading.version}, not {self.version}"
        if reading.tunnels == 0:
            return "it never connected: no tunnel to the relay came up"
        return "its config was never applied"

    def _end(self, verdict: Verdict, reason: str) -> Decision:
        self.decision = Decision(verdict, reason)
        return self.decision
