"""The HTTP exchange machine's states, steps and transition table, and the record of one exchange.

Data only (the h11 ``_state.py`` shape): :mod:`backhaul.relay.http.exchange` moves along
:data:`TRANSITIONS`; its parts read the states and the :class:`Exchange` record.
"""

from __future__ import annotations

import enum

from backhaul.relay.http import translate
from backhaul.relay.http.reader import Request

class State(enum.IntEnum):
    IDLE = 0
    GATING = 1
    OPENING = 2
    FORWARDING = 3
    DISCARDING = 4
    UPGRADED = 5
    CLOSED = 6


class Step(enum.IntEnum):
    GATE = 0  # the app is gated: ask the gate
    OPEN = 1  # a new stream is opened for the request
    REUSE = 2  # the kept-alive stream takes the request
    ACCEPT = 3  # the stream's OPEN_OK came
    RETRY = 4  # the stream was refused or turned out closed; another is opened
    ANSWER = 5  # the edge answers the request itself
    FINISH = 6  # the exchange is complete
    SWITCH = 7  # the backend answered 101
    CLOSE = 8  # the connection closes


IDLE, GATING, OPENING, FORWARDING, DISCARDING, UPGRADED, CLOSED = State

#: Where each step leads from each state; anything else is a bug.
TRANSITIONS: dict[State, dict[Step, State]] = {
    IDLE: {Step.GATE: GATING, Step.OPEN: OPENING, Step.REUSE: FORWARDING, Step.ANSWER: DISCARDING, Step.CLOSE: CLOSED},
    GATING: {Step.OPEN: OPENING, Step.REUSE: FORWARDING, Step.ANSWER: DISCARDING, Step.CLOSE: CLOSED},
    OPENING: {Step.ACCEPT: FORWARDING, Step.RETRY: OPENING, Step.ANSWER: DISCARDING, Step.CLOSE: CLOSED},
    FORWARDING: {
        Step.FINISH: IDLE, Step.SWITCH: UPGRADED, Step.RETRY: OPENING, Step.ANSWER: DISCARDING, Step.CLOSE: CLOSED,
    },
    DISCARDING: {Step.FINISH: IDLE, Step.CLOSE: CLOSED},
    UPGRADED: {Step.CLOSE: CLOSED},
    CLOSED: {Step.CLOSE: CLOSED},
}

# The steps as plain names: an Enum member read off its class costs a lookup each time.
S_GATE, S_OPEN, S_REUSE, S_ACCEPT, S_RETRY, S_ANSWER, S_FINISH, S_SWITCH, S_CLOSE = Step

# The link's stream.
L_NONE, L_OPENING, L_OPEN = range(3)

#: Requests resent on a new stream when a kept-alive backend connection turns out closed.
RETRY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


class Exchange:
    """One request and its response."""

    __slots__ = (
        "request", "id", "route", "user", "extra", "started", "reused", "retried", "body_sent", "request_done",
        "response_started", "response_done", "rechunk", "close_after", "upgrade_rest", "status", "external_base",
        "external_host", "backend_closes", "continued",
    )

    def __init__(self, request: Request, request_id: str, started: float) -> None:
        self.request = request
        self.id = request_id
        self.route: translate.Route | None = None
        self.user: str | None = None
        self.extra: tuple[tuple[bytes, bytes], ...] = ()
        self.started = started  # (for the DEBUG line of each request: 0.0 when not traced)
        self.reused = False  # sent on a stream an earlier request opened
        self.retried = False
        self.body_sent = False
        self.request_done = False
        self.response_started = False
        self.response_done = False
        self.rechunk = False  # the user gets the body chunked (the backend's framing differs)
        self.close_after = False
        self.upgrade_rest = b""
        self.status = 0
        self.external_base = b""
        self.external_host = b""
        self.backend_closes = False  # the app closes its connection after this response
        # The client may be expected to send the body: it did not ask for 100-continue, or
        # the backend's 100 came, or the body started anyway. Until then the body clock
        # does not run (the client waits for the backend, as it was told it may). HTTP/1.0
        # has no 100: its expectation is ignored (RFC 9110, 10.1.1).
        self.continued = not (request.expect_continue and request.version == "1.1")

    @property
    def can_retry(self) -> bool:
        """Nothing of the request reached the app's answer, and sending it again is safe."""
        request = self.request
        return (
            self.reused
            and not self.retried
            and not self.body_sent
            and not self.response_started
            and self.request_done
            and not request.has_body
            and not request.upgrade
            and request.method in RETRY_METHODS
        )
