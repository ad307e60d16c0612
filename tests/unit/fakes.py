"""Fakes the unit tests share: only time is ever faked."""


class Clock:
    """A monotonic or wall clock that a test moves by setting ``now``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
