"""Flood accounting of one tunnel end: what the peer may make this side do for nothing.

Theory of operation
-------------------
A peer with a valid certificate can still try to exhaust this side with frames that
bring no work but cost a reply or a callback. ``mux.Session`` owns one ``FloodGuard``
and asks it on the frames it counts (never on DATA); the guard answers None, or the
reason of a flood, and the session then ends the tunnel with GOAWAY ENHANCE_YOUR_CALM.
Nothing here depends on the role: a connector is protected from a hostile relay exactly
as the relay is from a hostile connector. No I/O, no clock of its own (``now`` is passed in).

- *Flood limits* (``config.FloodLimits``): token buckets for PINGs, CONTROL messages,
  unwanted streams (OPENs refused without work, streams reset by the peer before they
  were accepted: rapid reset), idle frames (frames for closed streams, empty DATA, stray
  PONGs and GOAWAYs, DATAGRAMs for flows that are not open), and a WINDOW count bounded
  by the frames this side sent. Buckets that earn from work (accepted or opened streams)
  read that count only when a token is taken, so earning costs nothing where work happens.
- *Reply backpressure*: replies (PONG, OPEN_FAIL, RST) are counted in bytes. The transport
  says when its write buffer goes above its high mark and below its low mark
  (``output_blocked``); once more than ``FloodLimits.reply_bytes_while_blocked`` of replies
  were made while blocked, ``replied`` says to hold input, and the transport stops reading,
  so a peer that sends and never reads is held by TCP. Only replies count: DATA and the
  WINDOWs it earns are bounded by the windows, and counting them could make two ends doing
  bulk DATA both ways stop reading each other. A legitimate peer provokes no such replies
  in volume, so two honest ends never both hold.
"""

from __future__ import annotations

from backhaul.config import FloodLimits
from backhaul.protocol.constants import HEADER_SIZE, ErrorCode

#: OPEN_FAIL codes that mean "this OPEN should not have been sent": refusals that cost an
#: OPEN_FAIL and no work, counted against FloodLimits.unwanted_stream_*. Refusals after a
#: connect attempt (CONNECT_REFUSED, CONNECT_TIMEOUT, ...) are work done, not a flood.
UNWANTED_REFUSALS = frozenset(
    {int(ErrorCode.PROTOCOL_ERROR), int(ErrorCode.REFUSED_STREAM), int(ErrorCode.UNKNOWN_APP), int(ErrorCode.TARGET_NOT_ALLOWED)}
)
#: Bytes of a PONG on the wire.
PONG_SIZE = HEADER_SIZE + 8
#: Bytes of an OPEN_FAIL or RST on the wire without its reason.
ERROR_FRAME_SIZE = HEADER_SIZE + 2


class Budget:
    """A token bucket of FloodLimits: ``burst`` tokens, ``rate`` more a second, ``per_work`` per unit of work.

    ``work`` is a count that only grows (streams accepted, streams opened) and is read only
    when a token is taken.
    """

    __slots__ = ("name", "capacity", "rate", "per_work", "tokens", "at", "work")

    def __init__(self, name: str, burst: int, rate: float, per_work: int, now: float) -> None:
        self.name = name  # the limit's name, as logged and in FloodGuard.flood
        self.capacity = float(burst)  # tokens at most
        self.rate = rate  # tokens earned a second
        self.per_work = per_work  # tokens earned per unit of work
        self.tokens = float(burst)  # tokens left at ``at``
        self.at = now  # when tokens was last computed
        self.work = 0  # the work count seen then

    def take(self, now: float, work: int = 0) -> bool:
        """Take one token; False when the bucket is empty (a flood)."""
        tokens = self.tokens + (now - self.at) * self.rate + (work - self.work) * self.per_work
        self.at = now
        self.work = work
        if tokens > self.capacity:
            tokens = self.capacity
        tokens -= 1.0
        self.tokens = tokens
        return tokens >= 0.0


class FloodGuard:
    """The flood limits and reply accounting of one session (see the module docstring).

    Each check returns None, or the reason of the flood (``flood`` then names the limit).
    """

    __slots__ = (
        "limits", "flood", "accepted", "windows_in", "window_allowance", "goaways_in",
        "reply_bytes", "_reply_mark", "_blocked", "_ping", "_control", "_unwanted", "_idle",
    )

    def __init__(self, limits: FloodLimits, now: float) -> None:
        self.limits = limits
        #: the name of the limit that ran out, or None
        self.flood: str | None = None
        #: streams this side accepted (earns unwanted-stream tokens)
        self.accepted = 0
        #: WINDOW frames received, and how many were last counted for (read inline by the session)
        self.windows_in = 0
        self.window_allowance = limits.window_frames_base
        #: GOAWAYs received: a drain, then the close; more are idle frames
        self.goaways_in = 0
        #: bytes of replies made so far, and the count when output last became blocked or unblocked
        self.reply_bytes = 0
        self._reply_mark = 0
        #: the transport's write buffer is above its high mark
        self._blocked = False
        self._ping = Budget("ping", limits.ping_burst, limits.ping_rate, 0, now)
        self._control = Budget("control", limits.control_burst, limits.control_rate, 0, now)
        self._unwanted = Budget("unwanted_streams", limits.unwanted_stream_burst, limits.unwanted_stream_rate, 1, now)
        self._idle = Budget(
            "idle_frames", limits.idle_frame_burst, limits.idle_frame_rate, limits.idle_frames_per_stream, now
        )

    # ------------------------------------------------------------------ buckets

    def ping(self, now: float) -> str | None:
        return None if self._ping.take(now) else self._ran_out(self._ping, "PINGs")

    def control(self, now: float) -> str | None:
        return None if self._control.take(now) else self._ran_out(self._control, "CONTROL messages")

    def unwanted(self, now: float) -> str | None:
        """A stream refused without work, or reset by the peer before it was accepted."""
        if self._unwanted.take(now, self.accepted):
            return None
        return self._ran_out(self._unwanted, "streams refused or reset before they were accepted")

    def idle_frame(self, now: float, streams_seen: int, what: str) -> str | None:
        """A frame that brings no work; each stream opened either way earns a few."""
        if self._idle.take(now, streams_seen):
            return None
        return self._ran_out(self._idle, f"frames that bring no work (last: {what})")

    def window_flood(self, frames_sent: int, peer_streams: int) -> str | None:
        """``windows_in`` went over ``window_allowance``: recount what the frames we sent and
        the streams the peer opened justify; the reason when it is still over."""
        limits = self.limits
        self.window_allowance = limits.window_frames_base + limits.window_frames_per_frame * (frames_sent + peer_streams)
        if self.windows_in <= self.window_allowance:
            return None
        self.flood = "window_frames"
        return (
            f"window_frames flood: {self.windows_in} WINDOW frames for {frames_sent} frames sent "
            f"(limit {limits.window_frames_base} + {limits.window_frames_per_frame} per frame sent or stream opened)"
        )

    def _ran_out(self, budget: Budget, what: str) -> str:
        self.flood = budget.name
        return f"{budget.name} flood: too many {what} (limit {int(budget.capacity)} at once, {budget.rate:g} a second)"

    # ------------------------------------------------------------------ replies

    def replied(self, nbytes: int) -> bool:
        """A reply the peer provoked was encoded; True: too many pile up behind a full buffer, hold input."""
        self.reply_bytes += nbytes
        return self._blocked and self.reply_bytes - self._reply_mark > self.limits.reply_bytes_while_blocked

    def output_blocked(self, blocked: bool) -> None:
        """The transport's write buffer went above its high mark (True) or below its low mark (False)."""
        self._blocked = blocked
        self._reply_mark = self.reply_bytes
