"""The HTTP edge's request-body clock, sans-I/O: is a body coming in too slowly?

The edge runs the clock only while it reads a body it waits for (``run``/``pause``); time
the tunnel pushes back is not the client's. At each ``look`` it says how long to wait
before the next one, or which rule the body broke: ``HttpLimits.body_timeout`` seconds
without a body byte, or, after ``body_rate_grace`` seconds, an average under
``body_min_rate`` bytes a second (Apache mod_reqtimeout's ``body=20,MinRate=500``).
Progress is seen at looks only (nothing is done per read), so looks come at least every
quarter of ``body_timeout``: a stall is cut within 1.25 times it.
"""

from __future__ import annotations

from backhaul.config import HttpLimits


class BodyClock:
    """The clock of one connection; ``owner`` names the body (an exchange) it times."""

    __slots__ = ("limits", "running", "owner", "_active", "_since", "_base", "_seen", "_seen_at")

    def __init__(self, limits: HttpLimits) -> None:
        self.limits = limits
        self.running = False  # the edge reads the body now
        self.owner: object | None = None  # the exchange whose body is timed
        self._active = 0.0  # seconds the clock ran before the current run
        self._since = 0.0  # when the current run started
        self._base = 0  # body bytes when the body began
        self._seen = 0  # body bytes at the last look that saw progress
        self._seen_at = 0.0  # active seconds at that look

    def run(self, now: float, owner: object, body_start: int) -> None:
        """Start (or go on with) timing ``owner``'s body; ``body_start``: its byte count when it began."""
        if self.owner is not owner:
            self.owner = owner
            self._active = self._seen_at = 0.0
            self._base = self._seen = body_start
        self.running = True
        self._since = now

    def pause(self, now: float) -> None:
        self.running = False
        self._active += now - self._since

    def look(self, now: float, body_bytes: int) -> tuple[str | None, float]:
        """(None, seconds until the next look), or (the rule broken, active seconds) once
        the body is too slow; the clock then stops."""
        limits = self.limits
        active = self._active + (now - self._since)
        if body_bytes != self._seen:
            self._seen = body_bytes
            self._seen_at = active
        idle_left = self._seen_at + limits.body_timeout - active
        # The rate rule, as a deadline: the body may take grace + bytes / rate seconds.
        rate_left = limits.body_rate_grace + (body_bytes - self._base) / limits.body_min_rate - active
        if idle_left <= 0 or rate_left <= 0:
            self.running = False
            return ("body_timeout" if idle_left <= 0 else "body_min_rate"), active
        return None, min(idle_left, rate_left, limits.body_timeout / 4)

    def received(self, body_bytes: int) -> int:
        """Body bytes since the body began."""
        return body_bytes - self._base
