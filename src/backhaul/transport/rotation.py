"""Key rotation of tunnels: when a tunnel has used its TLS keys for long enough, it is replaced.

AES-GCM keys are good for a bounded number of records: RFC 8446 section 5.5 puts the limit
at 2^24.5 full-size records per key. Rather than update keys inside a connection, a
tunnel is rotated: the side that finds it past ``TlsSettings.rotate_records`` sends GOAWAY
with the reason ``ROTATION_REASON``, so no new stream lands on it; the connector dials a
successor at once (connector.slots), and the old tunnel is closed once its streams have
ended, or when it reaches AES-GCM's limit itself or the drain deadline, whichever comes
first (its streams are reset then: a stream cannot move to another tunnel). Both ends check both directions, so either
end's setting rotates the tunnel.

The count is an upper bound, from counters the tunnel keeps anyway: every TLS write of n
bytes makes at most n // 16384 + 1 records, so ``bytes // 16384 + writes`` bounds the
records of all of them; a write carries one frame at least, so the frames counted by the
codec bound the writes (a tunnel batches many frames into one write: the bound is
pessimistic, never short). It is read in the owners' periodic work, never per frame.

Everything here is a plain function of counters and limits, except ``Rotations``, which
remembers since when each rotated tunnel drains.
"""

from __future__ import annotations

from typing import Hashable

from backhaul.config import AES_GCM_RECORD_LIMIT, TlsSettings

#: The GOAWAY reason of a rotation; a connector that reads it redials instead of taking
#: its relay node for draining (docs/protocol.md, GOAWAY).
ROTATION_REASON = "key rotation"
#: Largest plaintext of one TLS record (RFC 8446 section 5.1).
RECORD_PAYLOAD = 16384

KEEP = "keep"
ROTATE = "rotate"
CLOSE = "close"


def records_bound(nbytes: int, writes: int) -> int:
    """At most how many TLS records ``nbytes`` sent in ``writes`` writes took."""
    return nbytes // RECORD_PAYLOAD + writes


def tunnel_records(bytes_out: int, frames_out: int, bytes_in: int, frames_in: int) -> int:
    """The larger of the two directions' record bounds (each direction has its own key)."""
    return max(records_bound(bytes_out, frames_out), records_bound(bytes_in, frames_in))


def action(records: int, limit: int, draining_since: float | None, now: float, streams: int, drain_timeout: float) -> str:
    """What to do with a tunnel now: KEEP it, ROTATE it (GOAWAY, successor dialed), or CLOSE
    it (rotated earlier, and its streams ended, or it is at AES-GCM's limit or the deadline)."""
    if draining_since is None:
        return ROTATE if records >= limit else KEEP
    if streams == 0 or records >= AES_GCM_RECORD_LIMIT or now - draining_since >= drain_timeout:
        return CLOSE
    return KEEP


class Rotations:
    """The tunnels of one owner being rotated, and since when (bounded by its tunnels: each
    leaves with ``forget`` in the owner's tunnel_down)."""

    def __init__(self, settings: TlsSettings) -> None:
        self.settings = settings
        self._since: dict[Hashable, float] = {}

    def __contains__(self, tunnel: Hashable) -> bool:
        return tunnel in self._since

    def __len__(self) -> int:
        return len(self._since)

    def started(self, tunnel: Hashable, now: float) -> None:
        """``tunnel`` is rotating (we sent the GOAWAY, or the peer did)."""
        self._since.setdefault(tunnel, now)

    def forget(self, tunnel: Hashable) -> None:
        self._since.pop(tunnel, None)

    def decide(self, tunnel, now: float) -> str:
        """``action`` for a transport.tunnel.Tunnel, from its byte counts, its session's frame
        counts and its open streams."""
        return action(
            self.records(tunnel), self.settings.rotate_records, self._since.get(tunnel), now, tunnel.load,
            self.settings.rotate_drain_timeout,
        )

    def records(self, tunnel) -> int:
        """The record bound of a transport.tunnel.Tunnel (``tunnel_records`` of its counters)."""
        session = tunnel.session
        return tunnel_records(tunnel.bytes_out, session.frames_sent, tunnel.bytes_in, session.frames_received)
