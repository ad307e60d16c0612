"""When an HTTP edge connection reads its user's socket, and what its one timer waits for.

Reading pauses for any of three reasons (bits, :data:`P_QUEUE` and the others): reading
resumes when none is left, so at most one read of pipelined requests is held. The one
timer waits for one thing at a time (:attr:`Pacing.timer`: :data:`T_HEAD` and the
others); arming it sets :attr:`Pacing.due`, the seconds from now it runs out in, which the
connection turns into a deadline once it has carried out the machine's actions (so
several arms in one turn cost one clock read), and moves its one timer handle to. The request body's clock (relay/body_clock.py) runs only while the
edge reads the socket for a body it waits for, so time the tunnel pushes back is never
the client's.
"""

from __future__ import annotations

import logging

from backhaul.config import HttpLimits
from backhaul.relay.body_clock import BodyClock
from backhaul.relay.http.actions import COUNT, PAUSE, RESUME

# What the timer is for.
T_NONE, T_IDLE, T_HEAD, T_RESPONSE, T_BODY = range(5)

# Why reading the user's socket is paused (bits; reading resumes when none is left).
P_QUEUE = 1  # events of a request wait for the exchange before it
P_TUNNEL = 2  # the tunnel stream pushes back
P_UPGRADE = 4  # bytes after an Upgrade head wait for the backend's 101


class Pacing:
    """The reading and the timer of one connection's machine (``m``: an ExchangeMachine)."""

    __slots__ = ("m", "timer", "due", "paused", "reading_paused", "closed", "body")

    def __init__(self, machine, limits: HttpLimits) -> None:
        self.m = machine
        self.timer = T_NONE  # what the timer waits for
        self.due: float | None = None  # armed anew: runs out this many seconds from now
        self.paused = 0  # P_* bits
        self.reading_paused = False
        self.closed = False  # the connection closes: reading never resumes
        # It runs only while the edge reads the user's socket for a body it waits for,
        # and counts only that time ("active" seconds).
        self.body = BodyClock(limits)

    def arm(self, seconds: float, kind: int) -> None:
        self.timer = kind
        self.due = seconds

    def set_paused(self, reason: int, on: bool) -> None:
        paused = (self.paused | reason) if on else (self.paused & ~reason)
        self.paused = paused
        if paused and not self.reading_paused:
            self.reading_paused = True
            self.m.actions.extend((PAUSE, None))
            if self.body.running:
                self.body_sync()
        elif not paused and self.reading_paused and not self.closed:
            self.reading_paused = False
            self.m.actions.extend((RESUME, None))
            self.body_sync()

    def body_sync(self) -> None:
        """Start or stop the body clock as the connection's state asks.

        It runs while a request body is outstanding and the edge is reading the user's
        socket for it: not while reading is paused (the tunnel pushes back, or earlier
        events wait: a slow backend is not a slow client), not before a client that asked
        for 100-continue got it, and not once a response has started (an early answer
        ends the exchange by the existing rules: the connection closes after it).
        """
        m = self.m
        ex = m.ex
        want = (
            ex is not None
            and ex.continued
            and not ex.response_started
            and m.reader.mid_body
            and not self.reading_paused
            and not self.closed
        )
        clock = self.body
        if want == clock.running:
            return
        now = m.clock()
        if not want:
            clock.pause(now)
            if self.timer == T_BODY:
                self.timer = T_NONE
            return
        clock.run(now, ex, m.reader.body_start)
        self.body_check(now)

    def body_check(self, now: float) -> None:
        """Look at the body's progress: time it out, or look again later."""
        body_bytes = self.m.reader.body_bytes
        rule, value = self.body.look(now, body_bytes)
        if rule is None:
            self.arm(value, T_BODY)
        else:
            self._body_timed_out(rule, self.body.received(body_bytes), value)

    def _body_timed_out(self, rule: str, received: int, active: float) -> None:
        """The request body broke ``rule``: 408."""
        m = self.m
        ex = m.ex
        limits = m.limits
        if rule == "body_timeout":
            reason = f"no byte of the request body came for {limits.body_timeout:g} s"
        else:
            reason = (
                f"the request body came slower than {limits.body_min_rate} bytes/s "
                f"({received} bytes in {active:.1f} s)"
            )
        m.actions.extend((COUNT, "http_body_timeouts"))
        m.log(
            logging.INFO, "request body timed out",
            {
                "client": m.client,
                "id": ex.id,
                "app": ex.route.app.name if ex.route else None,
                "rule": rule,
                "bytes": received,
                "seconds": round(active, 3),
            },
        )
        # Nothing of a response has started (the clock stops when one does): the user
        # gets 408, the stream to the connector is reset, and so is the backend connection.
        m.link.drop(graceful=False, reason="the request body timed out")
        m.answer(408, reason, close=True)
