"""Maintenance windows of a connector group: ``"Sat,Sun 02:00-04:00"``, in UTC.

Inside its window a group may update a connector even when that leaves the group with no
active connector (a short outage the admin has agreed to); outside it, only while another
connector of the group is up (see docs/architecture.md, "Rollout"). Sans-I/O: parsing and
clock arithmetic only, the time is passed in.

The format: days, a space, ``HH:MM-HH:MM``.

- days: ``daily``, or a comma list of ``Mon`` ``Tue`` ``Wed`` ``Thu`` ``Fri`` ``Sat`` ``Sun``
  and ranges of them (``Mon-Fri``; ``Fri-Mon`` wraps over the weekend);
- times are UTC, 24-hour, ``00:00`` to ``23:59``; the window opens on each listed day at the
  start and lasts until the end, on the next day when the end is not after the start
  (``Fri 22:00-02:00`` ends Saturday 02:00; ``Sat 00:00-00:00`` is the whole of Saturday).
"""

from __future__ import annotations

import dataclasses
import re

DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
DAY_SECONDS = 86400
#: 1970-01-01, day 0 of Unix time, was a Thursday (Mon is 0).
_EPOCH_WEEKDAY = 3

# Unanchored, ASCII-only and without lookarounds, so the same text is the served OpenAPI
# pattern (see control.validate): what the document allows, the relay takes.
_DAY = "(?:" + "|".join(DAYS) + ")"
_DAY_ITEM = f"{_DAY}(?:-{_DAY})?"
_TIME = "(?:[01][0-9]|2[0-3]):[0-5][0-9]"
WINDOW_PATTERN = f"(?:daily|{_DAY_ITEM}(?:,{_DAY_ITEM}){{0,6}}) {_TIME}-{_TIME}"
#: Longest spec the pattern allows: seven "Mon-Tue" items, six commas and " 00:00-00:00".
MAX_WINDOW = 7 * 7 + 6 + 12
EXAMPLE = "Sat,Sun 02:00-04:00"

_WINDOW = re.compile(WINDOW_PATTERN)


class BadWindow(ValueError):
    """A maintenance window spec that does not parse; the message says what a good one looks like."""


@dataclasses.dataclass(frozen=True)
class Window:
    #: weekdays the window opens on, Mon = 0
    days: frozenset[int]
    #: minutes after midnight UTC
    start: int
    end: int

    @classmethod
    def parse(cls, spec: str) -> "Window":
        if not isinstance(spec, str) or len(spec) > MAX_WINDOW or not _WINDOW.fullmatch(spec):
            raise BadWindow(
                f"maintenance window {str(spec)[:80]!r} is not valid: write DAYS HH:MM-HH:MM in UTC, e.g. {EXAMPLE!r}, "
                f"'Mon-Fri 22:00-02:00' or 'daily 03:00-04:00' (days: {','.join(DAYS)}, ranges like Mon-Fri, or daily)"
            )
        days_part, _, times = spec.partition(" ")
        start, _, end = times.partition("-")
        if days_part == "daily":
            days = frozenset(range(7))
        else:
            chosen: set[int] = set()
            for item in days_part.split(","):
                first, _, last = item.partition("-")
                a = DAYS.index(first)
                b = DAYS.index(last) if last else a
                chosen.update((a + k) % 7 for k in range((b - a) % 7 + 1))
            days = frozenset(chosen)
        return cls(days=days, start=_minutes(start), end=_minutes(end))

    def __str__(self) -> str:
        """The canonical spec: days in week order (or ``daily``), as stored and shown."""
        days = "daily" if len(self.days) == 7 else ",".join(DAYS[d] for d in sorted(self.days))
        return f"{days} {_clock(self.start)}-{_clock(self.end)}"

    @property
    def seconds(self) -> int:
        """How long the window stays open each time: up to a whole day (end == start)."""
        return ((self.end - self.start) % 1440 or 1440) * 60

    def _opening(self, day: int) -> float | None:
        """When the window opens on Unix day ``day``, or None if it does not open that day."""
        if (day + _EPOCH_WEEKDAY) % 7 not in self.days:
            return None
        return day * DAY_SECONDS + self.start * 60.0

    def contains(self, now: float) -> bool:
        """True when ``now`` (Unix time) is inside the window."""
        today = int(now // DAY_SECONDS)
        # A window lasts at most a day, so only an opening today or yesterday can cover now.
        for day in (today, today - 1):
            opens = self._opening(day)
            if opens is not None and opens <= now < opens + self.seconds:
                return True
        return False

    def next_open(self, now: float) -> float:
        """The next time the window opens at or after ``now``."""
        today = int(now // DAY_SECONDS)
        for day in range(today, today + 8):
            opens = self._opening(day)
            if opens is not None and opens >= now:
                return opens
        raise AssertionError("a window with days opens within a week")  # parse() never makes one without


def _minutes(hhmm: str) -> int:
    hours, _, minutes = hhmm.partition(":")
    return int(hours) * 60 + int(minutes)


def _clock(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def canonical(spec: str) -> str:
    """``spec`` parsed and written back in canonical form; BadWindow if it does not parse."""
    return str(Window.parse(spec))
